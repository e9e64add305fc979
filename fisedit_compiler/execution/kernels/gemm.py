"""A few-row GEMM with the conv epilogue fused: a torch reference and a Triton kernel.

An edit step's GEMMs have few rows (batch x active positions: 18 to ~1600 at SD1.5's levels
on a 5% edit) and long reductions (up to 23k), so their time is reading the weight, and a
GEMM whose output tiles are fewer than the GPU's multiprocessors reads it with a fraction of
them. The kernel here splits K over several programs per output tile (split-K) in one launch,
and runs the epilogue a sparse conv needs (bias, time embedding, residual, output scale) in
the same launch, where cuBLAS needs a second one (``sparse_conv``'s gather method).

Split-K: each split stores an fp32 partial tile, and the last split to arrive at a tile
(counted by an atomic per tile) adds all the partials in split order, so deterministically, and
runs the epilogue (``_split_k_finish``). The implicit conv kernel (``sparse_conv``) finishes
its tiles the same way.

``gemm_reference`` is plain torch and the specification; ``gemm`` is the Triton kernel, with
the launch configuration (tile shape, splits) from ``launch_config`` unless one is given.
``launch_config`` also says where cuBLAS is the better choice (None): the runtime asks it
before every GEMM it could run here (``execution.triton_ops``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ...config import KERNEL_DTYPES
from ...errors import FiseditError
from . import HAS_TRITON, INTERPRET, accumulation_dtype, launch_options, multiprocessors

_INT32_MAX = 2**31 - 1


class GemmConfig(NamedTuple):
    """How ``gemm`` launches: output tiles of ``block_m x block_n``, K in steps of ``block_k``,
    ``splits`` programs per output tile (split-K), ``warps`` and pipeline ``stages`` each."""
    block_m: int
    block_n: int
    block_k: int
    splits: int
    warps: int = 4
    stages: int = 4


def launch_config(m: int, n: int, k: int, dtype: torch.dtype,
                  device: torch.device) -> GemmConfig | None:
    """The configuration ``gemm`` runs an ``[m, k] @ [k, n]`` product with on ``device``, or
    None where cuBLAS is the better choice.

    Under the interpreter: one small tile shape, split where K allows, so CPU tests run the
    kernel's split-K path. On a GPU the rule is ``benchmarks/micro_gemm.py``'s sweep of the
    SD1.5 step's GEMM shapes (benchmarks/RESULTS.md, session 28).
    """
    # fp32 GEMMs stay cuBLAS's on a GPU (the kernel multiplies them in IEEE fp32, far slower
    # than tensor cores); the interpreter runs them for the CPU tests.
    supported = KERNEL_DTYPES if INTERPRET else (torch.float16, torch.bfloat16)
    if not HAS_TRITON or dtype not in supported:
        return None
    if INTERPRET:
        return GemmConfig(16, 16, 16, max(1, min(4, k // 32)))
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    block_n = 64
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    block_k = 64
    programs = multiprocessors(device)
    splits = max(1, min(16, programs // tiles, k // (4 * block_k)))
    return GemmConfig(block_m, block_n, block_k, splits)


# --- the specification ----------------------------------------------------------------------

def gemm_reference(a, b, bias=None, *, temb=None, residual=None, rows_per_item=None,
                   out_scale=None):
    """``(a @ b + bias + temb + residual) * out_scale``, ``[M, N]`` in ``a``'s dtype.

    * ``a`` ``[M, K]``, ``b`` ``[K, N]``, same dtype (fp16, bf16 or fp32; fp64 here, not in
      the kernel); ``bias`` ``[N]``.
    * The rows are ``B`` items of ``rows_per_item`` rows each (a conv's batch items of
      ``P_out`` output pixels): ``temb`` ``[B, N]`` is added to each item's rows, and
      ``residual`` is ``[B, N, P_out]`` (a conv's output layout) or ``[M, N]``.
    * ``out_scale`` (float) multiplies last.

    Computed in fp32 (fp64 for fp64 operands) and rounded once.
    """
    _check(a, b, bias, temb, residual, rows_per_item, None, kernel=False)
    dtype = accumulation_dtype(a.dtype)
    out = a.to(dtype) @ b.to(dtype)
    if bias is not None:
        out = out + bias.to(dtype)
    if temb is not None:
        out = out + temb.to(dtype).repeat_interleave(rows_per_item, 0)
    if residual is not None:
        out = out + _residual_rows(residual).to(dtype)
    if out_scale is not None:
        out = out * out_scale
    return out.to(a.dtype)


def _residual_rows(residual: torch.Tensor) -> torch.Tensor:
    """The residual as ``[M, N]`` rows: a ``[B, N, P]`` one is the conv's ``(b, p)`` rows."""
    if residual.dim() == 2:
        return residual
    return residual.transpose(1, 2).reshape(-1, residual.shape[1])


def _check(a, b, bias, temb, residual, rows_per_item, out, kernel=True):
    def fail(message):
        raise FiseditError(f"gemm: {message}")

    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        fail(f"a must be [M, K] and b [K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    dtypes = KERNEL_DTYPES if kernel else (*KERNEL_DTYPES, torch.float64)
    if a.dtype not in dtypes or b.dtype != a.dtype:
        fail(f"a and b must share one dtype of {dtypes}, got {a.dtype} and {b.dtype}")
    m, n = a.shape[0], b.shape[1]
    if rows_per_item is None:
        rows_per_item = max(m, 1)
    if not isinstance(rows_per_item, int) or rows_per_item < 1 or m % rows_per_item:
        fail(f"rows_per_item must be a positive int dividing the {m} rows, got "
             f"{rows_per_item!r}")
    items = m // rows_per_item
    shapes = {"bias": (bias, [(n,)]), "temb": (temb, [(items, n)]),
              "residual": (residual, [(items, n, rows_per_item), (m, n)])}
    for name, (value, allowed) in shapes.items():
        if value is not None and tuple(value.shape) not in allowed:
            fail(f"{name} must have shape {' or '.join(map(str, allowed))}, got "
                 f"{tuple(value.shape)}")
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != a.dtype
                            or (m > 1 and out.stride(0) != n) or (n > 1 and out.stride(1) != 1)):
        fail(f"out must be a contiguous {a.dtype} [{m}, {n}], got {out.dtype} "
             f"{tuple(out.shape)} with strides {out.stride()}")


# --- the Triton kernel ----------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import wait_for_previous_kernel

    @triton.jit
    def epilogue(acc, rows, cols, m_total, rows_per_item, n_total, bias_ptr, temb_ptr, res_ptr,
                 out_ptr, sres_b, sres_n, sres_p, out_scale, HAS_BIAS: tl.constexpr,
                 HAS_TEMB: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """Bias, time embedding, residual and output scale on an fp32 ``[rows, cols]`` tile,
        stored to the row-major ``[M, N]`` output (a conv's channel-fast ``[B, N, P]``: row
        ``b * P + p`` is item b's pixel p). The residual is read at
        ``b * sres_b + col * sres_n + p * sres_p``."""
        row_ok = rows < m_total
        col_ok = cols < n_total
        mask = row_ok[:, None] & col_ok[None, :]
        item = rows // rows_per_item
        item64 = item.to(tl.int64)
        slot = rows % rows_per_item
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_TEMB:
            acc += tl.load(temb_ptr + item[:, None] * n_total + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + item64[:, None] * sres_b + cols[None, :] * sres_n
                           + slot[:, None] * sres_p, mask=mask, other=0.0).to(tl.float32)
        acc = acc * out_scale
        out = out_ptr + rows[:, None].to(tl.int64) * n_total + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def split_k_finish(acc, rows, cols, m_total, rows_per_item, n_total, bias_ptr, temb_ptr,
                       res_ptr, out_ptr, partial_ptr, counter_ptr, sres_b, sres_n, sres_p,
                       out_scale, HAS_BIAS: tl.constexpr, HAS_TEMB: tl.constexpr,
                       HAS_RESIDUAL: tl.constexpr):
        """Split-K, in the same launch: publish this split's fp32 partial tile; the last split
        of the output tile (grid axes 0 and 1) to arrive adds all the partials and runs the
        epilogue.

        Each split (grid axis 2) stores its tile to ``partial`` ``[split, M, N]`` and
        increments the tile's counter; the one that reads back ``splits - 1`` is last, so
        every other split's partial is stored. It adds the partials in split order 0, 1, ...
        (its own included, read back like the others) whichever split it is, so the sum does
        not depend on the order of arrival: results are deterministic. It then sets the
        counter back to 0, so every launch leaves all counters at 0 (see ``tile_counters``).
        Nothing waits or spins: a program that is not last just exits.

        Memory ordering (PTX memory model). Producer side: every thread of the program stores
        part of the tile, but a scalar atomic is executed by one thread. The ``debug_barrier``
        (``bar.sync``) orders all the program's stores before that thread's atomic, and the
        atomic's release half (``acq_rel``, gpu scope) is cumulative: it publishes the stores
        ordered before it through the barrier, not only its own thread's (the pattern of
        CUTLASS's split-K semaphore: ``__syncthreads()``, then one thread's release). Consumer
        side: the last program's atomic reads a value written by the release of every other
        split (an RMW chain on one counter), so its acquire half synchronizes with all of
        them; Triton hands the atomic's result to the program's other threads through shared
        memory and a ``bar.sync``, which orders their loads after the acquire. The loads use
        ``.cg`` (cache in L2, not L1), so no stale L1 line could be hit even if the acquire did
        not invalidate L1; the partials are read once anyway. The counter is reset by a plain
        store: no other program touches it again in this launch, and the end of the launch
        publishes it to the next one.
        """
        mask = (rows < m_total)[:, None] & (cols < n_total)[None, :]
        splits = tl.num_programs(2)
        stride = m_total.to(tl.int64) * n_total
        tile = partial_ptr + rows[:, None].to(tl.int64) * n_total + cols[None, :]
        tl.store(tile + tl.program_id(2).to(tl.int64) * stride, acc, mask=mask)
        tl.debug_barrier()
        counter = counter_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == splits - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for split in range(0, splits):
                total += tl.load(tile + split * stride, mask=mask, other=0.0,
                                 cache_modifier=".cg")
            tl.store(counter, 0)
            epilogue(total, rows, cols, m_total, rows_per_item, n_total, bias_ptr, temb_ptr,
                     res_ptr, out_ptr, sres_b, sres_n, sres_p, out_scale, HAS_BIAS, HAS_TEMB,
                     HAS_RESIDUAL)

    # Grid: (M tiles, N tiles, splits), M tiles first so that the programs reading one block
    # of ``b`` (the weight, the bytes that matter) start together and share it through L2.
    # The row count follows the mask: not specialised on, so a new mask does not recompile.
    @triton.jit(do_not_specialize=["m_total", "rows_per_item"])
    def _gemm_kernel(a_ptr, b_ptr, bias_ptr, temb_ptr, res_ptr, out_ptr, partial_ptr,
                     counter_ptr, m_total, n_total, k_total, rows_per_item, sa_m, sa_k, sb_k,
                     sb_n, sres_b, sres_n, sres_p, out_scale, HAS_BIAS: tl.constexpr,
                     HAS_TEMB: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr):
        wait_for_previous_kernel(PDL)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < m_total
        col_ok = cols < n_total
        # This program's share of the K steps.
        k_steps = tl.cdiv(k_total, BLOCK_K)
        per_split = tl.cdiv(k_steps, tl.num_programs(2))
        k_begin = tl.program_id(2) * per_split
        k_end = tl.minimum(k_begin + per_split, k_steps)
        ks = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + rows[:, None].to(tl.int64) * sa_m
        b_cols = b_ptr + cols[None, :].to(tl.int64) * sb_n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(k_begin, k_end):
            k = step * BLOCK_K + ks
            k_ok = k < k_total
            a = tl.load(a_rows + k[None, :] * sa_k, mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(b_cols + k[:, None] * sb_k, mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            # ieee: fp32 operands multiply in full fp32, not TF32 (fp16/bf16 are unaffected).
            acc = tl.dot(a, b, acc, input_precision="ieee")
        if SPLIT_K:
            split_k_finish(acc, rows, cols, m_total, rows_per_item, n_total, bias_ptr,
                           temb_ptr, res_ptr, out_ptr, partial_ptr, counter_ptr, sres_b, sres_n,
                           sres_p, out_scale, HAS_BIAS, HAS_TEMB, HAS_RESIDUAL)
        else:
            epilogue(acc, rows, cols, m_total, rows_per_item, n_total, bias_ptr, temb_ptr,
                     res_ptr, out_ptr, sres_b, sres_n, sres_p, out_scale, HAS_BIAS, HAS_TEMB,
                     HAS_RESIDUAL)


# Split-K tile counters: one zeroed int32 buffer per device, shared by every split-K launch
# (this GEMM's and the implicit conv's). Invariant: every launch leaves the counters it used at
# 0 (the last split of each output tile resets its counter), so launches need no memset:
# launches on one stream run one after another (and so do the kernels of a replayed CUDA graph,
# which bakes the buffer's address in), each finding the counters at 0. Limit: split-K launches
# running concurrently, on different streams (or graphs replayed on different streams), would
# share counters and corrupt each other; they would need one buffer per stream. The buffer is
# allocated on first use (the runtime warms up before capturing a CUDA graph, so that happens
# outside the capture) and replaced by a larger one when a launch needs more tiles; growing
# during a capture is refused (the allocation and its zeroing would be captured), so it starts
# generously large. Replaced buffers are kept alive: a captured graph may still address them.
MIN_TILE_COUNTERS = 4096
_tile_counter_buffers: dict[torch.device, list[torch.Tensor]] = {}


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's zeroed split-K counters, at least ``tiles`` of them (see above)."""
    buffers = _tile_counter_buffers.setdefault(device, [])
    if buffers and buffers[-1].numel() >= tiles:
        return buffers[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        have = buffers[-1].numel() if buffers else 0
        raise FiseditError(
            f"split-K needs {tiles} tile counters on {device}, {have} are allocated, and they "
            "cannot be allocated during CUDA graph capture; run the same GEMMs and convs once "
            "before capturing")
    size = max(MIN_TILE_COUNTERS, 1 << (tiles - 1).bit_length())
    buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
    return buffers[-1]


def gemm(a, b, bias=None, *, temb=None, residual=None, rows_per_item=None, out_scale=None,
         out=None, config: GemmConfig | None = None):
    """``gemm_reference`` in one Triton launch, into ``out`` (a new ``[M, N]`` without it).

    ``a`` and ``b`` may be strided (the runtime's ``b`` is a weight read K-fast: a packed conv
    weight or a linear's weight transposed); ``residual`` is read in place. ``config`` is
    ``launch_config``'s by default (which must not be None then). Split-K launches share the
    per-device tile counters (``tile_counters``): they must not run concurrently on different
    streams, and the first launch needing more counters than allocated must run before any
    CUDA graph capture. fp32 operands multiply in IEEE fp32 (no TF32).
    """
    _check(a, b, bias, temb, residual, rows_per_item, out)
    if not (HAS_TRITON and (a.is_cuda or INTERPRET)):
        raise FiseditError("gemm: the Triton kernel needs Triton and a CUDA tensor (or "
                           "TRITON_INTERPRET=1); use gemm_reference here")
    tensors = [t for t in (a, b, bias, temb, residual, out) if t is not None]
    if any(t.device != a.device for t in tensors):
        raise FiseditError(f"gemm: every tensor must be on {a.device}, got "
                           f"{sorted({str(t.device) for t in tensors})}")
    m, k = a.shape
    n = b.shape[1]
    if out is None:
        out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        raise FiseditError("gemm: K is 0; the product of an empty reduction is not launched")
    if config is None:
        config = launch_config(m, n, k, a.dtype, a.device)
        if config is None:
            raise FiseditError(f"gemm: no launch configuration for {a.dtype} [{m}, {k}] @ "
                               f"[{k}, {n}] on {a.device}; use cuBLAS (torch.mm) there")
    rows_per_item = max(m, 1) if rows_per_item is None else rows_per_item
    if residual is not None and residual.dim() == 2:
        residual = residual.t()[None]            # [1, N, M]: the rows are one item's pixels
    res_strides = residual.stride() if residual is not None else (0, 0, 0)
    m_tiles, n_tiles = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n)
    partial = counters = None
    if config.splits > 1:
        partial = torch.empty((config.splits, m, n), dtype=torch.float32, device=a.device)
        counters = tile_counters(a.device, m_tiles * n_tiles)
    temb = temb.contiguous() if temb is not None else None
    try:
        _gemm_kernel[(m_tiles, n_tiles, config.splits)](
            a, b, bias, temb, residual, out, partial, counters, m, n, k, rows_per_item,
            *a.stride(), *b.stride(), *res_strides,
            1.0 if out_scale is None else float(out_scale),   # multiplying by 1.0 is exact
            HAS_BIAS=bias is not None, HAS_TEMB=temb is not None,
            HAS_RESIDUAL=residual is not None, SPLIT_K=config.splits > 1,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            num_warps=config.warps, num_stages=config.stages, **launch_options(a))
    except BaseException:
        # The interpreter can fail partway through a launch, leaving some counters raised.
        if INTERPRET and counters is not None:
            counters.zero_()
        raise
    return out
