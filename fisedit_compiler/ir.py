"""The canonical dialect: the one graph form every pass after capture works on.

Both frontends (torch.export and the Dynamo backend graph) are lowered to ATen by non-strict
export and then mapped onto the canonical ops by ``passes.canonicalize``. Every canonical node
is a ``call_function`` whose target is its op's canonical function, called with positional
arguments in the documented order, so a pass matches ``node.target is ir.conv2d`` and reads
``node.args`` without normalising keyword forms. Parameters are ``get_attr`` nodes; user inputs
are placeholders named after the U-Net's (flattened) keyword arguments.

The op set is the registry (``passes.registry``: one ``OpSpec`` per op, with its kind and
every pass's rule for it; docs/design.md, "Op registry"). This module holds what every layer
shares: the node metadata keys and the U-Net ops' canonical functions, kept in the lowest layer
because code below the passes calls some of them too (the reference sparse ops run ``conv2d``
on dense levels) and the fusions match them. A new op whose function only its own entry uses
defines it beside the entry. Signatures:

===========  ==============================================================================
kind         ops
===========  ==============================================================================
conv         ``conv2d(x, weight, bias, stride, padding, dilation, groups)``; padding is
             (top, bottom, left, right), so a zero pad before a conv folds into it
norm         ``group_norm(x, groups, weight, bias, eps)``,
             ``layer_norm(x, normalized_shape, weight, bias, eps)``
attention    ``attention(q, k, v, attn_mask, scale)``: one scaled-dot-product attention
linear       ``linear(x, weight, bias)``
upsample     ``upsample_nearest(x, out_h, out_w)``
pointwise    unary: ``silu, gelu(x, approximate), neg, exp, sin, cos, sigmoid, tanh, sqrt,
             rsqrt, relu, mish``; binary (tensor or scalar operands): ``add, sub, mul, div, pow``;
             ``cast(x, dtype)``
cat          ``cat(tensors, dim)``
view         ``reshape(x, shape)``, ``permute(x, dims)``, ``expand(x, shape)``,
             ``slice(x, dim, start, end, step)``, ``split(x, sizes, dim)`` (+ getitem)
factory      ``arange(start, end, step, dtype, device)``, ``full(shape, value, dtype, device)``
===========  ==============================================================================

An ATen op with no canonical form is kept as it is and flagged (``META_UNKNOWN``); passes treat
such nodes conservatively (dense) and ``inspect`` reports them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

# Node metadata keys written by the passes.
META_OP = "fc_op"              # canonical op name (str); absent on unknown ops
META_UNKNOWN = "fc_unknown"    # True on an op kept outside the canonical set
META_SOURCE = "fc_source"      # the ATen target the node came from (str)
META_MODULE = "fc_module"      # module path, e.g. "down_blocks.0.resnets.0.conv1"
META_DOMAIN = "fc_domain"      # analyze.Domain
META_MACS = "fc_macs"          # multiply-accumulates of the node (int)
META_INVARIANT = "fc_invariant"  # "step", "prompt", "constant" or None (depends on the sample)
META_DEPENDS = "fc_depends"    # frozenset of the user inputs the node depends on
META_ATTN_KIND = "fc_attention"  # "self" or "cross" on attention nodes


def conv2d(x, weight, bias, stride, padding, dilation, groups):
    top, bottom, left, right = padding
    if top == bottom and left == right:
        return F.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, dilation, groups)


def group_norm(x, groups, weight, bias, eps):
    return F.group_norm(x, groups, weight, bias, eps)


def layer_norm(x, normalized_shape, weight, bias, eps):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def attention(q, k, v, attn_mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def linear(x, weight, bias):
    return F.linear(x, weight, bias)


def upsample_nearest(x, out_h, out_w):
    return F.interpolate(x, size=(out_h, out_w), mode="nearest")


def silu(x):
    return F.silu(x)


def gelu(x, approximate):
    return F.gelu(x, approximate=approximate)


def cast(x, dtype):
    return x.to(dtype)


def cat(tensors, dim):
    return torch.cat(tensors, dim)


def reshape(x, shape):
    return torch.reshape(x, shape)


def permute(x, dims):
    return torch.permute(x, dims)


def expand(x, shape):
    return x.expand(shape)


def slice_dim(x, dim, start, end, step):
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


def split(x, sizes, dim):
    return tuple(torch.split(x, sizes, dim))


def arange(start, end, step, dtype, device):
    return torch.arange(start, end, step, dtype=dtype, device=device)


def full(shape, value, dtype, device):
    return torch.full(shape, value, dtype=dtype, device=device)


neg, exp, sin, cos = torch.neg, torch.exp, torch.sin, torch.cos
sigmoid, tanh, sqrt, rsqrt = torch.sigmoid, torch.tanh, torch.sqrt, torch.rsqrt
relu, mish = torch.relu, F.mish          # diffusers' act_fn "relu" and "mish"
add, sub, mul, div, pow = operator.add, operator.sub, operator.mul, operator.truediv, operator.pow


def op_name(node) -> str | None:
    """The canonical op name of an fx node, or None for placeholders, outputs and unknown ops."""
    if node.op != "call_function":
        return None
    return node.meta.get(META_OP)


def is_call(node, target) -> bool:
    """Whether ``node`` is an fx call of the function ``target`` (any function, not only ops)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def is_op(node, *names: str) -> bool:
    return op_name(node) in names
