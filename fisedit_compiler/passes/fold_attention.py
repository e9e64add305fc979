"""fold_attention: attention written out as ``bmm(softmax(baddbmm(.., q, k^T)), v)`` becomes
the canonical attention op.

Why: diffusers' ``AttnProcessor`` (what ``set_default_attn_processor`` and
``set_attn_processor(AttnProcessor())`` install, and the processor of torch setups without
scaled-dot-product attention) computes attention as three ATen ops: ``baddbmm`` of the
queries and the transposed keys (scaled by ``alpha``; an attention mask as its added input,
``beta=1``), a softmax over the keys and a ``bmm`` with the values. None of them has a
canonical form, so the whole attention, and everything downstream of it up to the next
reshape to positions, ran dense (measured on sd15-tiny: a fifth of the MACs of a small edit).
As the canonical op (``scaled_dot_product_attention`` on ``[batch * heads, tokens, dim]``)
the attention is sparse like the default processor's, computing the active queries.

Taken only where the pattern is exactly that: the softmax over the last dim, the keys a
permute of their last two dims, ``beta`` 0 (the added input ignored, as ``torch.baddbmm``
documents) or 1 with a mask of the queries' dtype, and no node of the pattern read
elsewhere. The casts of ``upcast_attention`` / ``upcast_softmax`` around it may be there:
the canonical op computes its softmax in fp32 for half inputs anyway (as diffusers' default
processor does for these models), so its result differs from the explicit form's only by
rounding, as the default processor's does.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ir
from ..graph_keys import UNKNOWN_OPS
from .canonicalize import canonical_call, unknown_ops
from .registry.spec import aten_arguments

aten = torch.ops.aten
_SOFTMAX = (aten.softmax.int, aten._softmax.default)


def fold_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every matching pattern in place and return ``gm`` (see the module docstring)."""
    graph = gm.graph
    folded = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.bmm.default:
            folded |= _fold(graph, node)
    if folded:
        graph.lint()
        gm.recompile()
        gm.meta[UNKNOWN_OPS] = unknown_ops(gm)
    return gm


def _strip_cast(node, *, widening: bool = True):
    """The input of a cast node (``upcast_attention``'s and ``upcast_softmax``'s), else
    ``node``. With ``widening`` only a cast to a dtype that holds the input exactly is
    stripped: a softmax computed in a narrower dtype than its scores is another function."""
    if isinstance(node, fx.Node) and ir.is_call(node, ir.cast) and len(node.users) == 1:
        source, dtype = node.args[0], node.args[1]
        if _dtype(source) is not None and (
                not widening or torch.promote_types(_dtype(source), dtype) == dtype):
            return source
    return node


def _dtype(node) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _fold(graph: fx.Graph, bmm: fx.Node) -> bool:
    bmm_args = aten_arguments(bmm)
    probs, value = bmm_args["self"], bmm_args["mat2"]
    # The probabilities may come back to the values' dtype (upcast_softmax's cast down).
    softmax = _strip_cast(probs, widening=False)
    if not (isinstance(softmax, fx.Node) and softmax.target in _SOFTMAX
            and len(softmax.users) == 1 and aten_arguments(softmax)["dim"] in (-1, 2)):
        return False
    scores = _strip_cast(aten_arguments(softmax)["self"])
    if not (isinstance(scores, fx.Node) and scores.target is aten.baddbmm.default
            and len(scores.users) == 1):
        return False
    scores_args = aten_arguments(scores)
    added, key_t = scores_args["self"], scores_args["batch2"]
    beta, alpha = scores_args["beta"], scores_args["alpha"]
    if not (ir.is_call(key_t, ir.permute) and tuple(key_t.args[1]) == (0, 2, 1)):
        return False
    query, key = _strip_cast(scores_args["batch1"]), _strip_cast(key_t.args[0])
    dtype = _dtype(bmm)
    if not (_dtype(query) == _dtype(key) == _dtype(value) == dtype == _dtype(probs)):
        return False
    if beta == 0:
        mask = None
    elif beta == 1 and _dtype(added) == dtype:
        mask = added
    else:
        return False
    with graph.inserting_before(bmm):
        attention = canonical_call(graph, "attention", (query, key, value, mask, float(alpha)),
                                   bmm.meta, "aten.baddbmm.default, aten.softmax, "
                                   "aten.bmm.default")
    bmm.replace_all_uses_with(attention)
    # The pattern's nodes, users before what they read; shared ones (a key permute read
    # elsewhere) and the inputs the attention now reads stay.
    pattern = [bmm, probs, softmax, aten_arguments(softmax)["self"], scores,
               None if mask is not None else added, key_t, key_t.args[0], scores_args["batch1"]]
    erased = set()
    for node in pattern:
        if isinstance(node, fx.Node) and node not in erased and not node.users:
            graph.erase_node(node)
            erased.add(node)
    return True
