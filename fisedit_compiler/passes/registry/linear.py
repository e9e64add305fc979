"""linear: a per-position op on the last dim (the transformer blocks' projections).

Its sparse rewrite is the same linear on the compact tokens; ``passes.group_linears`` then runs
the linears that read one tensor as one ``sparse_ops.grouped_linear``."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ... import ir
from ...execution import sparse_ops
from .spec import Domain, OpSpec, before_trailing, per_position, shape_of

aten = torch.ops.aten


def _rule(b, a: dict):
    return b.emit("linear", b.get(a["input"]), b.get(a["weight"]), b.get(a["bias"]))


def _domain(node: fx.Node) -> Domain:
    return before_trailing(node, 1)


def _macs(node: fx.Node) -> int:
    return math.prod(shape_of(node)) * shape_of(node.args[1])[1]


SPECS = [
    OpSpec(name="linear", fn=ir.linear, kind="linear", aten={aten.linear.default: _rule},
           domain=_domain, macs=_macs, edit_macs=None, sparse=per_position, records={},
           reference=(sparse_ops.grouped_linear,), lowerings={}, oracle=None),
]
