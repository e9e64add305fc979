"""attention: one scaled-dot-product attention.

Each query attends on its own, so the sparse form computes the active queries. Self-attention
K/V under ``full`` (exact) are the recorded K/V with the active rows replaced (the rewrite reads
them); under ``sparse`` (FISEdit's fast mode, an approximation the oracle applies too) the
active tokens only. Cross-attention K/V come from the text (docs/design.md, "Sparse ops"), under the text's
attention mask if the U-Net is given one.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from ... import ir
from ...execution import sparse_ops, triton_ops
from .spec import OPAQUE, Domain, OpSpec, domain_of, shape_of

aten = torch.ops.aten


def _rule(b, a: dict):
    if a["dropout_p"] != 0 or a["is_causal"] or a.get("enable_gqa"):
        return None
    return b.emit("attention", b.get(a["query"]), b.get(a["key"]), b.get(a["value"]),
                  b.get(a["attn_mask"]), a["scale"])


def _domain(node: fx.Node) -> Domain:
    """Positional queries keep their positions, whether K/V are the level's tokens (self),
    global (text) or opaque: computed densely, like the text-and-image K/V that IF's and
    Kandinsky's added-KV attention concatenates."""
    query, key = domain_of(node.args[0]), domain_of(node.args[1])
    if not query.positional or query.dims != (len(shape_of(node.args[0])) - 2,):
        return OPAQUE
    if key.positional and key.size != query.size:
        return OPAQUE
    if node.args[3] is not None and domain_of(node.args[3]).kind != "global":
        return OPAQUE
    return query


def _meta(node: fx.Node) -> dict:
    """Self-attention attends to the level's own tokens; cross-attention to the text."""
    return {ir.META_ATTN_KIND: "self" if domain_of(node.args[1]).positional else "cross"}


def _macs(node: fx.Node) -> int:
    query, key, value = (shape_of(a) for a in node.args[:3])
    return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])


def _is_sparse_self(node: fx.Node, config) -> bool:
    """Self-attention that the ``sparse`` policy restricts to the active keys. A self-attention
    with a mask of its own is not one: it runs dense and exact (``_sparse`` declines it), so
    the oracle must take it as exact too."""
    return (node.meta.get(ir.META_ATTN_KIND) == "self" and config.self_attention == "sparse"
            and node.args[3] is None)


def _edit_macs(node: fx.Node, level, config, dense: float) -> float:
    """Active queries; under the ``sparse`` self-attention policy, against active keys only."""
    fraction = level.count / (level.size[0] * level.size[1])
    return dense * fraction * fraction if _is_sparse_self(node, config) else dense * fraction


def _sparse(edit, node: fx.Node):
    q, k, v, mask, scale = node.args
    is_self = node.meta.get(ir.META_ATTN_KIND) == "self"
    # A mask over the keys alone (an encoder_attention_mask, one row for every query) holds
    # for the active queries as it is; one with a row per query, or on self-attention, would
    # need its rows gathered: those run dense.
    if mask is not None and (is_self or len(shape_of(mask)) < 2 or shape_of(mask)[-2] != 1):
        return None
    if is_self and not (domain_of(k).positional and domain_of(v).positional):
        return None
    if not is_self and (domain_of(k).positional or domain_of(v).positional):
        return None
    recorded_k = recorded_v = None
    if is_self and edit.config.self_attention == "full":
        recorded_k, recorded_v = edit.read(k), edit.read(v)
    policy = edit.config.self_attention if is_self else "cross"
    return edit.emit(sparse_ops.sparse_attention, edit.env[q], edit.env[k], edit.env[v],
                     recorded_k, recorded_v, edit.plan, domain_of(node).level, scale, policy,
                     None if mask is None else edit.env[mask], source=node)


def _oracle(node, args, original, active, config):
    """``sparse`` self-attention: queries attend to the active tokens only."""
    if not _is_sparse_self(node, config):
        return None
    q, k, v, _, scale = args
    return F.scaled_dot_product_attention(q, k, v, attn_mask=active.flatten()[None, :],
                                          scale=scale)


SPECS = [
    OpSpec(name="attention", fn=ir.attention, kind="attention",
           aten={aten.scaled_dot_product_attention.default: _rule},
           domain=_domain, macs=_macs, edit_macs=_edit_macs, sparse=_sparse, records={},
           # With the query projection folded into the text keys (passes.fold_text_queries).
           reference=(sparse_ops.sparse_attention, sparse_ops.text_attention,
                      sparse_ops.fold_text_keys),
           lowerings={sparse_ops.sparse_attention: triton_ops.sparse_attention,
                      sparse_ops.text_attention: triton_ops.text_attention},
           oracle=_oracle, meta=_meta, opaque_inputs=True),
]
