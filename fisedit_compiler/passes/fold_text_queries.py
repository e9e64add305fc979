"""fold_text_queries: each cross-attention's query projection moves into its text keys.

What it rewrites: in the edit graph, a cross-attention to the text (``sparse_attention`` under
the ``cross`` policy, no attention mask) whose queries are the heads of a bias-free linear of
the token rows, ``permute(compact_reshape(linear(x, Wq), [B, N, H, D]), (0, 2, 1, 3))``,
becomes ``text_attention(x, fold_text_keys(K, Wq, scale), V)``: each head scores the rows
against ``scale * K_h Wq_h`` (``[B, H, T, C]``), which is ``(x Wq_h^T) K_h^T * scale``
rearranged (``execution/kernels/text_attention.py``).

Why: the folded keys depend only on the text and a weight, so ``hoist_pass_constants``, which
runs after this pass, computes them once per edit pass; every step then runs one kernel where
it ran three (the query GEMM, the attention and the copy that put its heads back into rows),
per cross-attention: 16 in an SD1.5 step, 70 in SDXL's. The scores change only by rounding
(the folded keys are rounded once to the model's dtype where the queries were before), so the
result meets the oracle at the same tolerance.

Taken only where the pattern is exactly that, each node of it read only by the next (the
query projection is not needed elsewhere), where the keys and values are computed from
pass-fixed inputs and weights alone (not from the sample, as an added-KV attention's image
tokens are), and only where the edit pass holds them fixed
(``SparseConfig.hoist_pass_constants``; without it the fold would run at every step, a GEMM
over the text for the one it saves, so the pipeline does not run this pass). A query bias, a
query norm (``qk_norm``), an attention mask, or the explicit attention of diffusers'
``AttnProcessor`` (heads folded into the batch) leave the attention as it was.
Taken only where the folded keys read at most ``MAX_EXTRA_KEY_BYTES`` more than the query
weight they replace (``folding_pays``): each step reads the folded keys (``B * H * T * C``
values) where it read the weight (``C * H * D``), and the kernel reads them again from L2 for
every block of query rows. Where they are small (SD1.5 at CFG batch 2 in fp16: 0.2-1.6 MB, at
most 0.8 MB more than the weight) the fold measured faster; where they are large (SDXL: 20
heads x 77 tokens x 1280 channels, 7.9 MB against a 3.3 MB weight) the folded step measured
slower (benchmarks/RESULTS.md, session 27: SDXL's 5% step 0.14-0.2 ms slower folded, on an
H100, runs alternated; the kernel alone was faster, so part of the cost is elsewhere in the
step, not yet profiled). The sizes are judged at that batch and dtype for every program, so a
model folds the same cross-attentions at any batch (with or without CFG) and dtype.
``SparseConfig.fold_text_queries`` turns the pass off.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ir
from ..execution import sparse_ops as ops
from .hoist_pass_constants import STEP_INPUTS, ancestors
from .pattern import args_of, call, parameter

# The most bytes the folded keys of one cross-attention may read beyond its query weight
# (module docstring), fp16 at CFG batch 2 on an H100 (RESULTS.md, session 27): above SD1.5's
# four shapes (+0.59, +0.76, -0.13, -0.13 MB), where the fold paid, below SDXL's two (+1.15,
# +4.6 MB), where it cost. Only that batch and dtype were measured, so the rule counts bytes
# as there (``folding_pays``): a model folds the same cross-attentions at any batch and dtype.
MAX_EXTRA_KEY_BYTES = 2 ** 20
_MEASURED_BATCH = 2
_MEASURED_ITEM_BYTES = 2


def fold_text_queries(edit: fx.GraphModule) -> fx.GraphModule:
    """Fold, in place, every matching cross-attention (module docstring); returns ``edit``."""
    graph = edit.graph
    folded = False
    for node in list(graph.nodes):
        if call(node, ops.sparse_attention):
            folded |= _fold(edit, node)
    if folded:
        graph.lint()
        edit.recompile()
    return edit


def _fold(edit: fx.GraphModule, attention: fx.Node) -> bool:
    arguments = args_of(attention)
    if arguments["policy"] != "cross" or arguments["attn_mask"] is not None:
        return False
    # The keys and values must be fixed for the pass (not, like an added-KV attention's
    # image tokens, computed from the sample): else the fold would run at every step.
    if any(node.op == "placeholder" and node.name in STEP_INPUTS
           for node in ancestors([arguments["k"], arguments["v"]])):
        return False
    heads = arguments["q"]
    if not (call(heads, ir.permute, users=1) and tuple(args_of(heads)["dims"]) == (0, 2, 1, 3)):
        return False
    rows = args_of(heads)["x"]
    if not call(rows, ops.compact_reshape, users=1):
        return False
    template, compact_dim = args_of(rows)["template"], args_of(rows)["compact_dim"]
    if compact_dim != 1 or len(template) != 4 or template[1] is not None:
        return False
    projection = args_of(rows)["x"]
    if not (call(projection, ir.linear, users=1) and args_of(projection)["bias"] is None):
        return False
    weight = args_of(projection)["weight"]
    query_weight = parameter(edit, weight)
    if query_weight is None or query_weight.dim() != 2 or \
            query_weight.shape[0] != template[2] * template[3]:
        return False
    if not folding_pays(arguments["k"], query_weight):
        return False
    graph = edit.graph
    with graph.inserting_before(attention):
        keys = graph.call_function(ops.fold_text_keys,
                                   (arguments["k"], weight, arguments["scale"]))
        folded = graph.call_function(ops.text_attention,
                                     (args_of(projection)["x"], keys, arguments["v"]))
    keys.meta.update(attention.meta)
    folded.meta.update(attention.meta)
    attention.replace_all_uses_with(folded)
    for node in (attention, heads, rows, projection):
        graph.erase_node(node)
    return True


def folding_pays(keys: fx.Node, query_weight: torch.Tensor) -> bool:
    """Whether the folded keys of text keys ``keys`` (``[B, H, T, D]``, known from the trace)
    read at most ``MAX_EXTRA_KEY_BYTES`` more than ``query_weight`` (``[H * D, C]``), both
    counted as where the rule was measured (CFG batch 2, fp16) whatever this program's batch
    and dtype; False where the trace left the keys' shape unknown."""
    value = keys.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return False
    _, heads, tokens, _ = value.shape
    folded_values = _MEASURED_BATCH * heads * tokens * query_weight.shape[1]
    extra_values = folded_values - query_weight.numel()
    return extra_values * _MEASURED_ITEM_BYTES <= MAX_EXTRA_KEY_BYTES
