"""Triton kernels for the sparse ops, each beside its torch reference (docs/design.md, "Kernels").

Every kernel module exposes ``<op>_reference`` (plain torch, the specification) and ``<op>``
(Triton). The runtime calls a Triton kernel only where ``triton_enabled(tensor)`` says so: on a
CUDA tensor with Triton importable, or anywhere under ``TRITON_INTERPRET=1`` (the interpreter
the CPU tests use; it must be set before triton is first imported, which tests/conftest.py does).
"""

from __future__ import annotations

import functools

import torch

from ...config import HAS_TRITON, INTERPRET


def autotune_options() -> dict:
    """Options of every ``triton.autotune`` here: short timings, results kept on disk.

    The kernels tune once per size bucket of the active region, so an edit whose mask puts a
    level in a new bucket tunes there, inside the user's edit. Triton's default timing (25 ms
    warm-up and 100 ms of repetitions per config) made that 41 s for SD1.5 on an H100 (session
    4, ``benchmarks/host_overhead.py --new-masks``); a few milliseconds per config ranks these
    microsecond kernels just as well. ``cache_results`` keeps the choices in Triton's cache
    directory, so a later process does not tune again.
    """
    import triton.testing

    return {"do_bench": functools.partial(triton.testing.do_bench, warmup=2, rep=8),
            "cache_results": True}


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``'s device."""
    return HAS_TRITON and (tensor.is_cuda or INTERPRET)


# --- mixed tensors --------------------------------------------------------------------------
# The one place new and recorded values are mixed (docs/design.md, "Sparse ops"): the reference
# sparse ops (``sparse_ops.scatter_full``) and the kernels' references (conv input, attention
# K/V) all build a mixed tensor through ``mix_rows``. (The oracle mixes by mask on its own, on
# purpose: it shares no code with what it checks.)

def mix_rows(new: torch.Tensor, recorded: torch.Tensor, rows: torch.Tensor,
             dim: int) -> torch.Tensor:
    """``recorded`` with its row ``rows[i]`` along ``dim`` replaced by row ``i`` of ``new``
    (cast to ``recorded``'s dtype); a new tensor. No host synchronisation, so it runs inside a
    captured CUDA graph. Repeated rows (a padded plan) must carry equal values."""
    mixed = recorded.clone()
    mixed.index_copy_(dim, rows, new.to(mixed.dtype))
    return mixed


def mix_positions(new: torch.Tensor, recorded: torch.Tensor, position: torch.Tensor,
                  dim: int) -> torch.Tensor:
    """``mix_rows`` from the inverse map: row ``j`` of ``recorded`` along ``dim`` becomes row
    ``position[j]`` of ``new`` where ``position[j] >= 0``. Finding the active rows synchronises
    with the device, so this serves the kernels' torch references, not the runtime."""
    active = torch.nonzero(position >= 0)[:, 0]
    return mix_rows(new.index_select(dim, position[active].long()), recorded, active, dim)
