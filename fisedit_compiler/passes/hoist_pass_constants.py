"""hoist_pass_constants: what an edit pass computes once leaves the step.

What it rewrites: the edit graph's calls computed from the inputs that an edit pass holds fixed
(every U-Net input but the sample and the timestep: the prompt's text states, added
conditions, class labels, an image hint) and from weights alone move into a graph of their
own, the *pass constants* graph, attached to the edit graph as ``PASS_CONSTANTS``. The edit
graph reads their values from one new placeholder, ``PASS_VALUES_INPUT`` (the constants
graph's output tuple), in place of each moved call whose value it still uses. In a U-Net those
calls are every cross-attention's K and V projections of the text (one GEMM after
``group_linears``) with their head reshapes, the text projections and pooling of IF and
Kandinsky, SDXL's added-condition inputs, a ControlNet hint's encoder. Calls that also read a
weight-only value (a derived weight copy, a constant) take a copy of it along; impure calls
(random, in-place) stay, and so does a value that a call of the step writes into
(``linear_accumulate``'s ``into``, with the call whose tuple it is taken from): moved, it would
be a pass value that every step adds to.

Why: a pipeline's loop calls the U-Net with the same text states at every step, so every step
recomputed the same text K/V: for SDXL a GEMM over 681 MB of weights (13% of the U-Net's),
~0.5 ms of a ~9 ms sparse step on an H200 (``benchmarks/micro_token_gemms.py``); for SD1.5
~0.07 ms. The engine (``engine.pass_values``) runs the constants graph at every pass's first
step and when a later step's fixed inputs are not the tensors, unchanged, that the values
were computed from (or the weights moved), so a pass computes them once; a CUDA-graph step
reads them from static buffers loaded then (``engine.cuda_graph``). Correctness does not rest
on the inputs staying fixed: an input that changes at every step (a ControlNet residual is
"fixed" by name; nothing computed from it alone is worth moving, since it is added to the
sample's activations) only makes the values computed at every step, as before.
``SparseConfig.hoist_pass_constants`` turns the pass off.

The pass rewrites the edit graph it is given in place (its pipeline's private intermediate,
like the fusions) and returns it; without anything to move it leaves the graph as it was.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from ..execution import sparse_ops, triton_ops
from ..graph_keys import CACHE_INPUT, PASS_CONSTANTS, PASS_VALUES_INPUT, PLAN_INPUT
from .pattern import args_of

# The inputs that change from one step of an edit pass to the next; with the plan and the
# recorded step, nothing computed from them is a pass constant.
STEP_INPUTS = frozenset({"sample", "timestep", PLAN_INPUT, CACHE_INPUT})
# Calls that write into one of their arguments (by name): what they write into stays a value
# of the step. (The reference op is functional; it is listed as its lowering's stand-in.)
WRITES_INTO = {sparse_ops.linear_accumulate: "into", triton_ops.linear_accumulate: "into"}


def hoist_pass_constants(edit: fx.GraphModule) -> fx.GraphModule:
    """Move, in place, the calls of ``edit`` computed from pass-fixed inputs and weights into
    the pass constants graph (module docstring); returns ``edit``."""
    graph = edit.graph
    fixed = [node for node in graph.nodes
             if node.op == "placeholder" and node.name not in STEP_INPUTS]
    weight_only, moved = _classify(graph, set(fixed))
    # Values the step still reads: a moved call with a user that stays (or the output).
    boundary = [node for node in graph.nodes
                if node in moved and any(user not in moved for user in node.users)]
    if not boundary:
        return edit
    constants = _constants_graph(edit, fixed, weight_only, moved, boundary)
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        values = graph.placeholder(PASS_VALUES_INPUT)
    for index, node in enumerate(boundary):
        with graph.inserting_before(node):
            read = graph.call_function(operator.getitem, (values, index))
        read.meta.update(node.meta)
        node.replace_all_uses_with(read, delete_user_cb=lambda user: user not in moved)
    for node in reversed(list(graph.nodes)):     # users before what they read
        if (node in moved or node in weight_only) and not node.users:
            graph.erase_node(node)
    edit.add_submodule(PASS_CONSTANTS, constants)
    graph.lint()
    edit.recompile()
    return edit


def _classify(graph: fx.Graph, fixed: set) -> tuple[set, set]:
    """``(weight_only, moved)``: the nodes computed from weights and constants alone, and the
    pure calls computed from ``fixed`` inputs (at least one) and weight-only values."""
    weight_only: set = set()
    moved: set = set()
    written = _written_into(graph)
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node in written:
            continue
        if node.op == "get_attr" or (node.op == "call_function" and not node.is_impure()
                                     and all(value in weight_only for value in inputs)):
            weight_only.add(node)
        elif (node.op == "call_function" and not node.is_impure()
              and all(value in fixed or value in moved or value in weight_only
                      for value in inputs)):
            moved.add(node)
    return weight_only, moved


def _written_into(graph: fx.Graph) -> set:
    """The values calls of ``WRITES_INTO`` write into, each with the call it is an element of
    (a ``getitem`` of a tuple returns the tuple's own tensor)."""
    written = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target in WRITES_INTO:
            value = args_of(node)[WRITES_INTO[node.target]]
            while isinstance(value, fx.Node) and value.target is operator.getitem:
                written.add(value)
                value = value.args[0]
            if isinstance(value, fx.Node):
                written.add(value)
    return written


def _constants_graph(edit: fx.GraphModule, fixed: list, weight_only: set, moved: set,
                     boundary: list) -> fx.GraphModule:
    """The graph that computes ``boundary`` from the ``fixed`` inputs it reads, by keyword
    as the edit graph takes them, returning their values as one tuple."""
    needed = ancestors(boundary)
    graph = fx.Graph()
    env: dict = {}
    for node in fixed:
        if node in needed:
            env[node] = graph.placeholder(node.name)
    for node in edit.graph.nodes:
        if node in needed and (node in moved or node in weight_only):
            env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[node] for node in boundary))
    return fx.GraphModule(edit, graph)


def ancestors(nodes: list) -> set:
    """``nodes`` and every node they are computed from."""
    seen: set = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen
