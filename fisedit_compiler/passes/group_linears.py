"""group_linears: the linears that read one tensor become one GEMM (grouped projections).

What it rewrites: in the edit graph, two or more ``ir.linear`` calls with the same input node
whose weights (and biases) are parameters (``get_attr``) of one dtype and input width, and
which all have a bias or none, become one ``sparse_ops.grouped_linear`` call over their weights
concatenated along the output features (a ``derived_weights.concatenated`` node each, for the
weights and the biases); each linear is replaced by its slice of the result (``getitem``: a
view, no copy). In a U-Net that groups each self-attention's Q, K and V
projections (they read the same normalized tokens) and every cross-attention's K and V
projections of the whole model (they all read the text embeddings).

Why: on a small edit each projection is a GEMM of a few hundred rows, bound by its launch and
latency (~4 us on an H200) rather than by its weights, so one GEMM over three times the
output features costs about what one projection did: ``benchmarks/micro_token_gemms.py``
measured the whole model's projections at a 5% edit at 0.33 -> 0.15 ms a step on SD1.5 and
1.91 -> 0.94 ms on SDXL (RESULTS.md, session 6 run 5). The price is a copy of the grouped
weights, made once per program and kept current by the graph's ``DerivedWeights``
(``pattern.derived_weights``; ``SparseEngine.edit`` makes it again after in-place weight
changes). ``SparseConfig.group_projections`` turns the pass off.

The pass rewrites the graph it is given in place and returns it: the edit graph (its
pipeline's private intermediate, like the fusions) and the engine's dense graph
(``passes.tune_dense``, which reads the edit graph's copies); the canonical and record graphs
are not touched, so recorded values are the module's own projections.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .. import ir
from ..execution import sparse_ops
from ..execution.derived_weights import concatenated
from .pattern import args_of, call, derived_weights, parameter


def group_linears(edit: fx.GraphModule) -> fx.GraphModule:
    """Group, in place, the linears of ``edit`` that read one input (module docstring)."""
    graph = edit.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    groups = [group for node in list(graph.nodes) for group in _groups(edit, node)]
    if not groups:
        return edit
    derived = derived_weights(edit)
    for group in groups:
        _rewrite(edit, group, derived, order)
    graph.lint()
    edit.recompile()
    return edit


def _groups(edit: fx.GraphModule, x: fx.Node) -> list[list[fx.Node]]:
    """The linears reading ``x`` as their input, by what lets them share one GEMM."""
    by_kind: dict[tuple, list[fx.Node]] = {}
    for user in x.users:
        if not call(user, ir.linear):
            continue
        args = args_of(user)
        weight, bias = parameter(edit, args["weight"]), args["bias"]
        if args["x"] is not x or weight is None or weight.dim() != 2:
            continue
        if bias is not None and parameter(edit, bias) is None:
            continue
        kind = (weight.dtype, weight.device, weight.shape[1], bias is None)
        by_kind.setdefault(kind, []).append(user)
    return [linears for linears in by_kind.values() if len(linears) > 1]


def _rewrite(edit: fx.GraphModule, linears: list[fx.Node], derived: fx.Node,
             order: dict) -> None:
    graph = edit.graph
    linears = sorted(linears, key=order.__getitem__)
    first = linears[0]
    args = [args_of(linear) for linear in linears]
    with graph.inserting_before(first):
        # Fresh get_attr nodes: a later linear's own may come after the first linear.
        weights = tuple(graph.get_attr(a["weight"].target) for a in args)
        weight = graph.call_function(concatenated, (derived, *weights))
        bias = None
        if args[0]["bias"] is not None:
            biases = tuple(graph.get_attr(a["bias"].target) for a in args)
            bias = graph.call_function(concatenated, (derived, *biases))
        sizes = tuple(parameter(edit, a["weight"]).shape[0] for a in args)
        grouped = graph.call_function(sparse_ops.grouped_linear,
                                      (args[0]["x"], weight, bias, sizes))
    # The first linear's facts (its canonical source), not its value's: the call returns a tuple.
    grouped.meta.update({key: value for key, value in first.meta.items()
                         if key not in ("val", "tensor_meta")})
    replaced = []
    for index, (linear, linear_args) in enumerate(zip(linears, args)):
        with graph.inserting_before(first):
            part = graph.call_function(operator.getitem, (grouped, index))
        part.meta.update(linear.meta)
        linear.replace_all_uses_with(part)
        replaced += [linear_args["weight"], linear_args["bias"]]
    for linear in linears:
        graph.erase_node(linear)
    for attribute in dict.fromkeys(replaced):
        if isinstance(attribute, fx.Node) and not attribute.users:
            graph.erase_node(attribute)
