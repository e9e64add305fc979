"""conv2d: the U-Net's convolutions, with a zero pad before them folded into their padding.

Sparse form: the active output tiles, each reading a window of the mixed input (new values
where active, recorded values elsewhere: the rewrite reads the conv's recorded input), or a
per-position op for 1x1 stride-1 convs (docs/design.md, "Sparse ops").
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ... import ir
from ...execution import sparse_ops, triton_ops
from ..pattern import args_of
from .spec import OpSpec, aten_arguments, domain_of, image_output, shape_of

aten = torch.ops.aten


def _conv(b, a: dict):
    x = a["input"]
    padding = list(a["padding"])
    pad_h, pad_w = (padding * 2)[:2] if len(padding) == 1 else padding
    padding4 = [pad_h, pad_h, pad_w, pad_w]
    if (isinstance(x, fx.Node) and x.target in (aten.pad.default, aten.constant_pad_nd.default)
            and _foldable_pad(x)):
        pad_args = aten_arguments(x)
        left, right, top, bottom = pad_args["pad"]
        padding4 = [padding4[0] + top, padding4[1] + bottom, padding4[2] + left,
                    padding4[3] + right]
        x = pad_args["self"]
    stride = list(a["stride"]) * (2 if len(a["stride"]) == 1 else 1)
    dilation = list(a["dilation"]) * (2 if len(a["dilation"]) == 1 else 1)
    return b.emit("conv2d", b.get(x), b.get(a["weight"]), b.get(a["bias"]), tuple(stride),
                  tuple(padding4), tuple(dilation), a["groups"])


def _foldable_pad(node: fx.Node) -> bool:
    """A zero, constant, 2-D pad whose every user is a conv2d (so the conv can absorb it).

    Negative pads crop, and a crop followed by the conv's zero padding is not a smaller padding.
    """
    a = aten_arguments(node)
    if node.target == aten.pad.default and (a["mode"] != "constant" or a["value"] not in (None, 0, 0.0)):
        return False
    if node.target == aten.constant_pad_nd.default and a["value"] not in (None, 0, 0.0):
        return False
    return (len(a["pad"]) == 4 and min(a["pad"]) >= 0 and len(node.users) > 0
            and all(user.target == aten.conv2d.default and user.args[0] is node
                    for user in node.users))


def _pad(b, a: dict):
    # Kept only until its conv users absorb it; dead-code elimination removes it afterwards.
    return b.graph.node_copy(b.source, lambda n: b.env[n]) if _foldable_pad(b.source) else None


def _is_pointwise_conv(node: fx.Node) -> bool:
    """Whether a canonical conv2d is per-position: 1x1, stride 1, unpadded."""
    conv = args_of(node)
    return (shape_of(conv["weight"])[-2:] == (1, 1) and tuple(conv["stride"]) == (1, 1)
            and tuple(conv["padding"]) == (0, 0, 0, 0))


def _macs(node: fx.Node) -> int:
    weight = shape_of(node.args[1])
    return math.prod(shape_of(node)) * math.prod(weight[1:])


def _edit_macs(node: fx.Node, level, config, dense: float) -> float:
    """Windowed convs compute whole output tiles; 1x1 convs the active positions."""
    positions = level.size[0] * level.size[1]
    if _is_pointwise_conv(node):
        return dense * (level.count / positions)
    return dense * level.tiles.shape[0] * level.tile * level.tile / positions


def _sparse(edit, node: fx.Node):
    x, weight, bias, stride, padding, dilation, groups = node.args
    source, target = domain_of(x), domain_of(node)
    if source.kind != "spatial":
        return None
    if _is_pointwise_conv(node):
        return edit.emit(sparse_ops.pointwise_conv2d, edit.env[x], edit.env[weight],
                         edit.env.get(bias), source=node)
    return edit.emit(sparse_ops.sparse_conv2d, edit.env[x], edit.read(x), edit.plan,
                     source.level, target.level, edit.env[weight], edit.env.get(bias), stride,
                     padding, dilation, groups, source=node)


SPECS = [
    OpSpec(name="conv2d", fn=ir.conv2d, kind="conv",
           aten={aten.conv2d.default: _conv, aten.pad.default: _pad,
                 aten.constant_pad_nd.default: _pad},
           domain=image_output, macs=_macs, edit_macs=_edit_macs, sparse=_sparse, records={},
           reference=(sparse_ops.sparse_conv2d, sparse_ops.pointwise_conv2d),
           lowerings={sparse_ops.sparse_conv2d: triton_ops.sparse_conv2d,
                      sparse_ops.pointwise_conv2d: triton_ops.pointwise_conv2d},
           oracle=None),
]
