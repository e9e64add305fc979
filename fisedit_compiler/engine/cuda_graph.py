"""A sparse edit step captured as a CUDA graph.

Why: a sparse step of SD1.5 launches several hundred small kernels; at a small edit each runs
for microseconds, so launching them from Python costs more than running them (DESIGN
section 5). For one mask plan every shape in the edit graph is fixed, so the whole step is
captured once and replayed: one launch per step, no host work, no synchronisation.

A CUDA graph reads and writes fixed addresses. The user inputs and one step's recorded values
are copied into static buffers before each replay: every step's cache lives in one buffer of
one layout (``edit_cache.StepStore``), so that copy is a single device-to-device copy (~0.2 ms
for SD1.5's 247 MiB on an H100), far less than capturing a graph per step would cost (one
Python run of the edit graph each, per mask). The output is cloned, because the next replay
overwrites it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..execution.plan import MaskPlan
from ..graph_keys import CACHE_INPUT, PLAN_INPUT
from .edit_cache import StepStore


class CapturedStep:
    """The edit graph of one program under one plan, replayable for any step's inputs."""

    def __init__(self, edit: fx.GraphModule, plan: MaskPlan, inputs: dict, store: StepStore):
        self.edit, self.plan = edit, plan
        self.inputs = {name: value.clone() for name, value in inputs.items()}
        self.store = store.clone()
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

    def __call__(self, inputs: dict, store: StepStore) -> torch.Tensor:
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        self.store.buffer.copy_(store.buffer)   # same layout: one cache, one signature
        self.graph.replay()
        return self.output.clone()
