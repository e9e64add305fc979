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


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the torch references compute in: fp32 for fp16, bf16 and fp32 (as the kernels
    accumulate), the input's own dtype for fp64, so that a float64 U-Net's edits stay
    float64-exact (a plain ``.float()`` would round them to fp32)."""
    return torch.promote_types(dtype, torch.float32)


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``tensor``'s device."""
    return HAS_TRITON and (tensor.is_cuda or INTERPRET)


# --- programmatic dependent launch ----------------------------------------------------------
# An edit step is hundreds of kernels of a few microseconds each (benchmarks/RESULTS.md), so the
# time between one kernel's end and the next one's start counts. On Hopper and later, a kernel
# launched as a programmatic dependent may start while the kernel before it still runs: its
# programs are placed on the GPU early and wait, inside the kernel, for the previous kernel to
# finish (``wait_for_previous_kernel``). Every kernel here calls that wait before its first
# memory access, so what it reads and writes is ordered exactly as without the overlap.

HAS_GRID_DEPENDENCY_CONTROL = False
if HAS_TRITON:
    import triton
    import triton.language as tl

    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        HAS_GRID_DEPENDENCY_CONTROL = True
    except ImportError:  # Triton before 3.3: kernels launch without the overlap
        pass

    @triton.jit
    def wait_for_previous_kernel(PDL: tl.constexpr):
        """With ``PDL``: wait until the previous kernel in the stream has finished and its writes
        are visible, then let the next kernel's programs be placed. The first statement of every
        kernel here; a no-op without ``PDL``."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()


_programmatic_launch = {"enabled": True}


def set_programmatic_launch(enabled: bool) -> bool:
    """Turn programmatic dependent launch on or off for kernels launched from now on (CUDA
    graphs keep how they were captured); returns the previous setting. On by default where the
    GPU supports it; benchmarks turn it off to measure what it saves."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_programmatic_launch takes True or False, got {enabled!r}")
    previous = _programmatic_launch["enabled"]
    _programmatic_launch["enabled"] = enabled
    return previous


@functools.cache
def _supports_programmatic_launch(device: torch.device) -> bool:
    return HAS_GRID_DEPENDENCY_CONTROL and torch.cuda.get_device_capability(device)[0] >= 9


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA ``device``: what a launch's grid must fill."""
    return _multiprocessors(_index(device))


def shared_memory(device: torch.device) -> int:
    """The shared memory one program may use on a CUDA ``device``, as Triton reads it."""
    return _shared_memory(_index(device))


def _index(device: torch.device) -> int:
    """The CUDA device's index ("cuda" means the current device): the caches' key."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _shared_memory(index: int) -> int:
    import triton

    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def launch_options(tensor: torch.Tensor) -> dict:
    """The keyword arguments that launch a kernel here on ``tensor``'s device: ``PDL`` (the
    kernel's constexpr for ``wait_for_previous_kernel``) and Triton's ``launch_pdl``, both
    true on a GPU that supports programmatic dependent launch (compute capability 9.0 or
    later) while it is enabled (``set_programmatic_launch``); false under the interpreter."""
    pdl = (_programmatic_launch["enabled"] and tensor.is_cuda and not INTERPRET
           and _supports_programmatic_launch(tensor.device))
    return {"PDL": pdl, "launch_pdl": pdl}


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
