"""EditCache: the recorded values of one original generation, on the device within a memory
budget and in pinned host memory beyond it.

SD1.5 at 512 px records ~247 MiB per step, so 50 steps take ~12 GiB, and SDXL at 1024 px
several times that: more than a consumer GPU holds next to the model. A cache made with
``device_budget_bytes`` keeps steps on the device while they fit and moves later ones to pinned
host memory as they are recorded. An edit of an offloaded step copies it back; the engine
starts that copy one step early (``prefetch``) on a side stream, so it overlaps the previous
step's compute instead of stalling the next one.

Each step's values live in one byte buffer (``StepStore``), one view per key. Why: the edit
step's CUDA graph reads its cache at fixed addresses, the graph's own buffer (its static
store), which stands for the step it replays: one shift from that buffer to the step's, held
on the device, moves every kernel read of the bulk of the values (``kernels.recorded_shift``),
and the rest is copied into the static store before each replay. SD1.5 records ~350 tensors
per step; copied one by one that took 2.1 ms of host time per step on an H100
(``benchmarks/host_overhead.py``), a third of the whole edit step. One buffer makes the shift
one number and the copy one run of memory (the values read in place are laid out last), and
offloading and prefetching a step one copy each way.
"""

from __future__ import annotations

import torch

from ..checks import check_int, check_optional_int
from ..config import SparseConfig
from ..errors import FiseditError


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, pinned so that copying it back can be asynchronous."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host


_ALIGN = 64     # bytes; every view starts aligned for any dtype and for vectorised loads


class StepStore(dict):
    """One step's recorded values: a nested dict of views into one byte ``buffer``.

    Reads like the plain dict the record graph fills (``store[key]``); ``layout`` gives the
    same views over any other buffer of the same layout, which is how a CUDA graph's static
    store and offloaded or prefetched copies are made. ``recorded_shift`` is None, except on a
    CUDA graph's static store: there the one-element int64 device tensor holding the byte
    distance from the buffer its in-place values are views of to the step it stands for
    (``sparse_ops.cache_shift``).
    A static store may take the values under the keys ``in_place`` from another buffer,
    ``in_place_buffer`` (the recorded step its shift is measured from), so that its own
    ``buffer`` need hold only the others (``span_without(in_place)`` bytes).
    """

    def __init__(self, buffer: torch.Tensor, layout: "StoreLayout", recorded_shift=None,
                 in_place=frozenset(), in_place_buffer: torch.Tensor | None = None):
        super().__init__(layout.views(buffer, in_place, in_place_buffer))
        self.buffer, self.layout = buffer, layout
        self.recorded_shift = recorded_shift

    def to(self, device, non_blocking: bool = False) -> "StepStore":
        return StepStore(self.buffer.to(device, non_blocking=non_blocking), self.layout)


class StoreLayout:
    """Where each tensor of a recorded step lives in its byte buffer: offset, dtype, shape,
    strides. 4-D tensors under a key in ``channels_last`` are stored channels-last (what the
    sparse conv kernel reads fastest); other tensors whose elements fill their span keep their
    strides; the rest are stored contiguous, which every later view and op accepts. Values
    under a key in ``in_place`` (those a CUDA graph reads where the step lives) are placed
    after all the others, so the others are one run from the buffer's start
    (``span_without``)."""

    def __init__(self, store: dict, channels_last=(), in_place=()):
        self.slots = []             # (path, dtype, shape, stride, byte offset, elements)
        leaves = list(_leaves(store, ()))
        placed = sorted(leaves, key=lambda leaf: leaf[0][0] in in_place)    # stable
        offsets, end = {}, 0
        for path, tensor in placed:
            offsets[path] = end
            end += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
        self.nbytes = end
        for path, tensor in leaves:
            if path[0] in channels_last and tensor.dim() == 4:
                batch, channels, height, width = tensor.shape
                stride = (height * width * channels, 1, width * channels, channels)
            elif _fills_span(tensor):
                stride = tensor.stride()
            else:
                stride = _contiguous_strides(tensor.shape)
            self.slots.append((path, tensor.dtype, tuple(tensor.shape), tuple(stride),
                               offsets[path], tensor.numel()))
        self.signature = [(path, dtype, shape) for path, dtype, shape, *_ in self.slots]

    def span_without(self, keys) -> int:
        """How many bytes from the buffer's start hold every value not under ``keys``."""
        return max((offset + numel * dtype.itemsize
                    for path, dtype, _, _, offset, numel in self.slots if path[0] not in keys),
                   default=0)

    def matches(self, store: dict) -> bool:
        return self.signature == [(path, t.dtype, tuple(t.shape)) for path, t in _leaves(store, ())]

    def pack(self, store: dict) -> StepStore:
        """``store``'s tensors copied into one new buffer on their device (one launch on CUDA)."""
        leaves = dict(_leaves(store, ()))
        pieces, end = [], 0
        for path, dtype, shape, stride, offset, numel in sorted(self.slots,
                                                                key=lambda slot: slot[4]):
            if offset > end:
                pieces.append(torch.zeros(offset - end, dtype=torch.uint8,
                                          device=leaves[path].device))
            pieces.append(_storage_order(leaves[path], stride).view(torch.uint8))
            end = offset + pieces[-1].numel()
        if not pieces:
            return StepStore(torch.empty(0, dtype=torch.uint8), self)
        if self.nbytes > end:
            pieces.append(torch.zeros(self.nbytes - end, dtype=torch.uint8,
                                      device=pieces[0].device))
        return StepStore(torch.cat(pieces), self)

    def views(self, buffer: torch.Tensor, in_place=frozenset(),
              in_place_buffer: torch.Tensor | None = None) -> dict:
        """The step's tensors as views of ``buffer``; those under a key in ``in_place`` of
        ``in_place_buffer`` instead, where given (``StepStore``)."""
        store: dict = {}
        for path, dtype, shape, stride, offset, numel in self.slots:
            size = numel * dtype.itemsize
            source = (in_place_buffer if in_place_buffer is not None and path[0] in in_place
                      else buffer)
            flat = source[offset:offset + size].view(dtype)
            node = store
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = flat.as_strided(shape, stride)
        return store


