"""DerivedWeights: copies of a program's weights in the form its ops read them, kept current.

Two ops read weights in another form than the module holds them: the conv kernel reads each
conv weight packed as one matrix (``kernels.sparse_conv.pack_weight``), and a grouped
projection (``sparse_ops.grouped_linear``) reads the weights of the linears it groups
concatenated (``concatenate``). Both are made once, not per step. In a graph each copy is a
node of its own before the op that reads it (``packed_conv_weight``, ``concatenated``; the
``COPIES``): the edit graph looks it up on each eager step, and the engine's dense graph (``passes.tune_dense``)
reads the same copies, looked up once when that graph is made (its packed conv weights, viewed
channels-last, are its conv weights), so the two paths hold one copy between them.

Owner and lifetime (docs/design.md, "State and lifetimes"): the passes that emit such ops
attach one ``DerivedWeights`` to the edit graph (``passes.pattern.derived_weights``) and hand it
to each op, so the copies belong to that program and go with it. A copy is made on first use
(the warm-up before a CUDA-graph capture) and made again, into the same memory, when one of its
source weights has changed since (``tensor_versions``: its version counter moved, as in a LoRA
swap or fine-tuning, or its storage was swapped by a ``.data`` assignment), so eager edits
always see the current weights. A captured CUDA graph does not run
this code on replay: ``refresh()`` makes every copy again in place, and ``SparseEngine.edit``
calls it (``refresh_weights``) when the U-Net's weight versions moved since, or, at an edit
pass's first step, their values (``content_fingerprint``: a write through ``param.data``
moves no version), and ``SparseEngine.record`` at a new generation's first step when their
values moved. An ``nn.Module`` only so that the graph can hold it as an attribute.
"""

from __future__ import annotations

import gc
import operator
import warnings
import weakref
from typing import Callable

import torch

from .kernels.sparse_conv import pack_weight


class DerivedWeights(torch.nn.Module):
    """``build(*sources)`` per (build, sources), made once and kept current (module docstring)."""

    def __init__(self):
        super().__init__()
        # (build, id of each source) -> [weak references to the sources, their versions when
        # built, the derived tensor]; the weak references tell a live entry from one whose ids
        # were reused.
        self._entries: dict[tuple, list] = {}
        # (version counters, content fingerprint or None) of the weights an engine last
        # refreshed the copies from (``SparseEngine.refresh_weights``); None: none has yet.
        self.made_from: tuple | None = None

    def get(self, sources: tuple[torch.Tensor, ...], build: Callable) -> torch.Tensor:
        """``build(*sources)``, built once and rebuilt in place when a source changes."""
        key = (build, *map(id, sources))
        entry = self._entries.get(key)
        if entry is None or any(ref() is not source for ref, source in zip(entry[0], sources)):
            # A weak reference's callback drops the entry with any of its sources; it refers to
            # the entries, not the other way round, so it keeps neither this object nor the
            # copies alive once the program is gone.
            drop = lambda _, key=key, entries=self._entries: entries.pop(key, None)  # noqa: E731
            entry = [[weakref.ref(source, drop) for source in sources], tensor_versions(sources),
                     build(*sources), build]
            self._entries[key] = entry
        elif entry[1] != tensor_versions(sources):
            self._rebuild(entry)
        return entry[2]

    def refresh(self) -> None:
        """Build every live entry again, in place (addresses a CUDA graph baked in stay)."""
        for entry in list(self._entries.values()):
            if all(ref() is not None for ref in entry[0]):
                self._rebuild(entry)

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes held by the derived copies."""
        return sum(entry[2].numel() * entry[2].element_size() for entry in self._entries.values())

    @staticmethod
    @torch.inference_mode()     # a copy first made under inference mode is writable only there
    def _rebuild(entry: list) -> None:
        sources = [ref() for ref in entry[0]]
        entry[2].copy_(entry[3](*sources))
        entry[1] = tensor_versions(sources)


def packed_conv_weight(derived: DerivedWeights, weight: torch.Tensor) -> torch.Tensor:
    """The conv kernel's packed copy of ``weight`` (``kernels.sparse_conv.pack_weight``)."""
    return derived.get((weight,), pack_weight)


