"""Edit steps captured as CUDA graphs: one graph per capacity bucket, any mask replays it.

Why: a sparse step of SD1.5 launches several hundred small kernels; at a small edit each runs
for microseconds, so launching them from Python costs more than running them. The whole step
is captured once and replayed: one launch per step, no host work, no synchronisation.

A CUDA graph reads and writes fixed addresses and fixed shapes. The shapes of an edit step
follow its plan's capacities, not its mask: every plan of one capacity bucket
(``plan.capacity_buckets``) has tables of the same shapes, so the bucket's graph is captured
once, against a private *template* plan, and a new mask of that bucket is replayed by
writing its tables into the template's (``MaskPlan.refill``: a few small copies, no
synchronisation). A plan made without buckets (an exact plan) gets a graph of its own,
kept on the plan.

All graphs of a program share one set of static buffers: the user inputs the step reads,
copied in before each replay; a *static store*, a buffer of the recorded steps' layout
(``edit_cache.StepStore``) that stands for the step being replayed; the pass constants' values
(``engine.pass_values``), copied only when they are not the ones loaded last, that is once
per edit pass; and one memory pool, since replays run one after another on one stream. The
output is cloned, because the next replay overwrites it.

The static store is not filled with the step before a replay. The kernels that read recorded
values in bulk (sparse convs, mixed self-attention: the keys of ``edit.meta[IN_PLACE_KEYS]``)
add the store's ``recorded_shift``, a byte distance held on the device, to the addresses they
were captured with; one 8-byte fill before each replay points them at the step's own buffer
(``kernels.recorded_shift``). Only the other values (group-norm statistics and the few values
torch ops read: 6.4 MiB of SD1.5's 247 MiB a step), laid out first, are copied in. Copying the
whole step cost 1.00 ms of GPU time per SDXL 1024 px step on an H100 (benchmarks/RESULTS.md,
session 22). The captured addresses of those values are views of the first step loaded, the
*base* (held by the static store, which makes no copy of it: the store's own buffer is the
copied values, not a whole step, 1.4 GiB for SDXL 1024 px), and the shift is the distance
from it. That holds where every key read at the shift is one read only so (``lower_kernels``
names both sets); else the base is a whole copy of the first step, made once, which every
shift then measures from. A replay reads the step loaded last, so that step's buffer must stay
allocated until the replay has run: each call loads its step before it replays, and the caller
holds the step until then (the caching allocator orders a later reuse of its memory after the
replay).

Nothing that tunes, compiles, synchronises or allocates outside the pool may run inside a
capture: each graph is warmed up first, on the capture stream itself (kernel tuning and
loading, packed weights, the plan's tables), and captured in ``thread_local`` mode, so CUDA
calls of other threads (a compiler's workers) cannot invalidate it. The one allocation a
capture makes on purpose is cuBLAS's workspace, in the graph's pool: a workspace cached before
would be freed under the graph by the next recording of torch.compile's CUDA graphs
(``clear_cublas_workspaces``). Python's cyclic garbage collector is paused during a capture: a
collection there may free another captured graph, and destroying a CUDA graph during a capture
invalidates the capture (session 7 found calibration's exact-plan graphs freed so; an exact
plan's graph no longer refers back to its plan, so it goes with the plan without a collection).
A capture that fails anyway is dropped with a warning, and that bucket runs without a graph:
the engine, its plans and the cache stay usable, and later captures use a new stream and memory
pool, because a failed capture can leave the allocator still routing the old stream's
allocations to the old pool ("beginAllocateToPool: already recording to mempool_id" on every
later capture).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import torch
import torch.fx as fx

from ..config import INTERPRET
from ..errors import FiseditError
from ..execution.kernels.recorded_shift import SHIFT_ALIGN
from ..execution.plan import MaskPlan
from ..graph_keys import CACHE_INPUT, IN_PLACE_KEYS, PASS_VALUES_INPUT, PLAN_INPUT, SHIFTED_KEYS
from .edit_cache import StepStore


class CapturedSteps:
    """The captured edit steps of one program (one input signature)."""

    def __init__(self, edit: fx.GraphModule):
        self.edit = edit
        # The user inputs the step reads (those read only by the pass constants are not).
        self.read = frozenset(node.name for node in edit.graph.nodes
                              if node.op == "placeholder" and node.users)
        # The recorded keys read only by kernels, at the static store's recorded shift.
        self.in_place = edit.meta.get(IN_PLACE_KEYS, frozenset())
        # Whether a view of the first step may stand for those values: only if every key read
        # at the shift is one of them (a shifted read of a copied key would read another step)
        # and a graph that does not say which keys it reads at the shift reads none in place.
        shifted = edit.meta.get(SHIFTED_KEYS)
        self._reads_in_place = (bool(self.in_place) and shifted is not None
                                and shifted <= self.in_place)
        self.inputs: dict | None = None      # static copies of the user inputs it reads
        self.store: StepStore | None = None  # the static store (module docstring)
        self._base = None                    # the buffer its in-place values are views of
        self._aligned = None                 # a step's copy at an aligned distance, if needed
        self._copied_bytes = 0               # how much of a step is copied into it
        self._source = None                  # weak reference to the step loaded last
        self._layouts_seen = weakref.WeakSet()   # other caches' layouts, checked equal
        self.values: tuple | None = None     # static copies of the pass constants' values
        self._loaded_values: tuple | None = None   # the values copied in last
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()
        self.graphs: dict = {}               # bucket -> _Graph, or None where capture failed

    def __call__(self, plan: MaskPlan, inputs: dict, store: StepStore,
                 values: tuple | None = None) -> torch.Tensor:
        """The edit step of ``plan`` on ``inputs``, ``store`` (a step's recorded values) and
        ``values`` (the pass constants' values; None for a graph without them)."""
        self._load(inputs, store, values)
        graph = self.capture(plan)
        if graph is None:
            return self._run(plan)
        graph.load(plan)
        graph.replay()
        return graph.output.clone()

    def captured(self, plan: MaskPlan) -> bool:
        """Whether replaying ``plan`` needs no capture."""
        return self._key(plan) in self._graphs_of(plan)

    def failed(self, plan: MaskPlan) -> bool:
        """Whether capturing ``plan``'s graph was tried and failed (it runs without a graph)."""
        graphs, key = self._graphs_of(plan), self._key(plan)
        return key in graphs and graphs[key] is None

    def capture(self, plan: MaskPlan, inputs: dict | None = None, store: StepStore | None = None,
                values: tuple | None = None):
        """The graph that replays ``plan`` (captured now if needed; None where capture failed).
        ``inputs`` and ``store`` (with ``values``, for a graph with pass constants) are loaded
        first when given; without them the capture and the graph's replays read the ones
        loaded last, whose recorded step must still be allocated (``check_loaded``)."""
        if (inputs is None) != (store is None):
            raise FiseditError("capture takes the step's inputs and its recorded values "
                               "together (capture(plan, inputs, store, values)), or neither")
        if inputs is not None:
            self._load(inputs, store, values)
        else:
            self.check_loaded()
        graphs, key = self._graphs_of(plan), self._key(plan)
        if key not in graphs:
            template = plan if plan.bucket is None else plan.template()
            graphs[key] = self._capture(template)
        return graphs[key]

    def _graphs_of(self, plan: MaskPlan) -> dict:
        # An exact plan's graph lives on the plan (and goes with it); a bucket's here.
        return self.graphs if plan.bucket is not None else plan.memo.setdefault("graphs", {})

    def _key(self, plan: MaskPlan):
        return plan.bucket if plan.bucket is not None else id(self)

    def _load(self, inputs: dict, store: StepStore, values: tuple | None) -> None:
        if self.inputs is None:
            # Made whole before any is kept: a failure (out of memory) leaves nothing loaded.
            # An input the step does not read is passed as None: no buffer, no copy.
            static_inputs = {name: value.clone() if name in self.read else None
                             for name, value in inputs.items()}
            static_values = None if values is None else _static_copy(values)
            self._make_static_store(store)
            self.inputs, self.values = static_inputs, static_values
            self._loaded_values = values
            return
        for name, value in inputs.items():
            if name in self.read:
                self.inputs[name].copy_(value)
        self.stand_for(store)
        if values is not None and values is not self._loaded_values:
            _copy_into(self.values, values)
            self._loaded_values = values        # held: its identity is not reused meanwhile

    def _make_static_store(self, first: StepStore) -> None:
        """The static store, standing for ``first`` (shift 0). Its in-place values are views
        of ``first``'s own buffer, the base every shift is measured from, so no copy of a
        step's bulk is made (SDXL 1024 px: 1.4 GiB a step); the base is held, its address
        fixed in the graphs. Under the interpreter (no shift holds), where ``first`` is not
        aligned for a shift, or where a key read at the shift is also copied (its view must
        then lie in the base too), the base is a whole copy of it instead."""
        buffer, layout = first.buffer, first.layout
        shift = torch.zeros(1, dtype=torch.int64, device=buffer.device)
        copied = layout.span_without(self.in_place)
        if INTERPRET or buffer.data_ptr() % SHIFT_ALIGN or not self._reads_in_place:
            base = buffer.clone()
            store, source = StepStore(base, layout, recorded_shift=shift), None
        else:
            base = buffer
            store = StepStore(buffer[:copied].clone(), layout, recorded_shift=shift,
                              in_place=self.in_place, in_place_buffer=buffer)
            source = weakref.ref(buffer)
        self._base, self.store, self._copied_bytes, self._source = base, store, copied, source

    def check_loaded(self) -> None:
        """Refuse to run a graph unless inputs are loaded and the recorded step loaded last is
        still allocated (a graph reads that step where it lives)."""
        if self.inputs is None or (self._source is not None and self._source() is None):
            why = ("nothing is loaded yet" if self.inputs is None else
                   "the recorded step loaded last has been freed since")
            raise FiseditError(
                f"an edit step's graph runs on the inputs and recorded step loaded last, but "
                f"{why}; load them: capture(plan, inputs, store, values)")

    def stand_for(self, store: StepStore) -> None:
        """Make the static store stand for the recorded step ``store``: copy in the values not
        read in place and point the recorded shift at ``store``'s buffer (one copy and one
        8-byte fill, both queued on the current stream)."""
        self._check_layout(store)
        if INTERPRET:
            # Triton's interpreter copies each tensor a kernel reads to the host on its own,
            # so no distance between two device buffers holds there: copy it all.
            self.store.buffer.copy_(store.buffer)
            self.store.recorded_shift.fill_(0)
            self._source = None
            return
        buffer = store.buffer
        if (buffer.data_ptr() - self._base.data_ptr()) % SHIFT_ALIGN:
            # Not from the caching allocator, so no aligned shift reaches it: read a copy
            # (the base itself where it is the store's own whole copy).
            if self._base is self.store.buffer:
                self._aligned = self._base
            elif self._aligned is None:
                self._aligned = torch.empty_like(buffer)
            buffer = self._aligned.copy_(buffer)
            assert (buffer.data_ptr() - self._base.data_ptr()) % SHIFT_ALIGN == 0
        copied = self._copied_bytes
        self.store.buffer[:copied].copy_(buffer[:copied])
        self._source = weakref.ref(buffer)
        # One layout, so one distance moves every read.
        self.store.recorded_shift.fill_(buffer.data_ptr() - self._base.data_ptr())

    def _check_layout(self, store: StepStore) -> None:
        """``store`` must be a step of the static store's layout, on its device: a shift or a
        prefix copy from any other would read the wrong bytes. Steps of one cache share their
        layout object; another cache's is compared once."""
        layout = store.layout
        known = layout is self.store.layout or layout in self._layouts_seen
        if not known and layout.slots == self.store.layout.slots:
            self._layouts_seen.add(layout)
            known = True
        if known and store.buffer.device == self._base.device:
            return
        raise FiseditError(
            f"these CUDA graphs were captured for recorded steps of another layout or device "
            f"(loaded first: {self._base.numel()} bytes on {self._base.device}; "
            f"given: {store.buffer.numel()} bytes on {store.buffer.device}); a program's graphs "
            "take the steps its engine recorded, on their device (cache.store_on(step, device))")

    def _run(self, plan: MaskPlan):
        extra = {} if self.values is None else {PASS_VALUES_INPUT: self.values}
        return self.edit(**self.inputs, **{PLAN_INPUT: plan, CACHE_INPUT: self.store}, **extra)

    def _capture(self, template: MaskPlan) -> "_Graph | None":
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self._run(template)            # warm-up: tuning, tables, packed weights
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()
        # The graph's GEMMs get a cuBLAS workspace of its own, in its pool: the one warmed up
        # for this stream belongs to cuBLAS's cache, which torch.compile's CUDA graphs clear
        # whenever they record (a dense graph compiled after this capture, as a probe step or
        # a full-mask edit compiles it), freeing memory this graph would still write to (an
        # illegal address or another tensor's values). Forgotten again after the capture, so
        # that work outside graphs does not use pool memory.
        try:
            clear_cublas_workspaces()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                  capture_error_mode="thread_local"):
                output = self._run(template)
        except Exception as error:  # noqa: BLE001 - any failure: run without a graph
            warnings.warn(
                f"capturing the edit step as a CUDA graph failed ({type(error).__name__}: "
                f"{error}); this capacity bucket runs without a graph (correct, slower)",
                RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
            return None
        finally:
            clear_cublas_workspaces()
            if collecting:
                gc.enable()
        # A bucket's graph keeps its private template; an exact plan's graph is kept on the
        # plan itself (``_graphs_of``), so it must not refer back to it.
        return _Graph(graph, template if template.bucket is not None else None, output, self)


def clear_cublas_workspaces() -> None:
    """Drop cuBLAS's cached workspaces (one per handle and stream), so that the next GEMM on
    a stream allocates one; inside a capture, in the graph's pool. What Inductor's CUDA-graph
    trees call around their recordings, for the same reason; torch has no public name for it."""
    torch._C._cuda_clearCublasWorkspaces()


def _static_copy(value):
    """Static buffers for pass constants: each tensor cloned, tuples and lists of them
    followed (anything else is a constant of the graph, as it was inside the step)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(map(_static_copy, value))
    return value


def _copy_into(static, value) -> None:
    """Copy ``value`` into the buffers ``_static_copy`` made for one of its shape."""
    if isinstance(static, torch.Tensor):
        static.copy_(value)
    elif isinstance(static, (tuple, list)):
        for inner_static, inner in zip(static, value):
            _copy_into(inner_static, inner)


class _Graph:
    """A captured step, its template plan (whose tables it reads; None for an exact plan's
    graph, which reads its own plan's tables and replays only that plan) and its output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, plan: MaskPlan | None,
                 output: torch.Tensor, steps: CapturedSteps):
        self.graph, self.plan, self.output = graph, plan, output
        self._steps = weakref.ref(steps)        # what it reads: checked before each replay
        self._loaded = None          # weak reference to the plan whose tables are loaded

    def load(self, plan: MaskPlan) -> None:
        """Put ``plan``'s tables into the template, unless they are there already: the steps
        of one edit replay one plan, and only its first step pays the refill."""
        if self.plan is None or plan is self.plan or (
                self._loaded is not None and self._loaded() is plan):
            return
        self.plan.refill(plan)
        self._loaded = weakref.ref(plan)

    def replay(self) -> None:
        """Run the step on the inputs and the recorded step loaded last (``CapturedSteps``
        loads them before each edit call's replay; ``check_loaded``)."""
        steps = self._steps()
        if steps is not None:
            steps.check_loaded()
        self.graph.replay()
