"""EditCache: the recorded values of one original generation, on the device within a memory
budget and in pinned host memory beyond it.

SD1.5 at 512 px records ~247 MiB per step, so 50 steps take ~12 GiB, and SDXL at 1024 px
several times that: more than a consumer GPU holds next to the model. A cache made with
``device_budget_bytes`` keeps steps on the device while they fit and moves later ones to pinned
host memory as they are recorded. An edit of an offloaded step copies it back; the engine
starts that copy one step early (``prefetch``) on a side stream, so it overlaps the previous
step's compute instead of stalling the next one.
"""

from __future__ import annotations

import torch

from ..config import SparseConfig
from ..errors import FiseditError


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def map_tensors(value, fn):
    """``fn`` applied to every tensor of a nested dict of tensors."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    return value


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, pinned so that copying it back can be asynchronous."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor)
    return host


def _to_device(store: dict, device: torch.device) -> dict:
    """``store`` copied to ``device``, asynchronously from pinned memory."""
    return map_tensors(store, lambda tensor: tensor.to(device, non_blocking=True))


class EditCache:
    """The recorded values of one original generation, keyed by step index.

    ``steps[i]`` maps cache keys to tensors (or group-norm statistics). The signature, config
    and per-step timesteps are fixed by the first ``record`` and checked on every later call.
    Steps recorded while the device holds more than ``device_budget_bytes`` of this cache go
    to pinned host memory (``offloaded``); None means no budget.
    """

    def __init__(self, num_steps: int, config: SparseConfig,
                 device_budget_bytes: int | None = None):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise FiseditError(f"num_steps must be a positive int, got {num_steps!r}")
        if device_budget_bytes is not None and device_budget_bytes < 0:
            raise FiseditError(f"device_budget_bytes must be >= 0 or None, got "
                               f"{device_budget_bytes}")
        self.num_steps = num_steps
        self.config = config
        self.device_budget_bytes = device_budget_bytes
        self.signature: tuple | None = None
        self.steps: dict[int, dict] = {}
        self.offloaded: set[int] = set()
        self.timesteps: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._prefetched: tuple | None = None       # (step, device store, ready event)
        self._copy_stream = None

    # -- storing ----------------------------------------------------------------------------
    def put(self, step: int, store: dict) -> None:
        """Keep ``store`` as the recorded values of ``step``: on its device while the budget
        allows, else in pinned host memory."""
        self.steps.pop(step, None)
        self.offloaded.discard(step)
        if self._prefetched is not None and self._prefetched[0] == step:
            self._prefetched = None
        budget = self.device_budget_bytes
        if budget is not None and self.device_nbytes() + _nbytes(store) > budget:
            store = map_tensors(store, _to_host)
            self.offloaded.add(step)
        self.steps[step] = store

    def replace(self, step: int, key: str, value: torch.Tensor) -> None:
        """Replace one recorded value of ``step``, keeping the step where it is stored."""
        self.steps[step][key] = _to_host(value) if step in self.offloaded else value

    # -- reading ----------------------------------------------------------------------------
    def store_on(self, step: int, device: torch.device) -> dict:
        """The recorded values of ``step`` on ``device``: as stored, prefetched, or copied now
        (asynchronously from pinned memory, ordered before the work that reads them)."""
        if step not in self.offloaded:
            return self.steps[step]
        if self._prefetched is not None and self._prefetched[0] == step:
            _, store, ready = self._prefetched
            self._prefetched = None
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            # The copies were allocated on the side stream: tell the allocator they are used here.
            map_tensors(store, lambda tensor: tensor.record_stream(current))
            return store
        return _to_device(self.steps[step], device)

    def prefetch(self, step: int, device: torch.device) -> None:
        """Start copying offloaded ``step`` to a CUDA ``device`` on a side stream (one step is
        kept in flight; a no-op for steps on the device, or without CUDA)."""
        device = torch.device(device)
        if (step not in self.offloaded or device.type != "cuda"
                or (self._prefetched is not None and self._prefetched[0] == step)):
            return
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)
        # The side stream waits for work already queued that may still read the pinned source.
        self._copy_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._copy_stream):
            store = _to_device(self.steps[step], device)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        self._prefetched = (step, store, ready)

    # -- accounting -------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by all recorded steps, wherever they are."""
        return sum(self.breakdown().values())

    def device_nbytes(self) -> int:
        """Bytes of the steps kept on their device."""
        return sum(_nbytes(store) for step, store in self.steps.items()
                   if step not in self.offloaded)

    def host_nbytes(self) -> int:
        """Bytes of the steps offloaded to host memory."""
        return sum(_nbytes(self.steps[step]) for step in self.offloaded)

    def breakdown(self) -> dict[str, int]:
        """Bytes per cache key, summed over the recorded steps."""
        sizes: dict[str, int] = {}
        for store in self.steps.values():
            for key, value in store.items():
                sizes[key] = sizes.get(key, 0) + _nbytes(value)
        return sizes

    def __repr__(self) -> str:
        offloaded = (f", {len(self.offloaded)} offloaded ({self.host_nbytes() / 2**20:.1f} MiB "
                     f"on the host)" if self.offloaded else "")
        return (f"EditCache({len(self.steps)}/{self.num_steps} steps recorded, "
                f"{self.nbytes() / 2**20:.1f} MiB{offloaded})")
