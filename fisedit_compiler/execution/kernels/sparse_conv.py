"""Sparse convolution over the active output pixels: a torch reference and a Triton kernel.

An edit recomputes a conv only at the active output pixels of its level. Each output pixel reads
a window of the conv input, which is *mixed* (docs/design.md, "Sparse ops"): new values at the active
positions of the source grid (the compact tensor ``x``), recorded values elsewhere, zeros in
the padding. The kernel reads that mixed input straight from ``x`` and ``recorded``, so the
dense mixed tensor is never built, and fuses what follows a conv in diffusers' ResnetBlock2D
into its store: bias, time-embedding add, residual add, multiply by ``out_scale``.

What precedes the conv (group norm, SiLU) is not fused into its loads: the runtime normalises
the compact input in one separate launch (``execution.triton_ops``), because redoing the affine
and SiLU per tap cost more than that pass (up to 1.9x on the 1280-channel convs,
benchmarks/RESULTS.md). A nearest upsample before a conv is a gather of the compact tensor
(``sparse_ops.upsample_gather``), so the conv's source grid is always its input grid.

``sparse_conv2d_reference`` is plain torch and the specification; ``sparse_conv2d`` is a GEMM
with M = batch x output pixels, N = output channels, K = taps x input channels, in one of two
methods. Both take the reference's arguments (the kernel adds ``packed_weight``) and check them
the same way.

* ``gather`` (the runtime's default): one Triton launch writes the mixed input's taps as a dense
  ``[M, K]`` matrix, cuBLAS multiplies it by the packed weight, and one more launch runs the
  epilogue. For few rows cuBLAS picks split-K kernels that stay near the weight-read time; on
  an H200 this measured 1.3-2.6x faster than the implicit method per conv at SD1.5's shapes at
  1-20% active (benchmarks/RESULTS.md, session 7).
* ``implicit``: one Triton implicit GEMM that gathers its A tiles itself. Small edits split K
  over several programs per output tile (split-K), still in one launch: each split stores an
  fp32 partial tile, and the last split to arrive at a tile (counted by an atomic per tile)
  adds all the partials in split order, so deterministically, and runs the epilogue. Its K
  loop is a chain of dependent loads (pixel, position, values) per step, which bounds it at
  8-80 us per conv on an H200 however small the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...checks import check_choice
from ...config import CONV_METHODS, KERNEL_DTYPES
from ...errors import FiseditError
from . import (HAS_TRITON, INTERPRET, autotune_options, launch_options, mix_positions,
               multiprocessors, triton_enabled)
from .recorded_shift import check_recorded_shift, shift_launch_args

_INT32_MAX = 2**31 - 1


# --- the specification ----------------------------------------------------------------------

def sparse_conv2d_reference(x, recorded, in_position, out_pixels, out_size, weight, bias=None, *,
                            stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), temb=None,
                            residual=None, out_scale=None):
    """The conv of the mixed input at the output pixels ``out_pixels``: ``[B, Cout, P_out]``.

    * ``x`` ``[B, Cin, P_in]``: new values at the active source pixels, in compact order;
      ``recorded`` ``[B, Cin, Hs, Ws]``: the recorded conv input (the source grid), same dtype;
      ``in_position`` ``[Hs * Ws]``: compact index of each source pixel, -1 where inactive.
    * ``out_pixels`` ``[P_out]``: flat index ``oy * Wo + ox`` of each output pixel to compute;
      ``out_size`` ``(Ho, Wo)`` must be the conv's output size.
    * ``padding`` is ``(top, bottom, left, right)``, zeros.
    * ``temb`` ``[B, Cout]``, ``residual`` ``[B, Cout, P_out]``, ``out_scale`` (float): added,
      added, multiplied after the bias, in that order.

    Computed in fp32 and returned in ``x.dtype`` (fp16, bf16 or fp32). Grouped convs
    (inferred from ``weight``'s shape) are supported here and not by the kernel. On CUDA an
    fp32 conv follows ``torch.backends.cudnn.allow_tf32`` (TF32 by default): turn it off to
    compare fp32 exactly.
    """
    groups = _check(x, recorded, in_position, out_pixels, out_size, weight, bias, stride, padding,
                    dilation, temb, residual)
    batch, channels, height, width = recorded.shape
    flat = mix_positions(x, recorded.reshape(batch, channels, height * width), in_position, 2)
    full = flat.reshape(batch, channels, height, width)
    top, bottom, left, right = padding
    full = F.pad(full.float(), (left, right, top, bottom))
    out = F.conv2d(full, weight.float(), None, stride, 0, dilation, groups)
    out = out.flatten(2).index_select(2, out_pixels.long())
    if bias is not None:
        out = out + bias.float()[None, :, None]
    if temb is not None:
        out = out + temb.float()[:, :, None]
    if residual is not None:
        out = out + residual.float()
    if out_scale is not None:
        out = out * out_scale
    return out.to(x.dtype)


def _check(x, recorded, in_position, out_pixels, out_size, weight, bias, stride, padding,
           dilation, temb, residual) -> int:
    """Validate the arguments shared by the reference and the kernel; return the conv's groups.

    Data-dependent properties (positions within ``x``, pixels within the output) are not
    checked: that would synchronize with the device.
    """
    def fail(message):
        raise FiseditError(f"sparse_conv2d: {message}")

    if x.dim() != 3 or recorded.dim() != 4:
        fail(f"x must be [B, Cin, P_in] and recorded [B, Cin, Hs, Ws], got {tuple(x.shape)} "
             f"and {tuple(recorded.shape)}")
    batch, channels, height, width = recorded.shape
    if tuple(x.shape[:2]) != (batch, channels):
        fail(f"x {tuple(x.shape)} and recorded {tuple(recorded.shape)} differ in batch or "
             "channels")
    if x.dtype not in KERNEL_DTYPES or recorded.dtype != x.dtype or weight.dtype != x.dtype:
        fail(f"x, recorded and weight must share one dtype of {KERNEL_DTYPES}, got "
             f"{x.dtype}, {recorded.dtype} and {weight.dtype}")
    for name, index in (("in_position", in_position), ("out_pixels", out_pixels)):
        if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
            fail(f"{name} must be a 1-D int32 or int64 tensor, got {index.dtype} "
                 f"{tuple(index.shape)}")
    if in_position.numel() != height * width:
        fail(f"in_position has {in_position.numel()} entries, the source grid "
             f"{height}x{width} has {height * width}")
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        fail(f"stride and dilation take 2 values, padding 4 (top, bottom, left, right); got "
             f"{stride}, {dilation}, {padding}")
    if weight.dim() != 4 or channels % weight.shape[1] or weight.shape[0] % (
            channels // weight.shape[1]):
        fail(f"weight {tuple(weight.shape)} does not fit {channels} input channels")
    groups = channels // weight.shape[1]
    c_out, _, kernel_h, kernel_w = weight.shape
    top, bottom, left, right = padding
    expected = tuple(
        (size + before + after - dil * (kernel - 1) - 1) // step + 1
        for size, before, after, dil, kernel, step in
        ((height, top, bottom, dilation[0], kernel_h, stride[0]),
         (width, left, right, dilation[1], kernel_w, stride[1])))
    if tuple(out_size) != expected:
        fail(f"out_size {tuple(out_size)} is not the conv's output size {expected}")
    tables = {"bias": (bias, (c_out,)), "temb": (temb, (batch, c_out)),
              "residual": (residual, (batch, c_out, out_pixels.numel()))}
    for name, (value, shape) in tables.items():
        if value is not None and tuple(value.shape) != shape:
            fail(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    return groups


# --- the Triton kernel ----------------------------------------------------------------------

def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight ``[Cout, Cin, kh, kw]`` as the kernel's B matrix ``[kh * kw * Cin, Cout]``.

    Row ``(ky * kw + kx) * Cin + c`` holds tap (ky, kx) of input channel c, so one tap's channel
    block is a run of rows. In memory the matrix is the weight in channels-last order (strides
    ``(1, kh * kw * Cin)``: each output channel's taps are contiguous), so that the engine's
    dense graph uses the same copy as its conv weight (``unpack_weight``). The runtime packs
    each conv's weight once and passes it as ``packed_weight``.
    """
    c_out, c_in, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w * c_in
    return weight.permute(0, 2, 3, 1).reshape(c_out, taps).contiguous().t()


def unpack_weight(packed: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """``pack_weight``'s matrix as the conv weight ``[Cout, Cin, kh, kw]`` it was packed from,
    in channels-last memory: a view, no copy."""
    taps, c_out = packed.shape
    kernel_h, kernel_w = kernel_size
    return packed.t().view(c_out, kernel_h, kernel_w, taps // (kernel_h * kernel_w)).permute(
        0, 3, 1, 2)


def _is_packed(packed: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``packed`` has ``pack_weight(weight)``'s shape, dtype and layout."""
    c_out, c_in, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w * c_in
    return (tuple(packed.shape) == (taps, c_out) and packed.dtype == weight.dtype
            and (c_out == 1 or packed.stride(1) == taps) and (taps == 1 or packed.stride(0) == 1))


if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import wait_for_previous_kernel
    from .recorded_shift import shifted

    def _configs():
        """One small tile in the interpreter (fast CPU tests); a handful to tune on the GPU.

        128 x 128 tiles never won in benchmarks/micro_sparse_conv.py on an H100 (the gathered A
        tile, not the tensor cores, bounds this kernel), so they were dropped: each config
        costs a compile per specialization."""
        if INTERPRET:
            return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})]
        shapes = [(32, 64, 64, 4, 3), (32, 128, 32, 4, 4), (64, 64, 32, 4, 4),
                  (64, 64, 64, 4, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps,
                              num_stages=stages) for m, n, k, warps, stages in shapes]

    @triton.jit
    def _tap_source(oy, ox, row_ok, tap, position_ptr, src_w, in_h, in_w, pad_top, pad_left,
                    KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                    DIL_H: tl.constexpr, DIL_W: tl.constexpr):
        """Where tap ``tap`` of each output pixel (oy, ox) reads: the source pixel (sy, sx)
        (0 in the padding), its compact position (-1 where inactive), and whether it lies
        inside the source grid (outside, the padding reads zeros)."""
        iy = oy * STRIDE_H - pad_top + (tap // KW) * DIL_H
        ix = ox * STRIDE_W - pad_left + (tap % KW) * DIL_W
        inside = row_ok & (iy >= 0) & (iy < in_h) & (ix >= 0) & (ix < in_w)
        sy = tl.where(inside, iy, 0)
        sx = tl.where(inside, ix, 0)
        position = tl.load(position_ptr + sy * src_w + sx, mask=inside, other=-1).to(tl.int32)
        return sy, sx, position, inside

    @triton.jit
    def _mixed_values(x_tap, rec_tap, position, inside, channel, c_ok, sx_c, sr_c):
        """A ``[rows, channels]`` tile of the mixed input: the new value (``x_tap`` + channel)
        where the source pixel is active, the recorded one (``rec_tap`` + channel) where it is
        not, zeros in the padding."""
        new_mask = (position >= 0)[:, None] & c_ok[None, :]
        value = tl.load(x_tap[:, None] + channel[None, :] * sx_c, mask=new_mask, other=0.0)
        recorded = tl.load(rec_tap[:, None] + channel[None, :] * sr_c,
                           mask=(inside & (position < 0))[:, None] & c_ok[None, :], other=0.0)
        return tl.where(new_mask, value.to(recorded.dtype), recorded)

    @triton.jit
    def _epilogue(acc, rows, cols, m_total, p_out, c_out, bias_ptr, temb_ptr, res_ptr, out_ptr,
                  sres_b, sres_c, sres_p, out_scale, HAS_BIAS: tl.constexpr,
                  HAS_TEMB: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """Bias, time embedding, residual and output scale on an fp32 ``[rows, cols]`` tile of
        the GEMM, stored to ``out`` ``[B, Cout, P_out]``."""
        row_ok = rows < m_total
        col_ok = cols < c_out
        mask = row_ok[:, None] & col_ok[None, :]
        batch = rows // p_out
        batch64 = batch.to(tl.int64)
        slot = rows % p_out
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_TEMB:
            acc += tl.load(temb_ptr + batch[:, None] * c_out + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            acc += tl.load(res_ptr + batch64[:, None] * sres_b + cols[None, :] * sres_c
                           + slot[:, None] * sres_p, mask=mask, other=0.0).to(tl.float32)
        acc = acc * out_scale
        # Channel-fast output (see sparse_conv2d): a row of the tile is one contiguous run.
        out = out_ptr + batch64[:, None] * c_out * p_out + slot[:, None] * c_out + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _split_k_finish(acc, rows, cols, m_total, p_out, c_out, bias_ptr, temb_ptr, res_ptr,
                        out_ptr, partial_ptr, counter_ptr, sres_b, sres_c, sres_p, out_scale,
                        HAS_BIAS: tl.constexpr, HAS_TEMB: tl.constexpr,
                        HAS_RESIDUAL: tl.constexpr):
        """Split-K, in the same launch: publish this split's fp32 partial tile; the last split
        of the output tile to arrive adds all the partials and runs the epilogue.

        Each split stores its tile to ``partial`` ``[split, M, Cout]`` and increments the
        tile's counter; the one that reads back ``splits - 1`` is last, so every other split's
        partial is stored. It adds the partials in split order 0, 1, ... (its own included,
        read back like the others) whichever split it is, so the sum does not depend on the
        order of arrival: results are deterministic. It then sets the counter back to 0, so
        every launch leaves all counters at 0 (see ``_tile_counters``). Nothing waits or
        spins: a program that is not last just exits.

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
        mask = (rows < m_total)[:, None] & (cols < c_out)[None, :]
        splits = tl.num_programs(2)
        stride = m_total.to(tl.int64) * c_out
        tile = partial_ptr + rows[:, None].to(tl.int64) * c_out + cols[None, :]
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
            _epilogue(total, rows, cols, m_total, p_out, c_out, bias_ptr, temb_ptr, res_ptr,
                      out_ptr, sres_b, sres_c, sres_p, out_scale, HAS_BIAS, HAS_TEMB,
                      HAS_RESIDUAL)

    # ``m_bucket`` (the power of two at or above B * P_out) is in the key and unused in the
    # body: tuning once per bucket, not per mask, keeps a new mask from re-tuning every conv.
    # The sizes that follow the mask (P_out, P_in) are not specialized on, so a new mask does
    # not recompile. Strides are: a channel stride of 1 (the channel-fast layout the runtime
    # uses) and batch and pixel strides divisible by 16 let Triton load each pixel's channels
    # as aligned contiguous vectors, which is what makes the gathered A tile cheap. The batch
    # strides follow the mask (P x C) but only their divisibility by 16 is specialized on, so
    # a mask costs at most one more compile per conv.
    #
    # Grid: (M tiles, N tiles, splits). With SPLIT_K each of the ``splits`` programs of an
    # output tile reduces its share of K and ``_split_k_finish`` completes the tile: the last
    # to arrive (``counter_ptr``, one int32 per tile, left at 0) sums the partials from
    # ``partial_ptr`` and runs the epilogue. Without it, the single program runs the epilogue.
    @triton.autotune(configs=_configs(), key=["c_in", "c_out", "KH", "KW", "m_bucket"],
                     **autotune_options())
    @triton.jit(do_not_specialize=["m_total", "p_out", "m_bucket"])
    def _sparse_conv2d_kernel(
            x_ptr, rec_ptr, shift_ptr, position_ptr, pixels_ptr, w_ptr, bias_ptr, temb_ptr, res_ptr, out_ptr, partial_ptr, counter_ptr,
            m_total, p_out, c_in, c_out, src_w, in_h, in_w, out_w, pad_top, pad_left, m_bucket,
            sx_b, sx_c, sx_p, sr_b, sr_c, sr_h, sr_w, sres_b, sres_c, sres_p, out_scale,
            KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
            DIL_H: tl.constexpr, DIL_W: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_TEMB: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr,
            SHIFTED: tl.constexpr, RECORDED_BYTES: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            PDL: tl.constexpr):
        wait_for_previous_kernel(PDL)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < m_total
        col_ok = cols < c_out
        batch = rows // p_out
        slot = rows % p_out
        # Offsets inside one batch item fit int32 (the wrapper checks); batch offsets may not.
        batch64 = batch.to(tl.int64)
        pixel = tl.load(pixels_ptr + slot, mask=row_ok, other=0).to(tl.int32)
        oy = pixel // out_w
        ox = pixel % out_w
        x_rows = x_ptr + batch64 * sx_b
        rec_rows = shifted(rec_ptr, shift_ptr, SHIFTED, RECORDED_BYTES) + batch64 * sr_b
        ks = tl.arange(0, BLOCK_K)
        # This program's share of the K steps (tap, channel block), in tap-major order.
        c_blocks = tl.cdiv(c_in, BLOCK_K)
        per_split = tl.cdiv(KH * KW * c_blocks, tl.num_programs(2))
        k_begin = tl.program_id(2) * per_split
        k_end = tl.minimum(k_begin + per_split, KH * KW * c_blocks)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tap in range(k_begin // c_blocks, tl.cdiv(k_end, c_blocks)):
            sy, sx, position, inside = _tap_source(oy, ox, row_ok, tap, position_ptr, src_w,
                                                   in_h, in_w, pad_top, pad_left, KW, STRIDE_H,
                                                   STRIDE_W, DIL_H, DIL_W)
            x_tap = x_rows + position * sx_p
            rec_tap = rec_rows + sy * sr_h + sx * sr_w
            first = tl.maximum(k_begin - tap * c_blocks, 0)
            last = tl.minimum(k_end - tap * c_blocks, c_blocks)
            for block in range(first, last):
                channel = block * BLOCK_K + ks
                c_ok = channel < c_in
                a = _mixed_values(x_tap, rec_tap, position, inside, channel, c_ok, sx_c, sr_c)
                w_rows = tap * c_in + channel
                b = tl.load(w_ptr + w_rows[:, None] + cols[None, :] * (KH * KW * c_in),
                            mask=c_ok[:, None] & col_ok[None, :], other=0.0)
                # ieee: fp32 operands multiply in full fp32, not TF32 (fp16/bf16 are unaffected).
                acc = tl.dot(a, b, acc, input_precision="ieee")
        if SPLIT_K:
            _split_k_finish(acc, rows, cols, m_total, p_out, c_out, bias_ptr, temb_ptr, res_ptr,
                            out_ptr, partial_ptr, counter_ptr, sres_b, sres_c, sres_p, out_scale,
                            HAS_BIAS, HAS_TEMB, HAS_RESIDUAL)
        else:
            _epilogue(acc, rows, cols, m_total, p_out, c_out, bias_ptr, temb_ptr, res_ptr,
                      out_ptr, sres_b, sres_c, sres_p, out_scale, HAS_BIAS, HAS_TEMB,
                      HAS_RESIDUAL)


    # The gather method (see ``sparse_conv2d``): the mixed input's taps as a dense A matrix
    # ``[M, KH * KW * Cin]`` for cuBLAS, then the epilogue in one more launch. Grid: (row
    # blocks, taps, channel blocks); the indexing is the implicit kernel's, per tap.
    @triton.jit(do_not_specialize=["m_total", "p_out"])
    def _gather_taps_kernel(
            x_ptr, rec_ptr, shift_ptr, position_ptr, pixels_ptr, a_ptr, m_total, p_out, c_in,
            src_w, in_h, in_w, out_w, pad_top, pad_left, sx_b, sx_c, sx_p, sr_b, sr_c, sr_h,
            sr_w, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
            DIL_H: tl.constexpr, DIL_W: tl.constexpr, SHIFTED: tl.constexpr,
            RECORDED_BYTES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
            PDL: tl.constexpr):
        wait_for_previous_kernel(PDL)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        tap = tl.program_id(1)
        channel = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows < m_total
        c_ok = channel < c_in
        batch64 = (rows // p_out).to(tl.int64)
        pixel = tl.load(pixels_ptr + rows % p_out, mask=row_ok, other=0).to(tl.int32)
        sy, sx, position, inside = _tap_source(pixel // out_w, pixel % out_w, row_ok, tap,
                                               position_ptr, src_w, in_h, in_w, pad_top,
                                               pad_left, KW, STRIDE_H, STRIDE_W, DIL_H, DIL_W)
        rec_ptr = shifted(rec_ptr, shift_ptr, SHIFTED, RECORDED_BYTES)
        a = _mixed_values(x_ptr + batch64 * sx_b + position * sx_p,
                          rec_ptr + batch64 * sr_b + sy * sr_h + sx * sr_w, position, inside,
                          channel, c_ok, sx_c, sr_c)
        k_total = tl.num_programs(1) * c_in
        tl.store(a_ptr + rows[:, None].to(tl.int64) * k_total + tap * c_in + channel[None, :],
                 a, mask=row_ok[:, None] & c_ok[None, :])

    @triton.jit(do_not_specialize=["m_total", "p_out"])
    def _epilogue_kernel(y_ptr, bias_ptr, temb_ptr, res_ptr, out_ptr, m_total, p_out, c_out,
                         sres_b, sres_c, sres_p, out_scale, HAS_BIAS: tl.constexpr,
                         HAS_TEMB: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """``_epilogue`` over the GEMM's result ``y`` ``[M, Cout]`` (in place when y is out)."""
        wait_for_previous_kernel(PDL)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < m_total)[:, None] & (cols < c_out)[None, :]
        acc = tl.load(y_ptr + rows[:, None].to(tl.int64) * c_out + cols[None, :], mask=mask,
                      other=0.0).to(tl.float32)
        _epilogue(acc, rows, cols, m_total, p_out, c_out, bias_ptr, temb_ptr, res_ptr, out_ptr,
                  sres_b, sres_c, sres_p, out_scale, HAS_BIAS, HAS_TEMB, HAS_RESIDUAL)


# Split-K tile counters: one zeroed int32 buffer per device, shared by every split-K launch.
# Invariant: every launch leaves the counters it used at 0 (the last split of each output tile
# resets its counter), so launches need no memset: launches on one stream run one after another
# (and so do the kernels of a replayed CUDA graph, which bakes the buffer's address in), each
# finding the counters at 0. Limit: split-K launches running concurrently, on different streams
# (or graphs replayed on different streams), would share counters and corrupt each other; they
# would need one buffer per stream. The buffer is allocated on first use (the runtime warms up
# before capturing a CUDA graph, so that happens outside the capture) and replaced by a larger
# one when a launch needs more tiles; growing during a capture is refused (the allocation and
# its zeroing would be captured), so it starts generously large. Replaced buffers are kept
# alive: a captured graph may still address them.
_MIN_TILE_COUNTERS = 4096
_tile_counter_buffers: dict[torch.device, list[torch.Tensor]] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's zeroed split-K counters, at least ``tiles`` of them (see above)."""
    buffers = _tile_counter_buffers.setdefault(device, [])
    if buffers and buffers[-1].numel() >= tiles:
        return buffers[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        have = buffers[-1].numel() if buffers else 0
        raise FiseditError(
            f"sparse_conv2d: split-K needs {tiles} tile counters on {device}, {have} are "
            "allocated, and they cannot be allocated during CUDA graph capture; run the same "
            "convs once before capturing")
    size = max(_MIN_TILE_COUNTERS, triton.next_power_of_2(tiles))
    buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
    return buffers[-1]


def _auto_split_k(m_total: int, c_out: int, k_total: int, device: torch.device) -> int:
    """Split K when the output alone gives too few programs to fill the GPU.

    Small edits have few output pixels and long reductions (Cin x taps up to 23k), so a few
    programs would walk the whole K serially. Splitting K over up to 16 programs per output
    tile fills the streaming multiprocessors; the partial sums cost an extra fp32 write and
    read of ``[split, M, Cout]``, small exactly when the split is large, and no extra launch
    (the last split of each tile to finish adds them, in the same kernel). A power of two keeps
    the number of distinct launches small; each split keeps at least 4 K steps of 64.
    """
    if INTERPRET:
        return 1
    programs = 2 * multiprocessors(device)
    tiles = triton.cdiv(m_total, 64) * triton.cdiv(c_out, 64)
    wanted = min(16, programs // tiles, k_total // 256)
    return 1 << (wanted.bit_length() - 1) if wanted > 1 else 1


def sparse_conv2d(x, recorded, in_position, out_pixels, out_size, weight, bias=None, *,
                  stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), temb=None, residual=None,
                  out_scale=None, packed_weight=None, split_k=None, method="implicit",
                  recorded_shift=None):
    """``sparse_conv2d_reference`` as a Triton kernel (see the module docstring).

    ``packed_weight`` is ``pack_weight(weight)``, packed once per conv by the runtime (packed
    here when omitted). ``split_k`` splits the reduction over that many programs per output
    tile; the last of them to finish adds their fp32 partial sums (in split order, so results
    are deterministic) and runs the epilogue, all in one launch. None chooses from the problem
    size (``_auto_split_k``). Split-K launches share per-device tile counters (see
    ``_tile_counters``): they must not run concurrently on different streams.

    Accumulates in fp32; fp32 inputs multiply in IEEE fp32 (no TF32), so the kernel matches
    the reference to rounding. Strided ``x``, ``recorded`` and ``residual`` are read in place;
    they are fastest channel-fast (``x`` and ``residual`` with strides ``(P * C, 1, C)``,
    ``recorded`` channels-last), and the output is channel-fast: ``[B, Cout, P_out]`` with
    strides ``(P_out * Cout, 1, Cout)``.
    No host synchronization, except that on CUDA the first call of each (channels, kernel
    size, dtypes, size bucket) autotunes: warm up before capturing a CUDA graph (which also
    allocates the split-K counters).

    ``method`` ``"implicit"`` runs the implicit GEMM above; ``"gather"`` writes the mixed
    input's taps as a dense ``[M, KH * KW * Cin]`` matrix (one launch), multiplies it by the
    packed weight with cuBLAS and runs the epilogue in a third launch (none when there is
    nothing but a bias in the activations' dtype, which cuBLAS adds); ``split_k`` applies to
    the implicit method only. The gather method's GEMM accumulates in fp32 but rounds the
    product to the output dtype before the epilogue adds to it, and an fp32 GEMM follows
    ``torch.backends.cuda.matmul.allow_tf32`` (off by default: full fp32).

    ``recorded_shift`` (``kernels.recorded_shift``): the recorded input is read that many
    bytes from ``recorded``'s address (a CUDA graph's static store standing for the step it
    replays); None reads ``recorded`` itself.
    """
    groups = _check(x, recorded, in_position, out_pixels, out_size, weight, bias, stride, padding,
                    dilation, temb, residual)
    check_choice("sparse_conv2d: method", method, CONV_METHODS)
    check_recorded_shift(recorded_shift, recorded, "sparse_conv2d")
    if method == "gather" and split_k is not None:
        raise FiseditError("sparse_conv2d: split_k applies to method='implicit' only (cuBLAS "
                           "splits the gather method's GEMM itself); pass split_k=None")
    if groups != 1:
        raise FiseditError(
            f"sparse_conv2d: the Triton kernel supports groups == 1 only, this conv has groups="
            f"{groups}; the runtime should use sparse_conv2d_reference for it")
    if not triton_enabled(x):
        raise FiseditError(
            "sparse_conv2d: the Triton kernel needs Triton and a CUDA tensor (or TRITON_INTERPRET=1"
            "); the runtime should use sparse_conv2d_reference here")
    batch, c_in, src_h, src_w = recorded.shape
    c_out, _, kernel_h, kernel_w = weight.shape
    packed = pack_weight(weight) if packed_weight is None else packed_weight
    if not _is_packed(packed, weight):
        raise FiseditError(
            f"sparse_conv2d: packed_weight must be pack_weight(weight), a {weight.dtype} "
            f"[{kernel_h * kernel_w * c_in}, {c_out}] tensor with strides "
            f"(1, {kernel_h * kernel_w * c_in}); got {packed.dtype} {tuple(packed.shape)} with "
            f"strides {packed.stride()}")
    tensors = [t for t in (x, recorded, in_position, out_pixels, packed, bias, temb, residual)
               if t is not None]
    if any(t.device != x.device for t in tensors):
        raise FiseditError(f"sparse_conv2d: every tensor must be on {x.device}, got "
                           f"{sorted({str(t.device) for t in tensors})}")
    p_out = out_pixels.numel()
    # In-kernel offsets within one batch item are int32; batch offsets are int64.
    spans = [sum((size - 1) * step for size, step in zip(t.shape[1:], t.stride()[1:]))
             for t in (x, recorded, residual) if t is not None]
    if max(spans + [c_out * p_out, packed.numel()]) > _INT32_MAX:
        raise FiseditError("sparse_conv2d: one batch item spans more than 2^31 elements; "
                           "split the channels or the image")
    # Channel-fast: each output pixel's channels are contiguous, so the kernel's stores and the
    # next conv's gathered loads (its ``x``) are contiguous vectors, not strided scalars.
    out = torch.empty((batch, p_out, c_out), dtype=x.dtype, device=x.device).transpose(1, 2)
    m_total = batch * p_out
    if m_total == 0:
        return out
    if method == "gather":
        _gather_conv(x, recorded, recorded_shift, in_position, out_pixels, out_size, packed,
                     bias, stride, padding, dilation, temb, residual, out_scale, out,
                     (kernel_h, kernel_w))
        return out
    splits = (_auto_split_k(m_total, c_out, packed.shape[0], x.device) if split_k is None
              else split_k)
    if not isinstance(splits, int) or splits < 1:
        raise FiseditError(f"sparse_conv2d: split_k must be a positive int, got {split_k!r}")
    partial = counters = None
    if splits > 1:
        partial = torch.empty((splits, m_total, c_out), dtype=torch.float32, device=x.device)
        # Enough counters for the grid of any config the autotuner may pick.
        tiles = max(triton.cdiv(m_total, config.kwargs["BLOCK_M"])
                    * triton.cdiv(c_out, config.kwargs["BLOCK_N"])
                    for config in _sparse_conv2d_kernel.configs)
        counters = _tile_counters(x.device, tiles)
    temb = temb.contiguous() if temb is not None else None
    res_strides = residual.stride() if residual is not None else (0, 0, 0)
    top, _, left, _ = padding
    out_scale = 1.0 if out_scale is None else float(out_scale)  # multiplying by 1.0 is exact
    grid = lambda meta: (triton.cdiv(m_total, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(c_out, meta["BLOCK_N"]), splits)
    shift, is_shifted, recorded_bytes = shift_launch_args(recorded_shift, recorded)
    try:
        _sparse_conv2d_kernel[grid](
            x, recorded, shift, in_position, out_pixels, packed, bias, temb, residual, out,
            partial, counters, m_total, p_out, c_in, c_out, src_w, src_h, src_w, out_size[1], top, left, triton.next_power_of_2(m_total),
            *x.stride(), *recorded.stride(), *res_strides, out_scale,
            KH=kernel_h, KW=kernel_w, STRIDE_H=stride[0], STRIDE_W=stride[1],
            DIL_H=dilation[0], DIL_W=dilation[1], HAS_BIAS=bias is not None, HAS_TEMB=temb is not None, HAS_RESIDUAL=residual is not None, SPLIT_K=splits > 1,
            SHIFTED=is_shifted, RECORDED_BYTES=recorded_bytes, **launch_options(x))
    except BaseException:
        # The interpreter can fail partway through a launch, leaving some counters raised.
        if INTERPRET and counters is not None:
            counters.zero_()
        raise
    return out


def _gather_conv(x, recorded, recorded_shift, in_position, out_pixels, out_size, packed, bias,
                 stride, padding, dilation, temb, residual, out_scale, out, kernel_size):
    """The ``"gather"`` method of ``sparse_conv2d``, into ``out`` (channel-fast, so its memory
    is the ``[M, Cout]`` GEMM result)."""
    batch, c_in, src_h, src_w = recorded.shape
    p_out, c_out = out_pixels.numel(), packed.shape[1]
    m_total = batch * p_out
    temb = temb.contiguous() if temb is not None else None
    taps = torch.empty((m_total, packed.shape[0]), dtype=x.dtype, device=x.device)
    block_m, block_c = (16, 16) if INTERPRET else (32, 64)
    grid = (triton.cdiv(m_total, block_m), kernel_size[0] * kernel_size[1],
            triton.cdiv(c_in, block_c))
    shift, is_shifted, recorded_bytes = shift_launch_args(recorded_shift, recorded)
    _gather_taps_kernel[grid](
        x, recorded, shift, in_position, out_pixels, taps, m_total, p_out, c_in, src_w, src_h,
        src_w, out_size[1], padding[0], padding[2], *x.stride(), *recorded.stride(),
        KW=kernel_size[1], STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0],
        DIL_W=dilation[1], SHIFTED=is_shifted, RECORDED_BYTES=recorded_bytes, BLOCK_M=block_m,
        BLOCK_C=block_c, **launch_options(x))
    result = out.transpose(1, 2).view(m_total, c_out)
    only_bias = temb is None and residual is None and out_scale is None
    if only_bias and bias is not None and bias.dtype == taps.dtype:
        torch.addmm(bias, taps, packed, out=result)
        return
    torch.mm(taps, packed, out=result)
    if only_bias and bias is None:
        return
    res_strides = residual.stride() if residual is not None else (0, 0, 0)
    block_m, block_n = (16, 16) if INTERPRET else (32, 128)
    grid = (triton.cdiv(m_total, block_m), triton.cdiv(c_out, block_n))
    _epilogue_kernel[grid](
        result, bias, temb, residual, result, m_total, p_out, c_out, *res_strides,
        1.0 if out_scale is None else out_scale, HAS_BIAS=bias is not None,
        HAS_TEMB=temb is not None, HAS_RESIDUAL=residual is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, **launch_options(x))