def concatenated(derived: DerivedWeights, *tensors: torch.Tensor) -> torch.Tensor:
    """The copy of ``tensors`` joined along their first dim (``concatenate``)."""
    return derived.get(tensors, concatenate)


def concatenate(*tensors: torch.Tensor) -> torch.Tensor:
    """The tensors joined along their first dim (a grouped projection's weights or biases)."""
    return torch.cat(tensors)


# The graph nodes that look up a derived copy (module docstring).
COPIES = (packed_conv_weight, concatenated)


def tensor_versions(tensors) -> tuple[tuple, tuple]:
    """What tells that tensors changed, the one definition of it: their version counters
    (``version_counters``: every in-place write moves one) and their storages' addresses
    (``storage_addresses``: a ``.data`` assignment, which PEFT's merge, ``module.half()`` and
    ``module.to()`` make, swaps a tensor's storage and leaves its counter as it was)."""
    return version_counters(tensors), storage_addresses(tensors)


def version_counters(tensors) -> tuple:
    """The tensors' version counters (None for an inference tensor, which has none). Read on
    every edit step for every weight of a U-Net (hundreds of tensors): the common case runs in
    C (``attrgetter``)."""
    try:
        return tuple(map(_VERSION, tensors))
    except RuntimeError:     # an inference tensor among them
        return tuple(_version(tensor) for tensor in tensors)


def content_fingerprint(tensors) -> tuple:
    """What tells that tensors' values changed where nothing else can: a write through
    ``param.data`` (``w.data += delta``, an EMA model's ``copy_to``, a merge that is not
    PEFT's safe one) moves neither a version counter nor an address. Each tensor's L2 norm,
    accumulated in fp32 (fp64 for fp64 weights) and compared by its bits (a NaN weight
    compares equal to itself): one read of every weight and one host read (SD1.5: 0.28 s on
    a 2-core CPU host in fp32, ``benchmarks/weight_check_cost.py``; 3.4 ms in fp16 on an
    H100, mostly host work over its 686 tensors; RESULTS session 18), so it is read at a new
    generation and at an edit pass's first step, not on every step (``WeightFingerprint``
    replays it on a GPU). A write that keeps every tensor's norm (a permutation, a sign flip)
    or moves it below fp32's resolution (one weight of millions by 1e-6) goes unseen."""
    norms = _group_norms(tensors)
    if not norms:
        return ()
    return _as_fingerprint(torch.cat([group.cpu() for group in norms]))


