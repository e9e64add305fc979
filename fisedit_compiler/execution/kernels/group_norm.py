"""Group norm of a compact tensor in one Triton launch (docs/design.md, "Sparse ops", "Kernels").

The group norm of the mixed tensor, restricted to the active positions, is
``x * scale[b, c] + shift[b, c]`` where ``x`` is the compact new input ``[B, C, P]``. The
statistics behind ``scale`` and ``shift`` follow ``sparse_ops.sparse_group_norm``:

* ``incremental`` (exact): the recorded per-tile sums minus the recorded sums of the active
  tiles plus the new sums over ``x``, all of values shifted by the recorded mean;
* ``cached``: the recorded mean and variance.

``add`` (``[B, C]``, optional) and ``add_bias`` (``[C]``, optional) are values added to ``x``
per batch item and channel, and per channel, before the norm: the time embedding a ResNet
block adds to its first conv's output and that conv's bias, which ``passes.fuse`` moves here
from the conv's epilogue (one launch fewer per block, and a GEMM with no bias to add).

``group_norm`` does both steps, and optionally a SiLU, in one launch: one program per
(batch, group) sums its group's slice of ``x``, finishes the statistics, then reads the slice
again (from L2) to write the output. A U-Net step runs dozens of group norms, each too small
to fill the GPU, so the launches rather than the bytes bound them. The reduction is
deterministic (a fixed order per program, no atomics) and needs no host synchronisation.

The torch specification is split the same way: ``group_norm_scale_shift_reference`` (the
affine) and ``group_norm_apply_reference`` (applying it); ``group_norm_reference`` composes
them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import FiseditError
from . import HAS_TRITON, INTERPRET, launch_options

POLICIES = ("incremental", "cached")

# Elements of x a program holds at once, and its widest channel block: register-sized on the
# GPU; small under the interpreter so toy tests still loop over several blocks.
_BLOCK_ELEMENTS = 128 if INTERPRET else 4096
_MAX_BLOCK_C = 8 if INTERPRET else 128
# Recorded tile sums summed at once (SD1.5 levels have 64 tiles).
_BLOCK_TILES = 8 if INTERPRET else 128
# The grid is only B * G programs (64 in SD1.5), each streaming a whole group: more warps per
# program keep more loads in flight.
_NUM_WARPS = 8

if HAS_TRITON:
    import triton
    import triton.language as tl

    from . import wait_for_previous_kernel

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
    def _channel_add(add, add_bias, offs_c, c_mask, HAS_ADD: tl.constexpr,
                     HAS_ADD_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
        """What is added to x's channels ``offs_c`` before the norm, in fp32 (zero if nothing)."""
        total = tl.zeros([BLOCK_C], tl.float32)
        if HAS_ADD:
            total += tl.load(add + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_ADD_BIAS:
            total += tl.load(add_bias + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        return total

    # The number of positions and of active tiles change with every mask: not specialising on
    # them keeps a new mask from compiling the kernel again.
    @triton.jit(do_not_specialize=["positions", "active_count"])
    def _group_norm_kernel(x, out, mean, variance, tile_sum, tile_sum_sq, tile_count,
                           active_tiles, active_count, active_counts, weight, bias, add, add_bias,
                           groups,
                           channels_per_group, positions, count, eps, s_b, s_c, s_p, so_b, so_c,
                           so_p, INCREMENTAL: tl.constexpr, COUNTED: tl.constexpr,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_ADD: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, SILU: tl.constexpr,
                           BLOCK_C: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr):
        """Program b * G + g: the group's mean and variance, then
        ``out = x * scale[b, c] + shift[b, c]`` (then SiLU) over the group's channels and
        positions, in fp32. With HAS_ADD, ``x`` stands for ``x + add[b, c]`` throughout, and
        with HAS_ADD_BIAS for ``x + add_bias[c]``.

        Incremental statistics sum ``x - mean`` and its square over the slice in
        ``[BLOCK_C, BLOCK_P]`` blocks and add the recorded sums of the inactive tiles
        (all tiles minus the active ones, as the reference does). With COUNTED the sums
        cover only the first ``active_counts[0]`` positions and ``active_counts[1]`` tiles (a
        padded plan's); the output covers every position."""
        wait_for_previous_kernel(PDL)
        batch_group = tl.program_id(0)
        summed_positions = positions
        if COUNTED:
            summed_positions = tl.load(active_counts)
            active_count = tl.load(active_counts + 1)
        first_channel = (batch_group % groups) * channels_per_group
        x += (batch_group // groups) * s_b + first_channel * s_c
        out += (batch_group // groups) * so_b + first_channel * so_c
        add += (batch_group // groups) * groups * channels_per_group + first_channel
        add_bias += first_channel
        group_mean = tl.load(mean + batch_group)
        if INCREMENTAL:
            acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
            acc_sq = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
            for c0 in range(0, channels_per_group, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_mask = offs_c < channels_per_group
                channel_add = _channel_add(add, add_bias, offs_c, c_mask, HAS_ADD, HAS_ADD_BIAS,
                                           BLOCK_C)
                for p0 in range(0, summed_positions, BLOCK_P):
                    offs_p = p0 + tl.arange(0, BLOCK_P)
                    mask = c_mask[:, None] & (offs_p < summed_positions)[None, :]
                    values = tl.load(x + offs_c[:, None] * s_c + offs_p[None, :] * s_p,
                                     mask=mask, other=0.0).to(tl.float32)
                    shifted = tl.where(mask, values + channel_add[:, None] - group_mean, 0.0)
                    acc += shifted
                    acc_sq += shifted * shifted
            tile_sum += batch_group * tile_count
            tile_sum_sq += batch_group * tile_count
            all_sum, all_sum_sq = _sum_pair(tile_sum, tile_sum_sq, active_tiles, tile_count,
                                            False, BLOCK_T)
            old_sum, old_sum_sq = _sum_pair(tile_sum, tile_sum_sq, active_tiles, active_count,
                                            True, BLOCK_T)
            offset = (all_sum - old_sum + tl.sum(acc)) / count
            group_var = (all_sum_sq - old_sum_sq + tl.sum(acc_sq)) / count - offset * offset
            group_mean += offset
        else:
            group_var = tl.load(variance + batch_group)
        rstd = 1.0 / tl.sqrt(group_var + eps)
        for c0 in range(0, channels_per_group, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            c_mask = offs_c < channels_per_group
            channel_scale = tl.full([BLOCK_C], 1.0, tl.float32) * rstd
            if HAS_WEIGHT:
                channel_scale *= tl.load(weight + first_channel + offs_c, mask=c_mask,
                                         other=0.0).to(tl.float32)
            channel_shift = -group_mean * channel_scale
            if HAS_BIAS:
                channel_shift += tl.load(bias + first_channel + offs_c, mask=c_mask,
                                         other=0.0).to(tl.float32)
            # (x + add) * scale + shift, with the add folded into the shift.
            channel_shift += _channel_add(add, add_bias, offs_c, c_mask, HAS_ADD, HAS_ADD_BIAS,
                                          BLOCK_C) * channel_scale
            for p0 in range(0, positions, BLOCK_P):
                offs_p = p0 + tl.arange(0, BLOCK_P)
                mask = c_mask[:, None] & (offs_p < positions)[None, :]
                values = tl.load(x + offs_c[:, None] * s_c + offs_p[None, :] * s_p, mask=mask,
                                 other=0.0).to(tl.float32)
                y = values * channel_scale[:, None] + channel_shift[:, None]
                if SILU:
                    y = y * tl.sigmoid(y)
                tl.store(out + offs_c[:, None] * so_c + offs_p[None, :] * so_p,
                         y.to(out.dtype.element_ty), mask=mask)


def _check_scale_shift(x, stats, active_tiles, groups, weight, bias, policy, add=None,
                       add_bias=None):
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
    if policy == "incremental":
        if stats["tile_sum"].dim() != 3 or stats["tile_sum_sq"].shape != stats["tile_sum"].shape:
            raise FiseditError(f"group norm: stats['tile_sum'] and stats['tile_sum_sq'] must "
                               f"both be [B, G, tiles], got {tuple(stats['tile_sum'].shape)} "
                               f"and {tuple(stats['tile_sum_sq'].shape)}")
        if active_tiles.dim() != 1 or active_tiles.dtype.is_floating_point:
            raise FiseditError("group norm: active_tiles must be a 1-D integer tensor of tile ids")
    for name, param in (("weight", weight), ("bias", bias), ("add_bias", add_bias)):
        if param is not None and param.shape != (channels,):
            raise FiseditError(f"group norm: {name} must be [C={channels}], "
                               f"got {tuple(param.shape)}")
    if add is not None and tuple(add.shape) != (batch, channels):
        raise FiseditError(f"group norm: add must be [B={batch}, C={channels}], got "
                           f"{tuple(add.shape)}")


def group_norm_scale_shift_reference(x, stats, active_tiles, count, groups, weight, bias, eps,
                                     policy, active_counts=None, add=None, add_bias=None):
    """``scale, shift [B, C]`` with group_norm(mixed)[active] == x * scale + shift, in the
    statistics' dtype (fp32; fp64 for a float64 U-Net).

    ``stats`` is ``sparse_ops.group_norm_stats`` of the recorded input; ``active_tiles`` the
    active tile ids (row-major in the level's tile grid); ``count`` the elements of one group of
    the full level, (C // G) * H * W. ``active_counts`` (int ``[positions, tiles]`` on x's
    device; a padded plan's) limits the sums to the first positions of ``x`` and the first
    ``active_tiles``: the rest repeat them. With ``add`` (``[B, C]``) the affine is that of
    ``x + add[:, :, None]``, applied to ``x``: the add is folded into ``shift``; ``add_bias``
    (``[C]``) likewise, as ``x + add_bias[None, :, None]``.
    """
    _check_scale_shift(x, stats, active_tiles, groups, weight, bias, policy, add, add_bias)
    batch, channels, positions = x.shape
    mean = stats["mean"]
    add = _total_add(add, add_bias, batch, mean.dtype)
    if policy == "cached":
        variance = stats["variance"]
    else:
        values = x.to(mean.dtype)
        if add is not None:
            values = values + add[:, :, None]
        shifted = values - mean.repeat_interleave(channels // groups, 1)[:, :, None]
        tile_sum, tile_sum_sq = stats["tile_sum"][:, :, active_tiles], \
            stats["tile_sum_sq"][:, :, active_tiles]
        if active_counts is not None:
            # Multiplying by 0/1 keeps a captured step free of data-dependent shapes.
            shifted = shifted * (torch.arange(positions, device=x.device) < active_counts[0])
            tile_sum = tile_sum * (torch.arange(tile_sum.shape[-1], device=x.device)
                                   < active_counts[1])
            tile_sum_sq = tile_sum_sq * (torch.arange(tile_sum.shape[-1], device=x.device)
                                         < active_counts[1])
        shifted = shifted.reshape(batch, groups, -1)
        sums = stats["tile_sum"].sum(-1) - tile_sum.sum(-1) + shifted.sum(-1)
        sums_sq = (stats["tile_sum_sq"].sum(-1) - tile_sum_sq.sum(-1)
                   + (shifted * shifted).sum(-1))
        offset = sums / count
        mean = mean + offset
        variance = sums_sq / count - offset * offset
    per_group = channels // groups
    scale = torch.rsqrt(variance + eps).repeat_interleave(per_group, dim=1)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    if add is not None:
        shift = shift + add.to(shift.dtype) * scale
    return scale, shift


def _total_add(add, add_bias, batch: int, dtype):
    """``add + add_bias`` as ``[B, C]`` in ``dtype``, or None where neither is given."""
    if add is None and add_bias is None:
        return None
    total = 0 if add is None else add.to(dtype)
    if add_bias is not None:
        total = total + add_bias.to(dtype).expand(batch, -1)
    return total


def _check_apply(x, scale, shift):
    if x.dim() != 3 or scale.shape != x.shape[:2] or shift.shape != x.shape[:2]:
        raise FiseditError(f"group norm apply: x must be [B, C, P] and scale, shift [B, C]; got "
                           f"{tuple(x.shape)}, {tuple(scale.shape)}, {tuple(shift.shape)}")


def group_norm_apply_reference(x, scale, shift, silu=False):
    """``x * scale[b, c] + shift[b, c]`` in scale's dtype (then SiLU), returned in x's dtype."""
    _check_apply(x, scale, shift)
    y = x.to(scale.dtype) * scale[:, :, None] + shift[:, :, None]
    return (F.silu(y) if silu else y).to(x.dtype)


def group_norm_reference(x, stats, active_tiles, count, groups, weight, bias, eps, policy,
                         silu=False, active_counts=None, add=None, add_bias=None):
    """The group norm of the mixed tensor at x's positions (then SiLU), in x's dtype: the
    affine of ``group_norm_scale_shift_reference`` applied by ``group_norm_apply_reference``
    (that of ``x + add[:, :, None] + add_bias[None, :, None]`` with ``add``, ``add_bias``)."""
    scale, shift = group_norm_scale_shift_reference(x, stats, active_tiles, count, groups,
                                                    weight, bias, eps, policy, active_counts, add,
                                                    add_bias)
    return group_norm_apply_reference(x, scale, shift, silu)


def group_norm(x, stats, active_tiles, count, groups, weight, bias, eps, policy, silu=False,
               active_counts=None, add=None, add_bias=None):
    """``group_norm_reference`` in one Triton launch. ``x`` may be strided (e.g. channel-fast,
    channel stride 1); the output keeps x's memory layout (``empty_like``)."""
    _check_scale_shift(x, stats, active_tiles, groups, weight, bias, policy, add, add_bias)
    batch, channels, positions = x.shape
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    per_group = channels // groups
    incremental = policy == "incremental"
    mean = stats["mean"].float().contiguous()
    if incremental:
        tile_sum = stats["tile_sum"].float().contiguous()
        tile_sum_sq = stats["tile_sum_sq"].float().contiguous()
        tile_count, active_count = tile_sum.shape[-1], active_tiles.numel()
        variance = mean                     # unread by the incremental statistics
    else:
        variance = stats["variance"].float().contiguous()
        # The cached statistics read no tile sums: placeholders.
        tile_sum = tile_sum_sq = active_tiles = mean
        tile_count = active_count = 0
    block_c = min(triton.next_power_of_2(per_group), _MAX_BLOCK_C)
    counted = incremental and active_counts is not None
    _group_norm_kernel[(batch * groups,)](
        x, out, mean, variance, tile_sum, tile_sum_sq, tile_count, active_tiles, active_count,
        active_counts if counted else mean,
        mean if weight is None else weight, mean if bias is None else bias,
        mean if add is None else add.contiguous(),
        mean if add_bias is None else add_bias.contiguous(), groups, per_group,
        positions, count, eps,
        *x.stride(), *out.stride(),
        INCREMENTAL=incremental, COUNTED=counted, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_ADD=add is not None,
        HAS_ADD_BIAS=add_bias is not None, SILU=silu, BLOCK_C=block_c,
        BLOCK_P=_BLOCK_ELEMENTS // block_c, BLOCK_T=_BLOCK_TILES,
        num_warps=_NUM_WARPS, **launch_options(x))
    return out
