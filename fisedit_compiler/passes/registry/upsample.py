"""upsample_nearest: a gather from the lower level, which the mask plan makes active wherever
it is read (docs/design.md, "Mask plans")."""

from __future__ import annotations

import torch
import torch.fx as fx

from ... import ir
from ...execution import sparse_ops
from .spec import OpSpec, domain_of, image_output

aten = torch.ops.aten


def _rule(b, a: dict):
    height, width = b.shape()[-2:]
    return b.emit("upsample_nearest", b.get(a["input"]), height, width)


def _sparse(edit, node: fx.Node):
    x = node.args[0]
    if domain_of(x).kind != "spatial":
        return None
    return edit.emit(sparse_ops.upsample_gather, edit.env[x], edit.plan, domain_of(x).level,
                     domain_of(node).level, source=node)


SPECS = [
    OpSpec(name="upsample_nearest", fn=ir.upsample_nearest, kind="upsample",
           aten={aten.upsample_nearest2d.vec: _rule, aten.upsample_nearest2d.default: _rule},
           domain=image_output, macs=None, edit_macs=None, sparse=_sparse, records={},
           reference=(sparse_ops.upsample_gather,), lowerings={}, oracle=None),
]
