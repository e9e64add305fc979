"""linear: a per-position op on the last dim (the transformer blocks' projections).

Its sparse rewrite is the same linear on the compact tokens; ``passes.group_linears`` then runs
the linears that read one tensor as one ``sparse_ops.grouped_linear``."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ... import ir
from ...execution import sparse_ops, triton_ops
from .spec import OPAQUE, Domain, OpSpec, before_trailing, domain_of, per_position, shape_of

aten = torch.ops.aten


def _rule(b, a: dict):
    return b.emit("linear", b.get(a["input"]), b.get(a["weight"]), b.get(a["bias"]))


def _matmul(b, a: dict):
    """``x @ w`` with a constant 2-D ``w`` (a low-rank delta a user's attention processor
    adds, say) is ``linear(x, w.T)``: per position, as a projection."""
    x, other = a["self"], a["other"]
    if len(b.shape(other)) != 2 or len(b.shape(x)) < 2:
        return None
    weight = b.emit("permute", b.get(other), (1, 0))
    weight.meta["val"] = other.meta["val"].t()
    return b.emit("linear", b.get(x), weight, None)


def _domain(node: fx.Node) -> Domain:
    # A weight with positions of its own (a matmul of two activations) is no projection.
    if domain_of(node.args[1]).positional:
        return OPAQUE
    return before_trailing(node, 1)


def _macs(node: fx.Node) -> int:
    return math.prod(shape_of(node)) * shape_of(node.args[1])[1]


SPECS = [
    OpSpec(name="linear", fn=ir.linear, kind="linear", aten={aten.linear.default: _rule, aten.matmul.default: _matmul},
           domain=_domain, macs=_macs, edit_macs=None, sparse=per_position, records={},
           reference=(sparse_ops.grouped_linear, sparse_ops.linear_accumulate),
           lowerings={sparse_ops.linear_accumulate: triton_ops.linear_accumulate}, oracle=None),
]
