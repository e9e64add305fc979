"""HostValues: a small device tensor's values on the host, without a synchronisation per call.

Why: an edit step must refuse a timestep other than the recorded one, and comparing a CUDA
tensor's value on the host synchronises with the device. One synchronisation per step puts
the call's host work (checks, copies, the replay launch: ~0.3-0.8 ms on SD1.5) in series with
the GPU's, where a pipeline's loop would otherwise run it while the previous step computes.

A diffusers pipeline takes its steps' timesteps from one device tensor (``for t in
timesteps`` yields views of it), so its storage is copied to the host once, at the first step
of a pass, and every later step reads its own view's values from that copy. A copy is only
reused for a view of the same storage (held here, so its address is not reused while the copy
is kept) whose version counter has not moved since (an in-place write through any view of it
bumps the counter; torch counts per tensor family, so a write through an unrelated tensor
aliasing the storage, made with ``Tensor.set_``, would not be seen). Anything else (a fresh
tensor per step, a large storage, an inference tensor, which has no version counter) is copied
on its own, synchronising as before.
"""

from __future__ import annotations

import torch

# Storages up to this size are copied whole (a scheduler's timesteps: 50-1000 numbers).
MAX_MIRRORED_BYTES = 1 << 16


class HostValues:
    """Reads small device tensors on the host, reusing one copy of the last storage read."""

    def __init__(self):
        # (device storage, its version counter then, its bytes on the host) of the storage
        # copied last, kept alive so that its address cannot be reused; one tuple, replaced
        # whole, so a reader never pairs one storage with another's bytes.
        self._kept: tuple | None = None
        self.copies = 0             # storages copied so far (each a synchronisation on a GPU)

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values as a host tensor (a view of the kept copy: clone it to keep it).
        On a GPU, the first read of a storage synchronises with the device; the later reads of
        its views, while unchanged, do not."""
        storage = tensor.untyped_storage()
        # An inference tensor (made under torch.inference_mode) has no version counter, so a
        # kept copy could not tell an in-place write: it is read on its own.
        if (tensor.is_inference() or storage.nbytes() > MAX_MIRRORED_BYTES
                or storage.nbytes() % tensor.element_size()):
            return tensor.cpu()
        kept = self._kept
        if kept is None or not _same(kept, storage, tensor._version):
            whole = torch.empty(0, dtype=torch.uint8, device=tensor.device).set_(storage)
            kept = self._kept = (storage, tensor._version, whole.cpu())
            self.copies += 1
        typed = kept[2].view(tensor.dtype)
        return typed.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())


def _same(kept: tuple, storage, version: int) -> bool:
    """Whether ``kept`` is a copy of ``storage`` at ``version``."""
    held, held_version, _ = kept
    return (storage.data_ptr() == held.data_ptr() and storage.nbytes() == held.nbytes()
            and version == held_version)
