"""Recorded values read where they live: a byte shift held on the device.

Why: an edit step captured as a CUDA graph reads its recorded values at the addresses of the
graphs' static store (``engine.cuda_graph``), while each recorded step lives in a buffer of
its own. Copying the step into the static store before each replay cost 1.00 ms of GPU time
per SDXL 1024 px step on an H100 (1.4 GiB; benchmarks/RESULTS.md, session 22). Instead the
kernels that read recorded values in bulk (the sparse conv's recorded input, the mixed
self-attention's recorded K/V) take a *recorded shift*: a one-element int64 tensor on the
device holding the byte distance from the tensor they are given to where its values are read.
The runtime writes that distance before each replay, so one captured graph reads any step in
place. ``recorded_shift=None`` (every call outside a graph) reads the tensor itself.

The distance must keep every element aligned: a multiple of 16 bytes (what Triton specialises
pointer alignment on), which two buffers of the CUDA caching allocator with one layout always
are apart; the runtime checks it before using a shift.

``read_shifted`` is the one op here: a new tensor holding the values at the shifted address,
for a torch op that reads a recorded value which kernels read in place (a conv whose output
level is dense under one plan runs its torch reference). Its specification is a clone of the
tensor found at that address; tests/test_kernels_recorded_shift.py checks it so.
"""

from __future__ import annotations

import torch

from ...errors import FiseditError
from . import HAS_TRITON, launch_options, triton_enabled

SHIFT_ALIGN = 16    # bytes: a shift keeps the alignment Triton specialised the pointer on

if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import wait_for_previous_kernel

    _ALIGN: tl.constexpr = tl.constexpr(SHIFT_ALIGN)

    @triton.jit
    def shifted(pointer, shift_ptr, SHIFTED: tl.constexpr, ELEMENT_BYTES: tl.constexpr):
        """``pointer`` moved by the byte distance at ``shift_ptr`` when ``SHIFTED``."""
        if SHIFTED:
            # The hint keeps the pointer's known alignment: without it the compiler assumes
            # none for the moved pointer and loads element by element (session 23 measured
            # SD1.5's replay 10% slower so).
            pointer += tl.multiple_of(tl.load(shift_ptr) // ELEMENT_BYTES,
                                      _ALIGN // ELEMENT_BYTES)
        return pointer

    @triton.jit
    def _read_shifted_kernel(source, shift_ptr, out, numel, ELEMENT_BYTES: tl.constexpr,
                             BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_previous_kernel(PDL)
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        source = shifted(source, shift_ptr, True, ELEMENT_BYTES)
        tl.store(out + offsets, tl.load(source + offsets, mask=inside), mask=inside)


def check_recorded_shift(recorded_shift, recorded: torch.Tensor, op: str) -> None:
    """Refuse a ``recorded_shift`` other than None or a one-element int64 tensor on
    ``recorded``'s device."""
    if recorded_shift is None:
        return
    if not isinstance(recorded_shift, torch.Tensor) or recorded_shift.dtype != torch.int64 \
            or recorded_shift.numel() != 1 or recorded_shift.device != recorded.device:
        got = (f"{recorded_shift.dtype} {tuple(recorded_shift.shape)} on {recorded_shift.device}"
               if isinstance(recorded_shift, torch.Tensor) else type(recorded_shift).__name__)
        raise FiseditError(f"{op}: recorded_shift must be None or a one-element int64 tensor "
                           f"on {recorded.device} (a byte distance), got {got}")


def shift_launch_args(recorded_shift, recorded: torch.Tensor) -> tuple:
    """The shift pointer (``recorded`` as an unread placeholder when there is no shift) and
    the ``SHIFTED`` and ``ELEMENT_BYTES`` constants of a kernel calling ``shifted``."""
    placeholder = recorded if recorded_shift is None else recorded_shift
    return placeholder, recorded_shift is not None, recorded.element_size()


def read_shifted(recorded: torch.Tensor, recorded_shift) -> torch.Tensor:
    """The values at ``recorded``'s addresses moved by ``recorded_shift`` bytes, as a new
    tensor of ``recorded``'s shape and strides; ``recorded`` itself when the shift is None.

    ``recorded`` must fill its span (every recorded value of a ``StepStore`` does), so its
    elements are one run of memory read with one flat copy."""
    check_recorded_shift(recorded_shift, recorded, "read_shifted")
    if recorded_shift is None:
        return recorded
    if not triton_enabled(recorded):
        raise FiseditError("read_shifted: a recorded shift is read by a Triton kernel, which "
                           "needs Triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    out = torch.empty_like(recorded)
    if out.stride() != recorded.stride():
        raise FiseditError(f"read_shifted: the recorded tensor must fill its span (strides "
                           f"{recorded.stride()} for shape {tuple(recorded.shape)} leave gaps "
                           "or overlap)")
    numel = recorded.numel()
    if numel == 0:
        return out
    block = 1024
    _read_shifted_kernel[(triton.cdiv(numel, block),)](
        recorded, recorded_shift, out, numel, ELEMENT_BYTES=recorded.element_size(),
        BLOCK=block, **launch_options(recorded))
    return out
