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
(batch, group) sums its group's slice of ``x`` (incremental statistics), finishes the
statistics, then writes the output, from registers for the slice's first block (all of it on
a small edit) and reading the rest again (from L2). A U-Net step runs dozens of group norms,
each too small to fill the GPU, so the launches rather than the bytes bound them. The reduction is
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

# Elements of x a program holds at once: register-sized on the GPU; small under the
# interpreter so toy tests still loop over several blocks.
_BLOCK_ELEMENTS = 128 if INTERPRET else 4096
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
    def _split_index(e, channels_per_group, positions, CHANNEL_FAST: tl.constexpr):
        """(channel, position) of the group's flattened elements ``e``: channel-fast order for a
        channel-fast tensor, position-fast otherwise, so neighbouring elements are neighbours
        in memory."""
        if CHANNEL_FAST:
            channel = e % channels_per_group
            position = e // channels_per_group
        else:
            channel = e // positions
            position = e % positions
        return channel, position

    @triton.jit
    def _load_block(x, start, elements, channels_per_group, positions, s_c, s_p,
                    CHANNEL_FAST: tl.constexpr, BLOCK: tl.constexpr):
        """The group's elements ``[start, start + BLOCK)``: their channel, position, whether
        they are in the group, and their values in fp32."""
        e = start + tl.arange(0, BLOCK)
        channel, position = _split_index(e, channels_per_group, positions, CHANNEL_FAST)
        in_group = e < elements
        values = tl.load(x + channel * s_c + position * s_p, mask=in_group,
                         other=0.0).to(tl.float32)
        return channel, position, in_group, values

    @triton.jit
    def _channel_add(add, add_bias, channel, mask, HAS_ADD: tl.constexpr,
                     HAS_ADD_BIAS: tl.constexpr):
        """What is added to the elements of ``channel`` before the norm, in fp32 (zero if
        nothing)."""
        total = tl.zeros(channel.shape, tl.float32)
        if HAS_ADD:
            total += tl.load(add + channel, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD_BIAS:
            total += tl.load(add_bias + channel, mask=mask, other=0.0).to(tl.float32)
        return total

    @triton.jit
    def _affine(weight, bias, channel, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
        """The norm's weight and bias at ``channel``, in fp32 (one and zero without them)."""
        channel_weight = tl.full(channel.shape, 1.0, tl.float32)
        channel_bias = tl.zeros(channel.shape, tl.float32)
        if HAS_WEIGHT:
            channel_weight = tl.load(weight + channel, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            channel_bias = tl.load(bias + channel, mask=mask, other=0.0).to(tl.float32)
        return channel_weight, channel_bias

    @triton.jit
    def _recorded_sums(tile_sum, tile_sum_sq, active_tiles, tile_count, active_count,
                       BLOCK: tl.constexpr):
        """The recorded sums (and sums of squares) of every tile minus those of the active
        tiles ``active_tiles[:active_count]``, as the reference computes them. The first block
        of each is loaded before any loop, with nothing waiting on it in between, so its loads
        overlap the caller's."""
        offs = tl.arange(0, BLOCK)
        every = offs < tile_count
        active = offs < active_count
        ids = tl.load(active_tiles + offs, mask=active, other=0)
        all_sum = tl.load(tile_sum + offs, mask=every, other=0.0)
        all_sum_sq = tl.load(tile_sum_sq + offs, mask=every, other=0.0)
        old_sum = tl.load(tile_sum + ids, mask=active, other=0.0)
        old_sum_sq = tl.load(tile_sum_sq + ids, mask=active, other=0.0)
        for start in range(BLOCK, tile_count, BLOCK):
            more = start + tl.arange(0, BLOCK)
            all_sum += tl.load(tile_sum + more, mask=more < tile_count, other=0.0)
            all_sum_sq += tl.load(tile_sum_sq + more, mask=more < tile_count, other=0.0)
        for start in range(BLOCK, active_count, BLOCK):
            more = start + tl.arange(0, BLOCK)
            more_ids = tl.load(active_tiles + more, mask=more < active_count, other=0)
            old_sum += tl.load(tile_sum + more_ids, mask=more < active_count, other=0.0)
            old_sum_sq += tl.load(tile_sum_sq + more_ids, mask=more < active_count, other=0.0)
        return tl.sum(all_sum) - tl.sum(old_sum), tl.sum(all_sum_sq) - tl.sum(old_sum_sq)

    @triton.jit
    def _normalize(out, values, added, channel_weight, channel_bias, channel, position, mask,
                   group_mean, rstd, so_c, so_p, SILU: tl.constexpr):
        """Store ``(values + added) * scale + shift`` (then SiLU), the add folded into the
        shift as the reference folds it."""
        scale = channel_weight * rstd
        shift = channel_bias - group_mean * scale + added * scale
        y = values * scale + shift
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out + channel * so_c + position * so_p, y.to(out.dtype.element_ty), mask=mask)

    # The number of positions and of active tiles change with every mask: not specialising on
    # them keeps a new mask from compiling the kernel again.
    @triton.jit(do_not_specialize=["positions", "active_count"])
    def _group_norm_kernel(x, out, mean, variance, tile_sum, tile_sum_sq, tile_count,
                           active_tiles, active_count, active_counts, weight, bias, add, add_bias,
                           groups, channels_per_group, positions, count, eps, s_b, s_c, s_p,
                           so_b, so_c, so_p, INCREMENTAL: tl.constexpr, COUNTED: tl.constexpr,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_ADD: tl.constexpr, HAS_ADD_BIAS: tl.constexpr, SILU: tl.constexpr,
                           CHANNEL_FAST: tl.constexpr, BLOCK: tl.constexpr,
                           BLOCK_T: tl.constexpr, PDL: tl.constexpr):
        """Program b * G + g: the group's mean and variance, then
        ``out = x * scale[b, c] + shift[b, c]`` (then SiLU) over the group's channels and
        positions, in fp32. With HAS_ADD, ``x`` stands for ``x + add[b, c]`` throughout, and
        with HAS_ADD_BIAS for ``x + add_bias[c]``.

        The group's (channel, position) elements are taken ``BLOCK`` at a time in one flat
        index (no lanes lost to a channel count that is not a power of two). Incremental
        statistics sum ``x - mean`` and its square over them and add the recorded sums of the
        inactive tiles (all tiles minus the active ones, as the reference does). With COUNTED
        the sums cover only the first ``active_counts[0]`` positions and ``active_counts[1]``
        tiles (a padded plan's); the output covers every position.

        The first block is apart: a small edit's group fits in one block, whose values, adds,
        norm weight and bias and recorded tile sums are all loaded before anything waits on
        them, and which is normalised from registers (two dependent round trips to memory,
        the tile ids then the tiles they name, three for a padded plan, whose active tile
        count is read first; a loop per phase made five or more).
        Measured on SD1.5 at 5% (benchmarks/RESULTS.md, session 29) that took the step's 61
        norms from 0.363 to 0.356 ms only: the chain of round trips is not what bounds them."""
        wait_for_previous_kernel(PDL)
        batch_group = tl.program_id(0)
        summed_positions = positions
        if COUNTED:
            summed_positions = tl.load(active_counts)
            active_count = tl.load(active_counts + 1)
        batch = batch_group // groups
        first_channel = (batch_group % groups) * channels_per_group
        x += batch * s_b + first_channel * s_c
        out += batch * so_b + first_channel * so_c
        add += batch * groups * channels_per_group + first_channel
        add_bias += first_channel
        weight += first_channel
        bias += first_channel
        elements = channels_per_group * positions
        channel, position, in_group, values = _load_block(
            x, 0, elements, channels_per_group, positions, s_c, s_p, CHANNEL_FAST, BLOCK)
        added = _channel_add(add, add_bias, channel, in_group, HAS_ADD, HAS_ADD_BIAS)
        channel_weight, channel_bias = _affine(weight, bias, channel, in_group, HAS_WEIGHT,
                                               HAS_BIAS)
        group_mean = tl.load(mean + batch_group)
        if INCREMENTAL:
            recorded_sum, recorded_sum_sq = _recorded_sums(
                tile_sum + batch_group * tile_count, tile_sum_sq + batch_group * tile_count,
                active_tiles, tile_count, active_count, BLOCK_T)
            counted = in_group & (position < summed_positions)
            shifted = tl.where(counted, values + added - group_mean, 0.0)
            acc = shifted
            acc_sq = shifted * shifted
            for start in range(BLOCK, elements, BLOCK):
                more_channel, more_position, more_in_group, more_values = _load_block(
                    x, start, elements, channels_per_group, positions, s_c, s_p, CHANNEL_FAST,
                    BLOCK)
                more_counted = more_in_group & (more_position < summed_positions)
                more_added = _channel_add(add, add_bias, more_channel, more_counted, HAS_ADD,
                                          HAS_ADD_BIAS)
                more_shifted = tl.where(more_counted, more_values + more_added - group_mean, 0.0)
                acc += more_shifted
                acc_sq += more_shifted * more_shifted
            offset = (recorded_sum + tl.sum(acc)) / count
            group_var = (recorded_sum_sq + tl.sum(acc_sq)) / count - offset * offset
            group_mean += offset
        else:
            group_var = tl.load(variance + batch_group)
        rstd = 1.0 / tl.sqrt(group_var + eps)
        _normalize(out, values, added, channel_weight, channel_bias, channel, position, in_group,
                   group_mean, rstd, so_c, so_p, SILU)
        for start in range(BLOCK, elements, BLOCK):
            more_channel, more_position, more_in_group, more_values = _load_block(
                x, start, elements, channels_per_group, positions, s_c, s_p, CHANNEL_FAST, BLOCK)
            more_weight, more_bias = _affine(weight, bias, more_channel, more_in_group,
                                             HAS_WEIGHT, HAS_BIAS)
            more_added = _channel_add(add, add_bias, more_channel, more_in_group, HAS_ADD,
                                      HAS_ADD_BIAS)
            _normalize(out, more_values, more_added, more_weight, more_bias, more_channel,
                       more_position, more_in_group, group_mean, rstd, so_c, so_p, SILU)


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
        HAS_ADD_BIAS=add_bias is not None, SILU=silu, CHANNEL_FAST=x.stride(1) < x.stride(2),
        BLOCK=_BLOCK_ELEMENTS, BLOCK_T=_BLOCK_TILES, num_warps=_NUM_WARPS, **launch_options(x))
    return out
