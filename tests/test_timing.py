"""engine.timing: the synchronised wall time of a call, as a user waits for it."""

import time

import pytest
import torch

from fisedit_compiler.engine.timing import synchronized_s


def test_without_cuda_it_is_the_host_clock(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    seconds = synchronized_s(lambda: calls.append(time.sleep(0.02)))
    assert calls == [None] and 0.02 <= seconds < 1.0


@pytest.mark.gpu
def test_on_a_gpu_it_waits_for_the_queued_work():
    started = time.perf_counter()
    seconds = synchronized_s(lambda: torch.cuda._sleep(200_000_000))    # ~0.1 s of GPU cycles
    assert seconds > 0.02 and time.perf_counter() - started >= seconds
