"""The sparse ops of the edit graph, as torch reference implementations.

These are the functions ``passes.sparsify`` puts in the edit graph. Each works on *compact*
tensors: a positional tensor whose position dimensions (H, W) or (H*W) are replaced by one
dimension holding only the level's active positions, in the plan's compact order. They are the
reference path (CPU, and GPU without Triton) and the specification every Triton kernel is tested
against.

Recorded values come from the cache (``cache_read``); a tensor with recorded values outside the
active set and new values inside is called *mixed*.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from .. import ir
from .kernels import group_norm as group_norm_kernels
from .kernels import text_attention as text_attention_kernels
from .kernels import accumulation_dtype, mix_rows
from .kernels import tokens as token_kernels
from .plan import LevelPlan, MaskPlan


# --- cache access --------------------------------------------------------------------------

def cache_read(cache: dict, key: str):
    """The recorded value stored under ``key`` for this step."""
    return cache[key]


def cache_shift(cache: dict):
    """The byte distance, held on the device, from ``cache``'s values to those of the step
    they stand for (``kernels.recorded_shift``): set on a CUDA graph's static store
    (``StepStore.recorded_shift``), None for any other store."""
    return getattr(cache, "recorded_shift", None)


def cache_write(cache: dict, key: str, value) -> None:
    """Record ``value`` under ``key`` (record mode)."""
    cache[key] = value


torch.fx.node._side_effectful_functions.add(cache_write)


# --- moving between compact and dense -------------------------------------------------------

def gather_positions(full: torch.Tensor, level: LevelPlan, dims: tuple[int, ...]) -> torch.Tensor:
    """Compact tensor from a dense one: the active positions of ``dims``, in compact order."""
    flat = full.flatten(dims[0], dims[-1])
    return flat if level.dense else flat.index_select(dims[0], level.pixels)


def scatter_full(compact: torch.Tensor, recorded: torch.Tensor, level: LevelPlan,
                 dims: tuple[int, ...]) -> torch.Tensor:
    """The mixed dense tensor: ``recorded`` with its active positions replaced by ``compact``."""
    if level.dense:
        return compact.reshape(recorded.shape)
    flat = mix_rows(compact, recorded.flatten(dims[0], dims[-1]), level.pixels, dims[0])
    return flat.reshape(recorded.shape)


def compact_reshape(x: torch.Tensor, template: tuple, compact_dim: int) -> torch.Tensor:
    """Reshape a compact tensor; ``None`` in ``template`` stands for its number of positions."""
    count = x.shape[compact_dim]
    return x.reshape([count if size is None else size for size in template])


def compact_expand(x: torch.Tensor, template: tuple, compact_dim: int) -> torch.Tensor:
    count = x.shape[compact_dim]
    return x.expand([count if size is None else size for size in template])


# --- convolution ----------------------------------------------------------------------------

def sparse_conv2d(x, recorded, plan: MaskPlan, level_in: int, level_out: int, weight, bias,
                  stride, padding, dilation, groups, *, norm=None, silu=False, temb=None,
                  residual=None, out_divisor=None, input_temb=None, input_bias=None):
    """conv2d on the active output tiles of ``level_out``, with the fused prologue and epilogue
    of ``passes.fuse``.

    ``x`` is the compact input ``[B, C, P]`` and ``recorded`` the recorded dense input: the
    halo of each tile reads new values where active and recorded values elsewhere, and zero
    padding applies outside the image (docs/design.md, "Sparse ops"). Output tiles are computed whole
    (``tile x tile``) and the slots outside the image dropped.

    Fused prologue (applied to the new values only; the recorded input is already normalised):
    ``+ input_temb`` and ``+ input_bias`` (the time embedding and the bias ``[C]`` of the conv
    before, moved here by ``passes.fuse``; only with ``norm``), ``norm = (stats, groups, weight,
    bias, eps, policy)`` runs ``sparse_group_norm``, and ``silu`` a SiLU. Fused epilogue, in
    this order: ``+ temb`` (a global value broadcast over positions), ``residual +``,
    ``/ out_divisor``.
    """
    if input_temb is not None:
        x = x + input_temb
    if input_bias is not None:
        x = x + input_bias[:, None]
    if norm is not None:
        stats, norm_groups, norm_weight, norm_bias, eps, policy = norm
        x = sparse_group_norm(x, stats, plan, level_in, norm_groups, norm_weight, norm_bias, eps,
                              policy)
    if silu:
        x = ir.silu(x)
    out = _windowed_conv2d(x, recorded, plan, level_in, level_out, weight, bias, stride, padding,
                           dilation, groups)
    if temb is not None:
        out = out + temb
    if residual is not None:
        out = residual + out
    if out_divisor is not None:
        out = out / out_divisor
    return out


def _windowed_conv2d(x, recorded, plan: MaskPlan, level_in: int, level_out: int, weight, bias,
                     stride, padding, dilation, groups):
    source, target = plan[level_in], plan[level_out]
    full = scatter_full(x, recorded, source, (2, 3))
    if target.dense:
        return ir.conv2d(full, weight, bias, stride, padding, dilation, groups).flatten(2)
    batch, channels = full.shape[:2]
    tile = target.tile
    windows_index = target.table(
        ("conv", level_in, weight.shape[-2:], stride, padding, dilation),
        lambda: _conv_windows(target, source.size, weight.shape[-2:], stride, padding, dilation))
    pad = _conv_padding(target, source.size, weight.shape[-2:], stride, padding, dilation)
    padded = F.pad(full, pad).flatten(2)                          # [B, C, Hp * Wp]
    count = target.tile_capacity
    window_h, window_w = _window_size(tile, weight.shape[-2:], stride, dilation)
    windows = padded[:, :, windows_index]                         # [B, C, n, wh * ww]
    windows = windows.permute(0, 2, 1, 3).reshape(batch * count, channels, window_h, window_w)
    out = F.conv2d(windows, weight, bias, stride, 0, dilation, groups)  # [B*n, Co, t, t]
    out = out.reshape(batch, count, weight.shape[0], tile * tile).permute(0, 2, 1, 3).flatten(2)
    return out.index_select(2, target.slots)


def pointwise_conv2d(x, weight, bias):
    """A 1x1, stride-1, unpadded conv2d on a compact ``[B, C, P]`` tensor: a per-position op."""
    return F.conv2d(x.unsqueeze(-1), weight, bias).squeeze(-1)


def _window_size(tile, kernel, stride, dilation):
    return tuple((tile - 1) * s + (k - 1) * d + 1 for k, s, d in zip(kernel, stride, dilation))


def _conv_padding(target: LevelPlan, in_size, kernel, stride, padding, dilation):
    """The F.pad amounts (left, right, top, bottom) that put every tile's window inside the
    padded input."""
    tile = target.tile
    top, bottom, left, right = padding
    window_h, window_w = _window_size(tile, kernel, stride, dilation)
    grid_h, grid_w = target.tile_grid
    padded_h = max(in_size[0] + top + bottom, (grid_h * tile - tile) * stride[0] + window_h)
    padded_w = max(in_size[1] + left + right, (grid_w * tile - tile) * stride[1] + window_w)
    return (left, padded_w - in_size[1] - left, top, padded_h - in_size[0] - top)


def _conv_windows(target: LevelPlan, in_size, kernel, stride, padding, dilation):
    """The flat index of every input window pixel in the padded input, ``[n, wh * ww]``."""
    tile = target.tile
    window_h, window_w = _window_size(tile, kernel, stride, dilation)
    left, right, _, _ = _conv_padding(target, in_size, kernel, stride, padding, dilation)
    padded_w = in_size[1] + left + right
    device = target.tiles.device
    origin_y = target.tiles[:, 0] * tile * stride[0]
    origin_x = target.tiles[:, 1] * tile * stride[1]
    rows = origin_y[:, None, None] + torch.arange(window_h, device=device)[None, :, None]
    cols = origin_x[:, None, None] + torch.arange(window_w, device=device)[None, None, :]
    windows = (rows * padded_w + cols).reshape(target.tiles.shape[0], window_h * window_w)
    return windows


# --- upsampling -----------------------------------------------------------------------------

def upsample_gather(x, plan: MaskPlan, level_in: int, level_out: int):
    """Nearest upsampling of a compact ``[B, C, P_in]`` tensor to the active positions of
    ``level_out``; the plan guarantees every source position is active."""
    source, target = plan[level_in], plan[level_out]
    index = target.table(("upsample", level_in), lambda: _upsample_index(source, target))
    return x.index_select(2, index)


def _upsample_index(source: LevelPlan, target: LevelPlan) -> torch.Tensor:
    height, width = target.size
    rows = (target.pixels // width) * source.size[0] // height
    cols = (target.pixels % width) * source.size[1] // width
    # The plan guarantees coverage (tests/test_plan.py); checking here would synchronise.
    return source.position[rows * source.size[1] + cols]


# --- group norm -----------------------------------------------------------------------------

def group_norm_stats(x, groups: int, tile: int, size: tuple[int, int]) -> dict:
    """Record-mode statistics of a group norm's input ``x`` (``[B, C, H, W]`` or ``[B, C, H*W]``).

    Keeps, per (batch, group), the mean and inverse standard deviation (the ``cached`` policy)
    and, per tile of the level's grid, the sums of ``x - mean`` and its square in fp32 (the
    ``incremental`` policy). Shifting by the recorded mean avoids the cancellation of
    ``E[x^2] - E[x]^2`` when only a small region changes.
    """
    batch, channels = x.shape[:2]
    height, width = size
    grouped = x.to(accumulation_dtype(x.dtype)).reshape(batch, groups, channels // groups,
                                                        height, width)
    mean = grouped.mean(dim=(2, 3, 4))
    shifted = grouped - mean[:, :, None, None, None]
    variance = (shifted * shifted).mean(dim=(2, 3, 4))
    pad_h, pad_w = -height % tile, -width % tile
    padded = F.pad(shifted, (0, pad_w, 0, pad_h))               # zeros add nothing to the sums
    tiles = padded.reshape(batch, groups, channels // groups, (height + pad_h) // tile, tile,
                           (width + pad_w) // tile, tile)
    return {
        "mean": mean,
        "variance": variance,
        "tile_sum": tiles.sum(dim=(2, 4, 6)).flatten(2),
        "tile_sum_sq": (tiles * tiles).sum(dim=(2, 4, 6)).flatten(2),
    }


def sparse_group_norm(x, stats: dict, plan: MaskPlan, level: int, groups: int, weight, bias,
                      eps: float, policy: str):
    """group_norm of a compact ``[B, C, P]`` tensor whose mixed tensor has the level's size.

    ``incremental`` (exact): the mixed tensor's statistics are the recorded sums minus the
    recorded sums of the active tiles plus the new active sums. ``cached`` (SIGE, FISEdit):
    the recorded statistics. A dense level normalises directly. The specification is
    ``kernels.group_norm.group_norm_reference``; a padded level's repeated positions and tiles
    are left out of the sums by its device-side counts.
    """
    target = plan[level]
    if target.dense:
        return F.group_norm(x, groups, weight, bias, eps)
    count = (x.shape[1] // groups) * target.size[0] * target.size[1]
    return group_norm_kernels.group_norm_reference(
        x, stats, target.tile_ids(), count, groups, weight, bias, eps, policy,
        active_counts=target.counts if target.padded else None)


# --- token ops (passes.fuse_tokens) ---------------------------------------------------------

def add_layer_norm(x, residual, weight, bias, eps: float, sum_bias=None):
    """``(x + residual, layer_norm(x + residual))`` over the last dim (``x`` and its norm
    where ``residual`` is None); with ``sum_bias`` the sum returned is ``x + residual +
    sum_bias`` (``passes.fuse_tokens``: the bias of a linear that ``linear_accumulate``s into
    it). The specification is ``kernels.tokens.add_layer_norm_reference`` (the add is done
    here, so that a broadcasting add, which the kernel does not take, is the same function)."""
    total = x if residual is None else x + residual
    total, normed = token_kernels.add_layer_norm_reference(total, None, weight, bias, eps)
    return (total if sum_bias is None else total + sum_bias), normed


def linear_accumulate(x, weight, into):
    """``into + linear(x, weight)`` (``passes.fuse_tokens``: a feed-forward's output linear
    added to the residual it returns to, its bias already in ``into``). The Triton path adds
    the product into ``into`` in place, one GEMM; the pass gives it an ``into`` that nothing
    else reads."""
    return into + F.linear(x, weight)


def geglu(x, dim: int):
    """GEGLU: the first half of ``x`` along ``dim`` times the exact GELU of the second; the
    specification is ``kernels.tokens.geglu_reference`` (along the last dim)."""
    return token_kernels.geglu_reference(x.movedim(dim, -1)).movedim(-1, dim)


def grouped_linear(x, weight, bias, sizes: tuple) -> tuple:
    """Linears that read ``x`` as one GEMM (``passes.group_linears``): ``weight`` and ``bias``
    are theirs concatenated along the output features (``derived_weights.concatenate``; ``bias``
    is None when none has one), ``sizes`` their output widths. The results are views of the
    GEMM's output, split along the last dim."""
    return tuple(F.linear(x, weight, bias).split(list(sizes), -1))


