"""Group norm of a compact tensor as a per-(batch, channel) affine map (DESIGN sections 3, 5).

The group norm of the mixed tensor, restricted to the active positions, is
``x * scale[b, c] + shift[b, c]`` where ``x`` is the compact new input ``[B, C, P]``. The
statistics behind ``scale`` and ``shift`` follow ``sparse_ops.sparse_group_norm``:

* ``incremental`` (exact): the recorded per-tile sums minus the recorded sums of the active
  tiles plus the new sums over ``x``, all of values shifted by the recorded mean;
* ``cached``: the recorded mean and variance.

Splitting the op this way lets the cheap pointwise part (``group_norm_apply``, optionally with
SiLU) fuse into a consumer, while ``group_norm_scale_shift`` does the one reduction over ``x``.
The Triton reduction is deterministic: fixed per-program partial sums, then a tiny finish
kernel, with no atomics and no host synchronisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import FiseditError
from . import HAS_TRITON, INTERPRET

POLICIES = ("incremental", "cached")

# Elements one program of the reduction or of the apply kernel handles at once: a register-sized
# block on the GPU; small under the interpreter so toy tests still split the work across programs.
_BLOCK_ELEMENTS = 256 if INTERPRET else 4096

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _partial_sums_kernel(x, mean, partial_sum, partial_sum_sq, positions, groups,
                             channels_per_group, splits, s_b, s_c, s_p,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (b * G + g, split): sums of x - mean[b, g] and of its square over the group's
        channels and one BLOCK_P slice of the positions."""
        batch_group = tl.program_id(0)
        split = tl.program_id(1)
        b = batch_group // groups
        g = batch_group % groups
        offs_p = split * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = offs_p < positions
        centre = tl.load(mean + batch_group)
        x += b * s_b + g * channels_per_group * s_c
        acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        acc_sq = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
        for c0 in range(0, channels_per_group, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = (offs_c < channels_per_group)[:, None] & p_mask[None, :]
            values = tl.load(x + offs_c[:, None] * s_c + offs_p[None, :] * s_p, mask=mask,
                             other=0.0).to(tl.float32)
            shifted = tl.where(mask, values - centre, 0.0)
            acc += shifted
            acc_sq += shifted * shifted
        tl.store(partial_sum + batch_group * splits + split, tl.sum(acc))
        tl.store(partial_sum_sq + batch_group * splits + split, tl.sum(acc_sq))

    @triton.jit
    def _sum_pair(first, second, index, length, GATHER: tl.constexpr, BLOCK: tl.constexpr):
        """Sums of ``first[i]`` and ``second[i]`` over i < length, or over i = index[j] for
        j < length with GATHER."""
        total_first = tl.zeros([BLOCK], tl.float32)
        total_second = tl.zeros([BLOCK], tl.float32)
        for start in range(0, length, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < length
            if GATHER:
                offs = tl.load(index + offs, mask=mask, other=0)
            total_first += tl.load(first + offs, mask=mask, other=0.0)
            total_second += tl.load(second + offs, mask=mask, other=0.0)
        return tl.sum(total_first), tl.sum(total_second)

    @triton.jit
    def _finish_kernel(partial_sum, partial_sum_sq, splits, tile_sum, tile_sum_sq, tile_count,
                       active_tiles, active_count, mean, variance, weight, bias, scale, shift,
                       groups, channels_per_group, count, eps,
                       INCREMENTAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program b * G + g: the group's mean and variance, then scale and shift of its
        channels."""
        batch_group = tl.program_id(0)
        group_mean = tl.load(mean + batch_group)
        if INCREMENTAL:
            new_sum, new_sum_sq = _sum_pair(partial_sum + batch_group * splits,
                                            partial_sum_sq + batch_group * splits,
                                            partial_sum, splits, False, BLOCK)
            tile_sum += batch_group * tile_count
            tile_sum_sq += batch_group * tile_count
            all_sum, all_sum_sq = _sum_pair(tile_sum, tile_sum_sq, active_tiles, tile_count,
                                            False, BLOCK)
            old_sum, old_sum_sq = _sum_pair(tile_sum, tile_sum_sq, active_tiles, active_count,
                                            True, BLOCK)
            offset = (all_sum - old_sum + new_sum) / count
            group_var = (all_sum_sq - old_sum_sq + new_sum_sq) / count - offset * offset
            group_mean += offset
        else:
            group_var = tl.load(variance + batch_group)
        rstd = 1.0 / tl.sqrt(group_var + eps)
        first_channel = (batch_group % groups) * channels_per_group
        row = (batch_group // groups) * groups * channels_per_group
        for c0 in range(0, channels_per_group, BLOCK_C):
            offs_c = first_channel + c0 + tl.arange(0, BLOCK_C)
            c_mask = c0 + tl.arange(0, BLOCK_C) < channels_per_group
            channel_scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
            if HAS_WEIGHT:
                channel_scale *= tl.load(weight + offs_c, mask=c_mask).to(tl.float32)
            channel_shift = -group_mean * channel_scale
            if HAS_BIAS:
                channel_shift += tl.load(bias + offs_c, mask=c_mask).to(tl.float32)
            tl.store(scale + row + offs_c, channel_scale, mask=c_mask)
            tl.store(shift + row + offs_c, channel_shift, mask=c_mask)

    @triton.jit
    def _apply_kernel(x, scale, shift, out, channels, positions, s_b, s_c, s_p, so_b, so_c, so_p,
                      SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (p block, c block, b): out = x * scale + shift (then SiLU), in fp32."""
        b = tl.program_id(2)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        c_mask = offs_c < channels
        mask = c_mask[:, None] & (offs_p < positions)[None, :]
        values = tl.load(x + b * s_b + offs_c[:, None] * s_c + offs_p[None, :] * s_p, mask=mask,
                         other=0.0).to(tl.float32)
        channel_scale = tl.load(scale + b * channels + offs_c, mask=c_mask, other=0.0)
        channel_shift = tl.load(shift + b * channels + offs_c, mask=c_mask, other=0.0)
        y = values * channel_scale[:, None] + channel_shift[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out + b * so_b + offs_c[:, None] * so_c + offs_p[None, :] * so_p,
                 y.to(out.dtype.element_ty), mask=mask)


def _check_scale_shift(x, stats, active_tiles, groups, weight, bias, policy):
    if policy not in POLICIES:
        raise FiseditError(f"group norm: policy must be one of {POLICIES}, got {policy!r}")
    if x.dim() != 3:
        raise FiseditError(f"group norm: x must be compact [B, C, P], got {tuple(x.shape)}")
    batch, channels, _ = x.shape
    if channels % groups:
        raise FiseditError(f"group norm: {channels} channels do not split into {groups} groups")
    needed = ("mean", "variance") if policy == "cached" else ("mean", "tile_sum", "tile_sum_sq")
    for key in needed:
        if key not in stats:
            raise FiseditError(f"group norm: the {policy!r} policy needs stats[{key!r}]")
        if stats[key].shape[:2] != (batch, groups):
            raise FiseditError(f"group norm: stats[{key!r}] is {tuple(stats[key].shape)}, "
                               f"expected [B={batch}, G={groups}, ...]")
    if policy == "incremental" and (active_tiles.dim() != 1
                                    or active_tiles.dtype.is_floating_point):
        raise FiseditError("group norm: active_tiles must be a 1-D integer tensor of tile ids")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and param.shape != (channels,):
            raise FiseditError(f"group norm: {name} must be [C={channels}], "
                               f"got {tuple(param.shape)}")


def group_norm_scale_shift_reference(x, stats, active_tiles, count, groups, weight, bias, eps,
                                     policy):
    """fp32 ``scale, shift [B, C]`` with group_norm(mixed)[active] == x * scale + shift.

    ``stats`` is ``sparse_ops.group_norm_stats`` of the recorded input; ``active_tiles`` the
    active tile ids (row-major in the level's tile grid); ``count`` the elements of one group of
    the full level, (C // G) * H * W.
    """
    _check_scale_shift(x, stats, active_tiles, groups, weight, bias, policy)
    batch, channels, _ = x.shape
    mean = stats["mean"]
    if policy == "cached":
        variance = stats["variance"]
    else:
        shifted = x.float().reshape(batch, groups, -1) - mean[:, :, None]
        tile_sum, tile_sum_sq = stats["tile_sum"], stats["tile_sum_sq"]
        sums = tile_sum.sum(-1) - tile_sum[:, :, active_tiles].sum(-1) + shifted.sum(-1)
        sums_sq = (tile_sum_sq.sum(-1) - tile_sum_sq[:, :, active_tiles].sum(-1)
                   + (shifted * shifted).sum(-1))
        offset = sums / count
        mean = mean + offset
        variance = sums_sq / count - offset * offset
    per_group = channels // groups
    scale = torch.rsqrt(variance + eps).repeat_interleave(per_group, dim=1)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


def group_norm_scale_shift(x, stats, active_tiles, count, groups, weight, bias, eps, policy):
    """Triton version of ``group_norm_scale_shift_reference``; ``x`` may be strided (e.g. a
    channels-last view). Two launches for ``incremental`` (partial sums, finish), one for
    ``cached``."""
    _check_scale_shift(x, stats, active_tiles, groups, weight, bias, policy)
    batch, channels, positions = x.shape
    per_group = channels // groups
    incremental = policy == "incremental"
    mean = stats["mean"].float().contiguous()
    block_c = min(triton.next_power_of_2(per_group), 64)
    block_p = max(16, _BLOCK_ELEMENTS // block_c)
    splits = max(1, triton.cdiv(positions, block_p))
    scale = torch.empty(batch, channels, dtype=torch.float32, device=x.device)
    shift = torch.empty_like(scale)
    if incremental:
        partial_sum, partial_sum_sq = torch.empty(2, batch * groups, splits, dtype=torch.float32,
                                                  device=x.device)
        _partial_sums_kernel[(batch * groups, splits)](
            x, mean, partial_sum, partial_sum_sq, positions, groups, per_group, splits,
            *x.stride(), BLOCK_C=block_c, BLOCK_P=block_p)
        tile_sum = stats["tile_sum"].float().contiguous()
        tile_sum_sq = stats["tile_sum_sq"].float().contiguous()
        variance = mean  # unused by the incremental finish
    else:
        # The cached finish reads only mean and variance; the rest are placeholders.
        partial_sum = partial_sum_sq = tile_sum = tile_sum_sq = active_tiles = mean
        variance = stats["variance"].float().contiguous()
    _finish_kernel[(batch * groups,)](
        partial_sum, partial_sum_sq, splits, tile_sum, tile_sum_sq, tile_sum.shape[-1],
        active_tiles, active_tiles.numel(), mean, variance,
        scale if weight is None else weight, scale if bias is None else bias, scale, shift,
        groups, per_group, count, eps,
        INCREMENTAL=incremental, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK=64 if INTERPRET else 256, BLOCK_C=block_c)
    return scale, shift


def _check_apply(x, scale, shift):
    if x.dim() != 3 or scale.shape != x.shape[:2] or shift.shape != x.shape[:2]:
        raise FiseditError(f"group norm apply: x must be [B, C, P] and scale, shift [B, C]; got "
                           f"{tuple(x.shape)}, {tuple(scale.shape)}, {tuple(shift.shape)}")


def group_norm_apply_reference(x, scale, shift, silu=False):
    """``x * scale[b, c] + shift[b, c]`` in fp32 (then SiLU), returned in x's dtype."""
    _check_apply(x, scale, shift)
    y = x.float() * scale[:, :, None] + shift[:, :, None]
    return (F.silu(y) if silu else y).to(x.dtype)


def group_norm_apply(x, scale, shift, silu=False):
    """Triton version of ``group_norm_apply_reference``; the output keeps x's memory layout
    (``empty_like``), so a channels-last input gives a channels-last output."""
    _check_apply(x, scale, shift)
    batch, channels, positions = x.shape
    out = torch.empty_like(x)
    block_p = min(max(16, triton.next_power_of_2(positions)), 128)
    block_c = max(1, _BLOCK_ELEMENTS // block_p)
    grid = (triton.cdiv(positions, block_p), triton.cdiv(channels, block_c), batch)
    _apply_kernel[grid](x, scale.float().contiguous(), shift.float().contiguous(), out, channels,
                        positions, *x.stride(), *out.stride(),
                        SILU=silu, BLOCK_C=block_c, BLOCK_P=block_p)
    return out
