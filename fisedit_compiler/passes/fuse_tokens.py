"""fuse_tokens: the transformer blocks' residual add + layer_norm, GEGLU, and the feed-forward's
return to the residual, as single ops.

Why: in every BasicTransformerBlock the residual add and the layer norm after it read and
write the same token rows, and the feed-forward's GEGLU splits a projection, applies GELU to
one half and multiplies: two and three kernels on the reference path (the split is a view),
one each fused (``execution/kernels/tokens.py``, 2.2-3.2x faster than the torch ops at SD1.5
sizes on the H100). The fused ops' references (``sparse_ops.add_layer_norm`` and ``sparse_ops.geglu``)
run the same torch sequence, so the CPU tests check the rewrite itself.

Only exact patterns are taken: a layer norm over the last dim whose input is an add of two
values (the add's other users get the sum from the fused op), and ``a * gelu(b)`` where a and
b are the two halves of one split and nothing else reads them. A layer norm over the last dim
whose input is no add (a transformer block's first norm) becomes the same fused op with no
residual: on the GPU that is the token kernel (one program per row) in place of torch's layer
norm kernel, which the 5% SD1.5 profile timed at 3.9 us a call against 2.2 us for the fused
add and norm (benchmarks/RESULTS.md, session 26).

Then a block's last step, ``linear(g, W, b) + total`` where ``total`` is the sum a fused add +
layer norm stored and nothing else reads, becomes ``linear_accumulate(g, W, total)`` with ``b``
moved into that sum (``add_layer_norm``'s ``sum_bias``): on the GPU the GEMM adds its product
into the sum in place (``execution.triton_ops``), one launch where the linear and the add took
two.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .. import ir
from ..execution import sparse_ops as ops
from .pattern import args_of, call, set_args

_getitem = operator.getitem


def fuse_tokens(edit: fx.GraphModule) -> fx.GraphModule:
    """Fuse in place and return ``edit`` (see the module docstring)."""
    graph = edit.graph
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if ir.is_call(node, ir.layer_norm):
            _fuse_add_layer_norm(graph, node, order)
        elif ir.is_call(node, ir.mul):
            _fuse_geglu(graph, node)
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if ir.is_call(node, ir.add):
            _accumulate_into_sum(graph, node, order)
    graph.lint()
    edit.recompile()
    return edit


def _fuse_add_layer_norm(graph: fx.Graph, norm: fx.Node, order: dict) -> None:
    norm_args = args_of(norm)
    total, weight, bias = norm_args["x"], norm_args["weight"], norm_args["bias"]
    if len(norm_args["normalized_shape"]) != 1:
        return
    if call(total, ir.add):
        x, residual = total.args      # operator.add: two positional operands
        params = [p for p in (weight, bias) if isinstance(p, fx.Node)]
        if not (isinstance(x, fx.Node) and isinstance(residual, fx.Node)) or any(
                order[p] > order[total] for p in params):
            return
        anchor = total.next           # right after the sum: its other readers may precede the norm
    else:
        x, residual, anchor = total, None, norm
    with graph.inserting_before(anchor):
        fused = graph.call_function(ops.add_layer_norm,
                                    (x, residual, weight, bias, norm_args["eps"]))
        summed = None if residual is None else graph.call_function(_getitem, (fused, 0))
        normed = graph.call_function(_getitem, (fused, 1))
    norm.replace_all_uses_with(normed)
    graph.erase_node(norm)
    if summed is not None:
        total.replace_all_uses_with(summed)
        graph.erase_node(total)


def _accumulate_into_sum(graph: fx.Graph, add: fx.Node, order: dict) -> None:
    if len(add.args) != 2 or add.kwargs:
        return
    for product, total in (add.args, add.args[::-1]):
        if (call(product, ir.linear, users=1) and call(total, _getitem, users=1)
                and total.args[1] == 0 and call(total.args[0], ops.add_layer_norm)):
            break
    else:
        return
    fused = total.args[0]
    fused_args, linear_args = args_of(fused), args_of(product)
    bias = linear_args["bias"]
    if fused_args["residual"] is None or fused_args["sum_bias"] is not None or not (
            bias is None or isinstance(bias, fx.Node)):
        return
    if bias is not None and order[bias] > order[fused]:
        if bias.op != "get_attr":
            return
        fused.prepend(bias)          # a parameter: read it before the sum that now adds it
    set_args(fused, sum_bias=bias)
    with graph.inserting_before(add):
        accumulated = graph.call_function(ops.linear_accumulate,
                                          (linear_args["x"], linear_args["weight"], total))
    add.replace_all_uses_with(accumulated)
    graph.erase_node(add)
    graph.erase_node(product)


def _fuse_geglu(graph: fx.Graph, mul: fx.Node) -> None:
    hidden, gelu = mul.args           # operator.mul: two positional operands
    # getitem(split(x, [n, n], dim), 0) * gelu(getitem(<the same split>, 1), "none"), where the
    # fused op replaces every user of every node of the pattern.
    if not (call(gelu, ir.gelu, users=1) and args_of(gelu)["approximate"] == "none"
            and call(hidden, _getitem, users=1) and hidden.args[1] == 0):
        return
    gate = args_of(gelu)["x"]
    split = hidden.args[0]
    if not (call(gate, _getitem, users=1) and gate.args == (split, 1)
            and call(split, ir.split, users=2)):
        return
    split_args = args_of(split)
    sizes = split_args["sizes"]
    if len(sizes) != 2 or sizes[0] != sizes[1]:
        return
    with graph.inserting_before(mul):
        fused = graph.call_function(ops.geglu, (split_args["x"], split_args["dim"]))
    mul.replace_all_uses_with(fused)
    for node in (mul, gelu, gate, hidden, split):
        graph.erase_node(node)