def _leaves(value, path):
    """(path, tensor) for every tensor of a nested dict, in insertion order."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (key,))


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _fills_span(tensor: torch.Tensor) -> bool:
    """True when the tensor's elements occupy exactly ``numel`` consecutive storage slots."""
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride())
                  if size > 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return tensor.numel() > 0


def _storage_order(tensor: torch.Tensor, stride: tuple) -> torch.Tensor:
    """The tensor's elements as a flat tensor in the storage order of a view with ``stride``."""
    # Strides the layout kept are ones that fill their span (StoreLayout), so equal strides
    # mean the storage order can be read off directly.
    if tuple(tensor.stride()) != tuple(stride):
        tensor = torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype,
                                     device=tensor.device).copy_(tensor)
    return tensor.as_strided((tensor.numel(),), (1,))


class EditCache:
    """The recorded values of one original generation, keyed by step index.

    ``steps[i]`` maps cache keys to tensors (or group-norm statistics), all views into one
    buffer per step (``StepStore``). The signature, config
    and per-step timesteps are fixed by the first ``record`` and checked on every later call.
    Steps recorded while the device holds more than ``device_budget_bytes`` of this cache go
    to pinned host memory (``offloaded``); None means no budget.
    """

    def __init__(self, num_steps: int, config: SparseConfig,
                 device_budget_bytes: int | None = None, *, owner=None):
        num_steps = check_int("num_steps", num_steps, minimum=1)
        device_budget_bytes = check_optional_int("device_budget_bytes", device_budget_bytes,
                                                 minimum=0)
        self.num_steps = num_steps
        self.config = config
        # The engine that made it (engine.new_cache): only that engine records or edits it.
        self.owner = owner
        self.device_budget_bytes = device_budget_bytes
        self.signature: tuple | None = None
        # The U-Net's weight versions (version counters, storage addresses) when recorded
        # (SparseEngine.weight_versions): every step of one generation uses one set of
        # weights, and edits check it.
        self.weight_versions: tuple | None = None
        # The weights' values when the first step was recorded (``content_fingerprint``):
        # what tells a write through ``param.data`` since, which moves no version.
        self.weight_fingerprint: tuple | None = None
        # (weak reference to the plan, step) of the last edit that succeeded: the next step
        # with that plan continues its edit pass (SparseEngine.edit checks the U-Net in full
        # at a pass's first step only).
        self.last_edit: tuple | None = None
        # Set by a caller that has just compared the U-Net in full, weights' values included,
        # and runs nothing of the user's before its edit pass (EditSession around its
        # pipeline run): the pass's first step then skips reading the values again (7.99 ms
        # for SDXL on an H100). That step clears it; so does the caller when its run ends.
        self.weight_values_checked = False
        self.layout: StoreLayout | None = None     # fixed by the first recorded step
        # The device the values are recorded on, also fixed by the first recorded step (an
        # offloaded step is stored on the host but is still a step of this device).
        self.device: torch.device | None = None
        self.steps: dict[int, StepStore] = {}
        self.offloaded: set[int] = set()
        self.timesteps: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._prefetched: tuple | None = None       # (step, device store, ready event)
        self._copy_stream = None

    def resize(self, num_steps: int) -> None:
        """Make this the cache of a generation of ``num_steps`` U-Net calls (a recording whose
        length was not known in advance grows, then shrinks to the steps it recorded).

        Fewer steps than the last recorded one is refused: the steps past the end would stay
        held but could no longer be edited, and no caller shrinks a cache below its recorded
        steps (the recording shrinks it to exactly them)."""
        num_steps = check_int("num_steps", num_steps, minimum=1)
        if self.steps and max(self.steps) >= num_steps:
            raise FiseditError(
                f"cannot resize this cache to {num_steps} steps: it holds recorded steps "
                f"{sorted(self.steps)}, and steps from {num_steps} on would be lost; resize to "
                f"at least {max(self.steps) + 1} steps, or record the generation again in "
                f"engine.new_cache({num_steps})")
        self.num_steps = num_steps

    # -- storing ----------------------------------------------------------------------------
    def put(self, step: int, store: dict, channels_last=(), in_place=()) -> None:
        """Keep ``store`` (the record graph's dict) as the recorded values of ``step``, packed
        into one buffer: on its device while the budget allows, else in pinned host memory.
        The first step fixes the layout; 4-D values under the keys in ``channels_last`` are
        stored channels-last, and values under the keys in ``in_place`` after the others
        (``StoreLayout``).

        The buffer is packed (and offloaded) before the cache changes, so a failed copy (out
        of memory) leaves the cache as it was; re-recording a step holds its old buffer until
        the new one is made."""
        layout = self.layout
        if layout is None:
            layout = StoreLayout(store, channels_last, in_place)
        elif not layout.matches(store):
            raise FiseditError("this step records other values than the cache's earlier steps; "
                               "a cache holds one generation: use engine.new_cache()")
        packed = layout.pack(store)
        budget = self.device_budget_bytes
        # The step's earlier values are replaced, so they do not count against the budget.
        offload = budget is not None and \
            self._device_nbytes(without=step) + _nbytes(packed) > budget
        if offload:
            packed = StepStore(_to_host(packed.buffer), layout)
        if self.layout is None:
            self.layout = layout
            self.device = next((tensor.device for _, tensor in _leaves(store, ())),
                               torch.device("cpu"))
        self.steps[step] = packed
        if offload:
            self.offloaded.add(step)
        else:
            self.offloaded.discard(step)
        if self._prefetched is not None and self._prefetched[0] == step:
            self._prefetched = None

    def replace(self, step: int, key: str, value: torch.Tensor) -> None:
        """Overwrite one recorded value of ``step`` in place, wherever the step is stored.

        ``value`` must be a tensor of the recorded one's shape and dtype, on the device the
        cache was recorded on (an offloaded step is copied to the host). Everything is checked
        before the copy, so a refused value leaves the cache as it was."""
        step = self.check_recorded(step)
        store = self.steps[step]
        if key not in store:
            keys = list(store)
            shown = ", ".join(map(repr, keys[:5])) + (", ..." if len(keys) > 5 else "")
            raise FiseditError(
                f"step {step} has no recorded value {key!r}; its keys are {shown} "
                f"({len(keys)} in all: list(cache.steps[{step}])), e.g. the output's "
                "engine.program(inputs).output_key")
        old = store[key]
        if not isinstance(old, torch.Tensor) or not isinstance(value, torch.Tensor) or \
                old.shape != value.shape or old.dtype != value.dtype:
            raise FiseditError(f"cannot replace {key!r} of step {step}: recorded "
                               f"{_describe(old)}, got {_describe(value)}")
        if value.device != self.device:
            raise FiseditError(f"cannot replace {key!r} of step {step}: it was recorded on "
                               f"{self.device}, got a value on {value.device}; move it with "
                               f"value.to({str(self.device)!r})")
        # Recorded values are data: a value's autograd graph stays out. A step recorded under
        # inference mode holds inference tensors, which take writes only in that mode.
        with torch.inference_mode() if old.is_inference() else torch.no_grad():
            old.copy_(value)
        if self._prefetched is not None and self._prefetched[0] == step:
            self._prefetched = None         # the prefetched copy is stale

    def end_pass(self) -> None:
        """Make the next edit start a new edit pass (``SparseEngine.edit`` then compares the
        U-Net in full, weights' values included), whatever its step and plan: a caller whose
        edits may continue one across a gap in which the weights could change (a new
        ``fc.editing`` context after one that stopped early) calls it."""
        self.last_edit = None

    def share_step(self, step: int, source: int) -> None:
        """Make ``step`` hold recorded ``source``'s values and timestep, sharing its buffer (no
        copy). For a generation recorded on the same inputs at every step: ``bench`` times an
        edit as successive steps of one pass without holding a copy per step (SDXL: 1.4 GiB
        a step). The two steps are then one buffer: a ``replace`` of either changes both."""
        step = check_int("step", step, minimum=0, maximum=self.num_steps - 1)
        source = self.check_recorded(source)
        self.steps[step] = self.steps[source]
        if source in self.offloaded:
            self.offloaded.add(step)
        else:
            self.offloaded.discard(step)
        self.timesteps[step] = self.timesteps.get(source)
        if source in self.inputs:
            self.inputs[step] = self.inputs[source]
        if self._prefetched is not None and self._prefetched[0] == step:
            self._prefetched = None

    # -- reading ----------------------------------------------------------------------------
    def store_on(self, step: int, device: torch.device) -> StepStore:
        """The recorded values of ``step`` on ``device``: as stored, prefetched, or copied now
        (asynchronously from pinned memory, ordered before the work that reads them)."""
        step = self.check_recorded(step)
        if step not in self.offloaded:
            return self.steps[step]
        if self._prefetched is not None and self._prefetched[0] == step:
            _, store, ready = self._prefetched
            self._prefetched = None
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            # The copy was allocated on the side stream: tell the allocator it is used here.
            store.buffer.record_stream(current)
            return store
        return self.steps[step].to(device, non_blocking=True)

    def prefetch(self, step: int, device: torch.device) -> None:
        """Start copying offloaded ``step`` to a CUDA ``device`` on a side stream (one step is
        kept in flight). A hint, so a no-op for steps on the device, steps not recorded (an
        edit prefetches the next step, which a partial recording may lack), or without CUDA."""
        device = torch.device(device)
        if (step not in self.offloaded or device.type != "cuda"
                or (self._prefetched is not None and self._prefetched[0] == step)):
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        # The side stream waits for work already queued that may still read the pinned source.
        self._copy_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._copy_stream):
            store = self.steps[step].to(device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        self._prefetched = (step, store, ready)

    def check_recorded(self, step: int) -> int:
        """``step`` as an int, refused unless it has been recorded (the engine's edit and
        prepare check their step here too)."""
        step = check_int("step", step, minimum=0)
        if step not in self.steps:
            recorded = sorted(self.steps) or "none"
            raise FiseditError(
                f"step {step} has not been recorded (recorded steps: {recorded}); record it "
                f"with engine.record(cache, {step}, **inputs) first")
        return step

    # -- accounting -------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by all recorded steps, wherever they are (a shared step counts once)."""
        return sum(self.breakdown().values())

    def device_nbytes(self) -> int:
        """Bytes of the steps kept on their device."""
        return self._device_nbytes(without=None)

    def _device_nbytes(self, without: int | None) -> int:
        """``device_nbytes`` of every step but ``without`` (its buffer still counts where
        another step shares it)."""
        return sum(_nbytes(store) for store in self._distinct(
            store for step, store in self.steps.items()
            if step != without and step not in self.offloaded))

    def host_nbytes(self) -> int:
        """Bytes of the steps offloaded to host memory."""
        return sum(_nbytes(store) for store in self._distinct(
            self.steps[step] for step in self.offloaded))

    def breakdown(self) -> dict[str, int]:
        """Bytes per cache key, summed over the recorded steps' buffers."""
        sizes: dict[str, int] = {}
        for store in self._distinct(self.steps.values()):
            for key, value in store.items():
                sizes[key] = sizes.get(key, 0) + _nbytes(value)
        return sizes

    @staticmethod
    def _distinct(stores) -> list:
        """``stores`` with each buffer once (``share_step`` puts one under several steps)."""
        return list({id(store): store for store in stores}.values())

    def __repr__(self) -> str:
        offloaded = (f", {len(self.offloaded)} offloaded ({self.host_nbytes() / 2**20:.1f} MiB "
                     f"on the host)" if self.offloaded else "")
        return (f"EditCache({len(self.steps)}/{self.num_steps} steps recorded, "
                f"{self.nbytes() / 2**20:.1f} MiB{offloaded})")
