"""The sparse ops of the edit graph on Triton kernels: same signatures as ``sparse_ops``.

``passes.lower_kernels`` swaps these in for their ``sparse_ops`` namesakes when a program runs
on CUDA (``SparseConfig.kernels``); which op replaces which is declared by each op's registry
entry (``OpSpec.lowerings`` in ``passes.registry``). Each one turns the mask plan into the kernel's index tables
(built once per plan and kept on it) and calls the kernel from ``fisedit_compiler.kernels``;
where a kernel does not apply it calls the reference op, so the result is always the same
function of the inputs:

* a conv whose output level is dense runs the reference (one cuDNN conv over the mixed
  tensor): a dense level has no halo to save, and cuDNN is the fastest dense conv;
* grouped convs run the reference (the kernel supports groups == 1);
* the skip connections' channel joins keep the conv outputs' channel-fast layout, and 1x1
  convs of channel-fast tensors run as one GEMM;
* self-attention under the ``full`` policy reads the recorded K/V with the active rows
  replaced in place; cross-attention and the ``sparse`` policy are plain attention over
  compact tensors and use PyTorch's fused SDPA.

The conv and the attention also take ``recorded_shift`` (``kernels.recorded_shift``; set by
``passes.lower_kernels`` on those whose recorded values come straight from the cache): their
kernels read the recorded values that many bytes from the tensors given, which is how a CUDA
graph's step reads the recorded step it replays where that step lives. Where such an op runs
its reference instead, the reference reads a copy made from the shifted address.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import sparse_ops
from .kernels import attention as attention_kernels
from .kernels import group_norm as group_norm_kernels
from .kernels.recorded_shift import read_shifted
from .kernels import sparse_conv as conv_kernels
from .kernels import text_attention as text_attention_kernels
from .kernels import tokens as token_kernels
from .plan import LevelPlan, MaskPlan


def _position(level: LevelPlan) -> torch.Tensor:
    return level.table("position_int32", lambda: level.position.to(torch.int32))


def _pixels(level: LevelPlan) -> torch.Tensor:
    return level.table("pixels_int32", lambda: level.pixels.to(torch.int32))


def _recorded_for_reference(recorded, recorded_shift, level: LevelPlan):
    """What a torch reference reads as the recorded values of a ``level``-sized tensor: a
    copy from the shifted address, or the tensor given where the reference reads no recorded
    value (none given, or a dense level, which is all new values: only its shape is read)."""
    if recorded is None or recorded_shift is None or level.dense:
        return recorded
    return read_shifted(recorded, recorded_shift)


def _group_norm(x, norm, level: LevelPlan, silu=False, add=None, add_bias=None):
    """The group norm of the mixed tensor at x's positions (then SiLU), in one launch; with
    ``add`` (``[B, C]``) and ``add_bias`` (``[C]``), that of ``x + add + add_bias``."""
    stats, groups, weight, bias, eps, policy = norm
    count = (x.shape[1] // groups) * level.size[0] * level.size[1]
    if level.dense:
        # Every tile is new: the statistics are x's own (as F.group_norm), whatever the policy.
        policy = "incremental"
    return group_norm_kernels.group_norm(x, stats, level.tile_ids(), count, groups, weight, bias,
                                         eps, policy, silu=silu,
                                         active_counts=level.counts if level.padded else None,
                                         add=add, add_bias=add_bias)


def sparse_conv2d(x, recorded, plan: MaskPlan, level_in: int, level_out: int, weight, bias,
                  stride, padding, dilation, groups, *, norm=None, silu=False, temb=None,
                  residual=None, out_divisor=None, input_temb=None, input_bias=None,
                  packed_weight=None, method: str = "implicit", recorded_shift=None):
    """``sparse_ops.sparse_conv2d`` on the conv kernel; ``packed_weight``, ``method`` and
    ``recorded_shift`` are added by ``passes.lower_kernels``: ``packed_weight`` is the
    program's packed copy of ``weight`` (``kernels.sparse_conv.pack_weight``; packed here on
    each call without it), ``method`` is ``SparseConfig.conv_method``. A time embedding and a
    bias added before the norm (``input_temb``, ``input_bias``) are added by the group-norm
    kernel."""
    source, target = plan[level_in], plan[level_out]
    batch, c_out = x.shape[0], weight.shape[0]
    kernel_temb = (_per_channel(temb, c_out) and _per_channel(input_temb, x.shape[1])
                   and (norm is not None or input_temb is None and input_bias is None))
    if groups != 1 or target.dense or not kernel_temb:
        recorded = _recorded_for_reference(recorded, recorded_shift, source)
        return sparse_ops.sparse_conv2d(x, recorded, plan, level_in, level_out, weight, bias,
                                        stride, padding, dilation, groups, norm=norm, silu=silu,
                                        temb=temb, residual=residual, out_divisor=out_divisor,
                                        input_temb=input_temb, input_bias=input_bias)
    if norm is not None or silu:
        # Normalise the compact input in one pointwise pass rather than in the conv's loads:
        # the conv reads each input value once per tap, and redoing the affine and SiLU per
        # tap cost more than the extra pass (up to 1.9x on the 1280-channel convs, measured by
        # benchmarks/micro_sparse_conv.py on the H100), while the compact tensor is small.
        if norm is not None:
            x = _group_norm(x, norm, source, silu=silu,
                            add=_channel_rows(input_temb, batch, x.shape[1]), add_bias=input_bias)
        else:
            x = F.silu(x)
    return conv_kernels.sparse_conv2d(
        x, recorded, _position(source), _pixels(target), target.size, weight, bias,
        stride=stride, padding=padding, dilation=dilation,
        temb=_channel_rows(temb, batch, c_out), residual=residual,
        out_scale=None if out_divisor is None else 1.0 / out_divisor,
        packed_weight=packed_weight, method=method, recorded_shift=recorded_shift)


def _per_channel(temb, channels: int) -> bool:
    """Whether a conv's time embedding (absent, or ``[B or 1, channels, 1]``) is one value per
    batch item and channel: what the kernels add."""
    return temb is None or (temb.dim() == 3 and temb.shape[-1] == 1
                            and temb.shape[1] == channels)


def _channel_rows(temb, batch: int, channels: int):
    """A ``_per_channel`` time embedding as the kernels take it, ``[batch, channels]``."""
    return None if temb is None else temb.expand(batch, channels, 1).reshape(batch, channels)


def sparse_group_norm(x, stats: dict, plan: MaskPlan, level: int, groups: int, weight, bias,
                      eps: float, policy: str):
    return _group_norm(x, (stats, groups, weight, bias, eps, policy), plan[level])


def sparse_attention(q, k, v, recorded_k, recorded_v, plan: MaskPlan, level: int, scale,
                     policy: str, attn_mask=None, recorded_shift=None):
    target = plan[level]
    if recorded_k is not None and policy == "full" and not target.dense and attn_mask is None:
        if q.dim() == 3:
            # [batch * heads, tokens, dim], as diffusers' AttnProcessor lays heads out
            # (passes/fold_attention.py): the kernel's [batch, heads, tokens, dim] with batch 1.
            return attention_kernels.attention(
                q[None], k[None], v[None], scale, recorded_k[None], recorded_v[None],
                _position(target), recorded_shift)[0]
        return attention_kernels.attention(q, k, v, scale, recorded_k, recorded_v,
                                           _position(target), recorded_shift)
    if policy == "full":
        recorded_k, recorded_v = (_recorded_for_reference(recorded, recorded_shift, target)
                                  for recorded in (recorded_k, recorded_v))
    return sparse_ops.sparse_attention(q, k, v, recorded_k, recorded_v, plan, level, scale,
                                       policy, attn_mask)


def text_attention(x, folded_keys, values):
    if not text_attention_kernels.supported(folded_keys, values):
        # A long text, or a head too wide for the registers or the device's shared memory.
        return sparse_ops.text_attention(x, folded_keys, values)
    return text_attention_kernels.text_attention(x, folded_keys, values)


def add_layer_norm(x, residual, weight, bias, eps: float, sum_bias=None):
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        # A broadcasting add.
        return sparse_ops.add_layer_norm(x, residual, weight, bias, eps, sum_bias)
    return token_kernels.add_layer_norm(x, residual, weight, bias, eps, sum_bias)


def linear_accumulate(x, weight, into):
    """``sparse_ops.linear_accumulate`` as one cuBLAS GEMM that adds into ``into`` in place
    (beta = 1), where the product has ``into``'s shape and dtype and ``into`` is contiguous:
    the separate add's launch goes."""
    rows, features = into.numel() // max(1, weight.shape[0]), weight.shape[0]
    if (into.shape[:-1] != x.shape[:-1] or into.shape[-1] != features or into.dtype != x.dtype
            or weight.dtype != x.dtype or not into.is_contiguous()):
        return sparse_ops.linear_accumulate(x, weight, into)
    into.view(rows, features).addmm_(x.reshape(rows, x.shape[-1]), weight.t())
    return into


