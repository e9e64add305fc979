"""DeviceClock: the times an edit's report gives, on its device's timeline.

Why: a GPU runs behind the host. A pipeline asked for latents returns while ~100 ms of its
steps are still queued (SD1.5, 50 steps), so a host clock read there times the queueing (a
report gave 0.07 s for an edit whose work took 0.17 s); a synchronisation there instead
makes the host work that follows (the report, copies) wait for the GPU rather than overlap
it (with it, 11-18 ms of each SD1.5 edit lay outside its steps, RESULTS session 32). On a
GPU a mark is a CUDA event recorded in stream order, and the times are read once, at the
end, after the host work; on the CPU a mark is the host's clock.
"""

from __future__ import annotations

import time

import torch


class DeviceClock:
    """Marks on ``device``'s timeline and the seconds between them."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    def mark(self):
        """A point in the device's stream order: done when the work queued before it is."""
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, begin, end) -> float:
        """Seconds from mark ``begin`` to mark ``end`` (on a GPU, waits for ``end``)."""
        if self.device.type != "cuda":
            return end - begin
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
