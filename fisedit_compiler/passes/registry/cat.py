"""cat: joining tensors along a dim other than their positions (the skip connections' channels).

On CUDA the join keeps channel-fast compact tensors channel-fast (``triton_ops.cat``), the
layout the conv kernel after it reads.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ... import ir
from ...execution import triton_ops
from .spec import OPAQUE, Domain, OpSpec, dim_index, domain_of, elementwise

aten = torch.ops.aten


def _rule(b, a: dict):
    rank = len(b.shape())
    return b.emit("cat", b.get(list(a["tensors"])), dim_index(a["dim"], rank))


def _domain(node: fx.Node) -> Domain:
    domain = elementwise(node)
    return OPAQUE if domain.positional and node.args[1] in domain.dims else domain


def _sparse(edit, node: fx.Node):
    tensors, dim = node.args
    compact = [edit.operand(value, node) for value in tensors]
    if any(value is None for value in compact):
        return None
    return edit.emit(ir.cat, compact, domain_of(node).compact_axis(dim), source=node)


SPECS = [
    OpSpec(name="cat", fn=ir.cat, kind="cat",
           aten={aten.cat.default: _rule, aten.concat.default: _rule},
           domain=_domain, macs=None, edit_macs=None, sparse=_sparse, records={}, reference=(),
           lowerings={ir.cat: triton_ops.cat}, oracle=None),
]