def geglu(x, dim: int):
    if dim not in (-1, x.dim() - 1):
        return sparse_ops.geglu(x, dim)
    return token_kernels.geglu(x)


def cat(tensors, dim: int):
    """``ir.cat``, keeping channel-fast compact tensors channel-fast when joining channels.

    The U-Net's skip connections join channels right before the up blocks' widest convs
    (2560 input channels in SD1.5). ``torch.cat`` of 3-D tensors returns a contiguous tensor,
    channel stride P, which the conv kernel would then gather element by element.
    """
    if dim % 3 == 1 and all(t.dim() == 3 and t.stride(1) == 1 for t in tensors):
        return torch.cat([t.transpose(1, 2) for t in tensors], 2).transpose(1, 2)
    return torch.cat(tensors, dim)


def pointwise_conv2d(x, weight, bias):
    """``sparse_ops.pointwise_conv2d`` of a channel-fast compact tensor as one GEMM.

    A 1x1 conv of ``[B, C, P]`` with channel stride 1 is a linear over its ``[B, P, C]`` view,
    which is contiguous: cuBLAS runs it with the bias fused, and the result, transposed back,
    is channel-fast again. ``F.conv2d`` on the same tensor converts layouts around its conv
    (copy kernels per call; the transformer blocks' proj_in and proj_out and the ResNet
    shortcuts are 46 such convs per SD1.5 step).
    """
    if x.stride(1) != 1:
        return sparse_ops.pointwise_conv2d(x, weight, bias)
    matrix = weight.reshape(weight.shape[0], weight.shape[1])
    return F.linear(x.transpose(1, 2), matrix, bias).transpose(1, 2)

