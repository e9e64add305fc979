"""A sparse edit step captured as a CUDA graph.

Why: a sparse step of SD1.5 launches several hundred small kernels; at a small edit each runs
for microseconds, so launching them from Python costs more than running them (DESIGN
section 5). For one mask plan every shape in the edit graph is fixed, so the whole step is
captured once and replayed: one launch per step, no host work, no synchronisation.

A CUDA graph reads and writes fixed addresses. The user inputs and one step's recorded values
are copied into static buffers before each replay: the cache of each step lives at its own
addresses, and the copy (one device-to-device pass over the step's cache, ~0.1 ms for SD1.5)
costs far less than the per-step graphs that would avoid it would cost to capture (one
Python run of the edit graph each, per mask). The output is cloned, because the next replay
overwrites it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..passes.sparsify import CACHE_INPUT, PLAN_INPUT
from .edit_cache import map_tensors
from .plan import MaskPlan


def _pairs(static, value, out: list) -> list:
    """(static buffer, new value) pairs of two nested dicts of tensors, in a fixed order."""
    if isinstance(static, torch.Tensor):
        out.append((static, value))
    elif isinstance(static, dict):
        for key, item in static.items():
            _pairs(item, value[key], out)
    return out


def _copy_into(static, value) -> None:
    # One multi-tensor copy rather than a copy_ per entry: SD1.5's step cache has ~400
    # tensors, and launching ~400 copies from Python costs milliseconds of host time.
    pairs = _pairs(static, value, [])
    if pairs:
        targets, sources = zip(*pairs)
        torch._foreach_copy_(list(targets), list(sources))


class CapturedStep:
    """The edit graph of one program under one plan, replayable for any step's inputs."""

    def __init__(self, edit: fx.GraphModule, plan: MaskPlan, inputs: dict, store: dict):
        self.edit, self.plan = edit, plan
        self.inputs = map_tensors(inputs, torch.clone)
        self.store = map_tensors(store, torch.clone)
        # Warm up outside the capture, on a side stream as capture requires: this builds the
        # plan's index tables, packs weights and autotunes the Triton kernels (host work that
        # must not be captured).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self._run()

    def _run(self):
        return self.edit(**self.inputs, **{PLAN_INPUT: self.plan, CACHE_INPUT: self.store})

    def __call__(self, inputs: dict, store: dict) -> torch.Tensor:
        _copy_into(self.inputs, inputs)
        _copy_into(self.store, store)
        self.graph.replay()
        return self.output.clone()