# --- attention ------------------------------------------------------------------------------

def sparse_attention(q, k, v, recorded_k, recorded_v, plan: MaskPlan, level: int, scale,
                     policy: str, attn_mask=None):
    """Attention for the active queries of a level.

    ``policy`` is ``cross`` for cross-attention, which attends to the text as usual, under
    ``attn_mask`` if there is one (an ``encoder_attention_mask`` over the text tokens: the
    same for every query, so it applies to the active ones unchanged).
    Self-attention with the ``full`` policy (exact) attends to the recorded K/V with the
    active rows replaced; the ``sparse`` policy (FISEdit's fast mode) attends to the active
    tokens only.
    """
    target = plan[level]
    if recorded_k is not None and policy == "full" and not target.dense:
        k = scatter_full(k, recorded_k, target, (recorded_k.dim() - 2,))
        v = scatter_full(v, recorded_v, target, (recorded_v.dim() - 2,))
    elif policy == "sparse" and target.padded:
        # Self-attention over the compact tokens: a padded level's repeats of the first
        # active token must not count twice.
        keys = torch.arange(k.shape[-2], device=k.device) < target.counts[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys[None, :], scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def fold_text_keys(k, query_weight, scale):
    """A cross-attention's text keys with its query projection folded in, ``[B, H, T, C]``
    (``passes.fold_text_queries``; the specification is
    ``kernels.text_attention.fold_keys_reference``): computed once per pass."""
    return text_attention_kernels.fold_keys_reference(k, query_weight, scale)


def text_attention(x, folded_keys, values):
    """Cross-attention of the token rows ``x`` ``[B, N, C]`` to the text through its folded
    keys (``fold_text_keys``), ``[B, H, N, D]``; the specification is
    ``kernels.text_attention.text_attention_reference``."""
    return text_attention_kernels.text_attention_reference(x, folded_keys, values)
