"""The reference semantics of an edit (docs/design.md, "Oracle"), computed densely.

``masked_dense`` runs the canonical graph densely twice: on the original inputs, keeping every
node's value, then on the edited inputs, replacing after every positional (spatial or tokens)
node its value outside the level's effective mask by the original run's value. Global and
opaque nodes are computed normally. Where the config picks an approximation, the oracle applies
the same one at sparse levels: ``cached`` group norm normalises with the original run's
statistics, ``sparse`` self-attention lets queries attend to active tokens only. Dense levels
are exact, as in the engine.

It is slow and memory-hungry on purpose: it shares no code with the sparse ops it checks.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import ir
from ..execution.plan import MaskPlan
from ..graph_keys import INPUTS
from ..passes.analyze import META_BY_SHAPE
from .capture import flatten_inputs


@torch.no_grad()
def masked_dense(engine, plan: MaskPlan, original_inputs: dict, edited_inputs: dict):
    """The oracle's edit output for ``edited_inputs`` against the generation ``original_inputs``."""
    program = engine.program(original_inputs)
    gm = program.canonical
    names = gm.meta[INPUTS]
    original = _Recorder(gm).run_all(flatten_inputs(original_inputs), names)
    return _Masked(gm, plan, original, engine.config).run_all(
        flatten_inputs(edited_inputs), names)


class _Recorder(fx.Interpreter):
    def run_all(self, flat: dict, names: list[str]):
        self.values: dict[str, object] = {}
        self.run(*[flat[name] for name in names])
        return self.values

    def run_node(self, node):
        value = super().run_node(node)
        self.values[node.name] = value
        return value


class _Masked(fx.Interpreter):
    def __init__(self, gm, plan: MaskPlan, original: dict, config):
        super().__init__(gm)
        self.plan, self.original, self.config = plan, original, config

    def run_all(self, flat: dict, names: list[str]):
        return self.run(*[flat[name] for name in names])

    def run_node(self, node):
        domain = node.meta.get(ir.META_DOMAIN)
        sparse_level = (domain is not None and domain.positional
                        and not self.plan[domain.level].dense)
        # A node placed by its shape alone runs exactly (densely) in the edit, then restricted.
        approximated = sparse_level and not node.meta.get(META_BY_SHAPE)
        if approximated and ir.is_op(node, "group_norm") and self.config.group_norm == "cached":
            value = self._cached_group_norm(node)
        elif (approximated and ir.is_op(node, "attention")
              and node.meta.get(ir.META_ATTN_KIND) == "self"
              and self.config.self_attention == "sparse"):
            value = self._active_keys_attention(node, domain)
        else:
            value = super().run_node(node)
        if sparse_level and isinstance(value, torch.Tensor):
            keep = _position_mask(self.plan[domain.level].active, domain, value.dim())
            value = torch.where(keep, value, self.original[node.name])
        return value

    def _cached_group_norm(self, node):
        x, groups, weight, bias, eps = self.map_nodes_to_values(node.args, node)
        recorded = self.original[node.args[0].name].float()
        grouped = recorded.reshape(recorded.shape[0], groups, -1)
        mean = grouped.mean(-1, keepdim=True)
        variance = grouped.var(-1, unbiased=False, keepdim=True)
        new = x.float().reshape(x.shape[0], groups, -1)
        normed = ((new - mean) / torch.sqrt(variance + eps)).reshape(x.shape).to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if weight is not None:
            normed = normed * weight.reshape(shape)
        if bias is not None:
            normed = normed + bias.reshape(shape)
        return normed

    def _active_keys_attention(self, node, domain):
        q, k, v, _, scale = self.map_nodes_to_values(node.args, node)
        active = self.plan[domain.level].active.flatten()[None, :]  # [queries, keys]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=active, scale=scale)


def _position_mask(active: torch.Tensor, domain, rank: int) -> torch.Tensor:
    """The level mask shaped to broadcast over a tensor whose positions lie on ``domain.dims``."""
    shape = [1] * rank
    if len(domain.dims) == 2:
        shape[domain.dims[0]], shape[domain.dims[1]] = active.shape
    else:
        shape[domain.dims[0]] = active.numel()
    return active.reshape(shape)