class WeightFingerprint:
    """``content_fingerprint`` of one fixed list of tensors (a U-Net's or a VAE's weights), the
    same bits, read on a CUDA device by replaying a CUDA graph of it.

    Why: eagerly the read is mostly host work (a norm launch per group of ~100 tensors, a
    stack of hundreds of results: ~2 ms on SD1.5 on an H100, RESULTS session 25, where reading
    its 1.7 GB of fp16 weights at the GPU's bandwidth would take ~0.5 ms, an estimate), and it
    runs at every edit pass's first step (graphed: 1.15 ms against 2.17 eager, RESULTS
    session 32). The graph is captured at the second read (the first runs eagerly, which also
    loads the kernels), or at ``prepare`` (both at once), for the tensors where they are:
    their addresses, shapes, dtypes and device; a tensor moved, resized or cast since is
    captured again.
    Tensors on the CPU or on several devices, and a read while a CUDA graph is being captured
    elsewhere on the stream, run eagerly. The capture is made as the engine's step graphs are
    (``engine.cuda_graph``): in ``thread_local`` mode with Python's garbage collector paused;
    its first replay is compared with an eager read. One that fails anyway, or reads other
    values, leaves a warning and every later read eager (same bits, slower)."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self._placement: tuple | None = None    # where the tensors were at the last read
        self._graph: tuple | None = None        # (CUDA graph, its norms) captured there
        self._capture_failed = False

    def __call__(self) -> tuple:
        placement = self._placement_now()
        if self._eager_only(placement):
            return content_fingerprint(self.tensors)
        if self._placement != placement:         # first read where they are: eagerly
            self._placement, self._graph = placement, None
            return content_fingerprint(self.tensors)
        if self._graph is None:
            self._graph = self._capture()
            if self._graph is None:
                return content_fingerprint(self.tensors)
        graph, norms = self._graph
        graph.replay()
        return _as_fingerprint(norms.cpu())

    def prepare(self) -> None:
        """Make the next read a replay: read now as the next reads would (eagerly where the
        tensors are new to this reader, then capturing), so that a caller's one-time setup
        pays the capture rather than its next read (EditSession.generate, for the VAE read
        again at the first edit). Nothing where reads run eagerly (CPU, several devices)."""
        placement = self._placement_now()
        if self._eager_only(placement):
            return
        if self._placement != placement:
            self()          # eagerly: the first read where they are
        if self._graph is None:
            self()          # captures

    def _placement_now(self) -> tuple:
        # A graph reads each tensor's bytes as the dtype and shape it was captured with.
        return (storage_addresses(self.tensors), tuple(map(_SHAPE, self.tensors)),
                tuple(map(_DTYPE, self.tensors)), frozenset(map(_DEVICE, self.tensors)))

    def _eager_only(self, placement: tuple) -> bool:
        """Whether reads at ``placement`` run eagerly: after a failed capture, off CUDA, over
        several devices, or while a CUDA graph is being captured on the stream."""
        devices = placement[3]
        return (self._capture_failed or len(devices) != 1 or next(iter(devices)).type != "cuda"
                or torch.cuda.is_current_stream_capturing())

    def _capture(self) -> tuple | None:
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()        # a collection that frees another CUDA graph breaks a capture
        try:
            with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                norms = torch.cat(_group_norms(self.tensors))
            graph.replay()
            # A replay that read other values than the eager read would refuse every later
            # edit as made with other weights: checked once, here.
            if _as_fingerprint(norms.cpu()) != content_fingerprint(self.tensors):
                raise RuntimeError("its replay read other values than the eager read")
        except Exception as error:  # noqa: BLE001 - any failure: read eagerly from now on
            warnings.warn(f"capturing the weights' values read as a CUDA graph failed "
                          f"({type(error).__name__}: {error}); it runs eagerly (same values, "
                          "more host time at each edit pass's first step)",
                          RuntimeWarning, stacklevel=4)
            torch.cuda.synchronize()
            self._capture_failed = True
            return None
        finally:
            if collecting:
                gc.enable()
        return graph, norms


def _group_norms(tensors) -> list[torch.Tensor]:
    """Each tensor's L2 norm in fp64, one tensor per group of tensors on one device and of one
    accumulation dtype (a fused norm kernel each), in the order each group first appears."""
    groups: dict[tuple, list] = {}
    for tensor in tensors:
        if not tensor.is_floating_point():
            tensor = tensor.float()
        groups.setdefault((tensor.device, tensor.dtype == torch.float64), []).append(tensor)
    with torch.no_grad():
        return [torch.stack(torch._foreach_norm(group, 2, dtype=torch.float64 if wide
                                                else torch.float32)).double()
                for (_, wide), group in groups.items()]


def _as_fingerprint(norms: torch.Tensor) -> tuple:
    """The norms' bits (host fp64) as a tuple of ints, so a NaN compares equal to itself."""
    return tuple(norms.view(torch.int64).tolist())


def storage_addresses(tensors) -> tuple:
    """The address of each tensor's data (``Tensor.data_ptr``; ~0.07 us a tensor, like a
    version counter: 0.05 ms for SD1.5's weights on a CPU host)."""
    return tuple(map(_DATA_PTR, tensors))


_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:     # an inference tensor has no version counter
        return None
