"""Views: reshape, permute, expand, slice, split and the getitem that takes a split's part.

A U-Net tensor moves between layouts (``[B, C, H, W]`` for convolutions, ``[B, H*W, C]`` for
tokens, ``[B, heads, H*W, d]`` in attention) through these, so the domain rules follow the
positions through them, and a view that mixes positions with other dims is opaque. Their sparse
forms are the same views of compact tensors, position dims remapped.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ... import ir
from ...execution import sparse_ops
from .spec import OPAQUE, Domain, OpSpec, dim_index, domain_of, shape_of

aten = torch.ops.aten


# -- canonicalize ------------------------------------------------------------------------------

def _reshape_rule(b, a: dict):
    source = a.get("self", a.get("input"))
    if b.shape(source) == b.shape():
        return b.forward(source)
    return b.emit("reshape", b.get(source), tuple(b.shape()))


def _permute_rule(b, a: dict):
    rank = len(b.shape(a["self"]))
    dims = [dim_index(d, rank) for d in a["dims"]]
    if dims == list(range(rank)):
        return b.forward(a["self"])
    return b.emit("permute", b.get(a["self"]), tuple(dims))


def _transpose_rule(b, a: dict):
    rank = len(b.shape(a["self"]))
    dims = list(range(rank))
    i, j = dim_index(a["dim0"], rank), dim_index(a["dim1"], rank)
    dims[i], dims[j] = dims[j], dims[i]
    if i == j:
        return b.forward(a["self"])
    return b.emit("permute", b.get(a["self"]), tuple(dims))


def _expand_rule(b, a: dict):
    if b.shape(a["self"]) == b.shape():
        return b.forward(a["self"])
    return b.emit("expand", b.get(a["self"]), tuple(b.shape()))


def _slice_rule(b, a: dict):
    shape = b.shape(a["self"])
    dim = dim_index(a["dim"], len(shape))
    start, end, step = slice(a["start"], a["end"], a["step"]).indices(shape[dim])
    if (start, end, step) == (0, shape[dim], 1):
        return b.forward(a["self"])
    return b.emit("slice", b.get(a["self"]), dim, start, end, step)


def _split_rule(b, a: dict):
    shape = b.shape(a["self"])
    dim = dim_index(a["dim"], len(shape))
    if "chunks" in a:
        size = -(-shape[dim] // a["chunks"])
    else:
        size = a.get("split_size", a.get("split_sizes"))
    if isinstance(size, int):
        sizes = [min(size, shape[dim] - start) for start in range(0, shape[dim], size)]
    else:
        sizes = list(size)
    return b.emit("split", b.get(a["self"]), tuple(sizes), dim)


def _getitem_rule(b, a: dict):
    container, index = b.source.args
    if ir.op_name(b.env[container]) != "split":
        return None
    return b.emit("getitem", b.get(container), index)


# -- domains -----------------------------------------------------------------------------------

def _reshape_domain(node: fx.Node) -> Domain:
    domain = domain_of(node.args[0])
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    first, last = domain.dims[0], domain.dims[-1]
    prefix = math.prod(in_shape[:first])
    block = math.prod(in_shape[first:last + 1])
    start = 0
    while math.prod(out_shape[:start]) < prefix or (
            start < len(out_shape) and out_shape[start] == 1 and block != 1):
        start += 1
    if math.prod(out_shape[:start]) != prefix:
        return OPAQUE
    end = start
    while end < len(out_shape) and math.prod(out_shape[start:end + 1]) < block:
        end += 1
    if end >= len(out_shape) or math.prod(out_shape[start:end + 1]) != block:
        return OPAQUE
    height, width = domain.size
    dims = tuple(range(start, end + 1))
    if len(dims) == 1:
        return Domain("tokens", dims, domain.size)
    if tuple(out_shape[start:end + 1]) == (height, width):
        return Domain("spatial", dims, domain.size)
    return OPAQUE


def _permute_domain(node: fx.Node) -> Domain:
    domain = domain_of(node.args[0])
    order = list(node.args[1])
    dims = tuple(order.index(d) for d in domain.dims)
    if list(dims) != list(range(dims[0], dims[0] + len(dims))):
        return OPAQUE  # positions reordered (W before H) or split apart
    return Domain(domain.kind, dims, domain.size)


def _expand_domain(node: fx.Node) -> Domain:
    domain = domain_of(node.args[0])
    in_shape, out_shape = shape_of(node.args[0]), shape_of(node)
    offset = len(out_shape) - len(in_shape)
    dims = tuple(d + offset for d in domain.dims)
    if all(out_shape[d] == in_shape[d - offset] for d in dims):
        return Domain(domain.kind, dims, domain.size)
    return OPAQUE


def _cut_along(dim_arg: int):
    """slice and split: fine as long as they cut along a non-position dimension
    (``node.args[dim_arg]``)."""
    def rule(node: fx.Node) -> Domain:
        domain = domain_of(node.args[0])
        return OPAQUE if node.args[dim_arg] in domain.dims else domain
    return rule


def _getitem_domain(node: fx.Node) -> Domain:
    return domain_of(node.args[0])


# -- sparse rewrites ---------------------------------------------------------------------------

def _template(node: fx.Node) -> tuple:
    domain, shape = domain_of(node), shape_of(node)
    return shape[:domain.dims[0]] + (None,) + shape[domain.dims[-1] + 1:]


def _reshape_sparse(edit, node: fx.Node):
    x = node.args[0]
    return edit.emit(sparse_ops.compact_reshape, edit.env[x], _template(node),
                     domain_of(x).dims[0], source=node)


def _expand_sparse(edit, node: fx.Node):
    x = node.args[0]
    return edit.emit(sparse_ops.compact_expand, edit.env[x], _template(node),
                     domain_of(x).dims[0], source=node)


def _permute_sparse(edit, node: fx.Node):
    x, order = node.args
    source, target = domain_of(x), domain_of(node)
    compact_order = tuple(source.compact_axis(order[axis]) for axis in range(len(order))
                          if not target.dims[0] < axis <= target.dims[-1])
    return edit.emit(ir.permute, edit.env[x], compact_order, source=node)


def _slice_sparse(edit, node: fx.Node):
    x, dim, start, end, step = node.args
    return edit.emit(ir.slice_dim, edit.env[x], domain_of(x).compact_axis(dim), start, end,
                     step, source=node)


def _split_sparse(edit, node: fx.Node):
    x, sizes, dim = node.args
    return edit.emit(ir.split, edit.env[x], sizes, domain_of(x).compact_axis(dim), source=node)


def _getitem_sparse(edit, node: fx.Node):
    container, index = node.args
    return edit.emit(operator.getitem, edit.env[container], index, source=node)


def _view(name: str, fn, aten_rules: dict, domain, sparse, reference=()) -> OpSpec:
    return OpSpec(name=name, fn=fn, kind="view", aten=aten_rules, domain=domain, macs=None,
                  edit_macs=None, sparse=sparse, records={}, reference=reference,
                  lowerings={}, oracle=None)


SPECS = [
    _view("reshape", ir.reshape,
          {op: _reshape_rule for op in (
              aten.view.default, aten.reshape.default, aten._unsafe_view.default,
              aten.flatten.using_ints, aten.unflatten.int, aten.unsqueeze.default,
              aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)},
          _reshape_domain, _reshape_sparse, reference=(sparse_ops.compact_reshape,)),
    _view("permute", ir.permute,
          {aten.permute.default: _permute_rule, aten.transpose.int: _transpose_rule},
          _permute_domain, _permute_sparse),
    _view("expand", ir.expand, {aten.expand.default: _expand_rule}, _expand_domain,
          _expand_sparse, reference=(sparse_ops.compact_expand,)),
    _view("slice", ir.slice_dim, {aten.slice.Tensor: _slice_rule}, _cut_along(1),
          _slice_sparse),
    _view("split", ir.split, {op: _split_rule for op in (
              aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default)},
          _cut_along(2), _split_sparse),
    _view("getitem", operator.getitem, {operator.getitem: _getitem_rule}, _getitem_domain,
          _getitem_sparse),
]
