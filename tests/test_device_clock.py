"""edit_flow.device_clock: an edit's phase times on its device's timeline. On a GPU a mark is
an event in stream order, so the time between two marks covers the work queued between them,
not the host's queueing of it, and taking a mark never waits."""

import time

import pytest
import torch

from fisedit_compiler.edit_flow.device_clock import DeviceClock


def test_on_the_cpu_the_seconds_are_the_host_clocks():
    clock = DeviceClock(torch.device("cpu"))
    begin = clock.mark()
    time.sleep(0.02)
    end = clock.mark()
    assert 0.02 <= clock.seconds(begin, end) < 1.0


@pytest.mark.gpu
def test_on_a_gpu_the_seconds_cover_the_queued_work():
    clock = DeviceClock(torch.device("cuda"))
    torch.cuda.synchronize()
    host_began = time.perf_counter()
    begin = clock.mark()
    torch.cuda._sleep(200_000_000)      # ~0.1 s of GPU clock cycles, queued at once
    end = clock.mark()
    queued_s = time.perf_counter() - host_began
    seconds = clock.seconds(begin, end)
    assert queued_s < 0.5 * seconds and seconds > 0.02
