"""group_norm and layer_norm.

group_norm reduces over positions, so its sparse form needs recorded statistics: the record
graph stores them (``records``), and the ``cached`` policy is an approximation the oracle
applies too (docs/design.md, "Sparse ops", "Cache"). layer_norm acts on each position's
channels; in the transformer blocks ``fuse_tokens`` joins it with the residual add before it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ... import ir
from ...execution import sparse_ops, triton_ops
from ...execution.kernels import accumulation_dtype
from .spec import OPAQUE, Domain, OpSpec, before_trailing, domain_of, per_position, shape_of

aten = torch.ops.aten

GROUP_NORM_STATS = "group_norm_stats"   # the cache kind of a group norm's recorded statistics


def _group_norm_rule(b, a: dict):
    return b.emit("group_norm", b.get(a["input"]), a["num_groups"], b.get(a["weight"]),
                  b.get(a["bias"]), a["eps"])


def _group_norm_domain(node: fx.Node) -> Domain:
    """Positions must lie after the channel dimension."""
    domain = domain_of(node.args[0])
    return domain if domain.positional and min(domain.dims) >= 2 else OPAQUE


def _group_norm_sparse(edit, node: fx.Node):
    x, groups, weight, bias, eps = node.args
    domain = domain_of(x)
    if len(shape_of(x)) - len(domain.dims) + 1 != 3:
        return None   # the compact input must be [B, C, P]
    return edit.emit(sparse_ops.sparse_group_norm, edit.env[x], edit.read(node, GROUP_NORM_STATS),
                     edit.plan, domain.level, groups, edit.env.get(weight), edit.env.get(bias),
                     eps, edit.config.group_norm, source=node)


def _record_stats(graph: fx.Graph, node: fx.Node, env: dict, tiles: list[int]) -> fx.Node:
    """The statistics of the norm's input that both policies read (per group, per tile)."""
    x, groups = env[node.args[0]], node.args[1]
    domain = domain_of(node.args[0])
    return graph.call_function(sparse_ops.group_norm_stats,
                               (x, groups, tiles[domain.level], domain.size))


def _group_norm_oracle(node, args, original, active, config):
    """``cached``: normalise with the original run's statistics of the norm's input."""
    if config.group_norm != "cached":
        return None
    x, groups, weight, bias, eps = args
    recorded = original[node.args[0].name].to(accumulation_dtype(x.dtype))
    grouped = recorded.reshape(recorded.shape[0], groups, -1)
    mean = grouped.mean(-1, keepdim=True)
    variance = grouped.var(-1, unbiased=False, keepdim=True)
    new = x.to(recorded.dtype).reshape(x.shape[0], groups, -1)
    normed = ((new - mean) / torch.sqrt(variance + eps)).reshape(x.shape).to(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        normed = normed * weight.reshape(shape)
    if bias is not None:
        normed = normed + bias.reshape(shape)
    return normed


def _layer_norm_rule(b, a: dict):
    return b.emit("layer_norm", b.get(a["input"]), tuple(a["normalized_shape"]),
                  b.get(a["weight"]), b.get(a["bias"]), a["eps"])


def _layer_norm_domain(node: fx.Node) -> Domain:
    return before_trailing(node, len(node.args[1]))


SPECS = [
    OpSpec(name="group_norm", fn=ir.group_norm, kind="norm",
           aten={aten.group_norm.default: _group_norm_rule},
           domain=_group_norm_domain, macs=None, edit_macs=None, sparse=_group_norm_sparse,
           records={GROUP_NORM_STATS: _record_stats},
           reference=(sparse_ops.sparse_group_norm,),
           lowerings={sparse_ops.sparse_group_norm: triton_ops.sparse_group_norm},
           oracle=_group_norm_oracle),
    OpSpec(name="layer_norm", fn=ir.layer_norm, kind="norm",
           aten={aten.layer_norm.default: _layer_norm_rule},
           domain=_layer_norm_domain, macs=None, edit_macs=None, sparse=per_position,
           records={},
           reference=(sparse_ops.add_layer_norm,),          # with the add before it (fuse_tokens)
           lowerings={sparse_ops.add_layer_norm: triton_ops.add_layer_norm},
           oracle=None),
]
