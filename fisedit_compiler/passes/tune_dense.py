"""tune_dense: the canonical graph as the engine runs it densely, tuned as a diffusers user would.

What it rewrites: a copy of the canonical graph (the canonical graph itself is not touched), in
which
- every conv whose kernel is larger than 1x1 (groups 1, weight a parameter) reads its weight in
  channels-last memory, and
- the linears that read one input are one GEMM (``passes.group_linears``: each attention's
  Q, K and V, and the text's K and V of the whole model),
with every weight in another form than the module's read from the edit program's
``DerivedWeights``: the conv kernel's packed weight *is* the conv weight in channels-last
memory (``kernels.sparse_conv.unpack_weight``, a view), and the grouped projections are the
edit graph's. The copies are looked up once, here, and held as buffers of the dense graph, so
``torch.compile`` sees plain static tensors; ``DerivedWeights.refresh`` rebuilds them in place
when the U-Net's weights change (``SparseEngine.refresh_weights``).

Why: ``SparseEngine.dense`` runs full-mask edits, edits whose plan runs every level dense, and
the editing flow's probe steps. The strongest dense setting a diffusers user picks is the
module in channels_last with fused QKV projections and Inductor's 1x1 convs as matmuls under
``torch.compile`` with CUDA graphs; the canonical graph compiled as captured was ~10% slower
(SD1.5 512 px on an H200: 7.37 ms against 6.71 ms, of which ~0.27 ms the fused QKV
projections and the rest channels_last: ``benchmarks/dense_paths.py``, RESULTS.md session 8
run 1), so an edit routed dense was slower than dense. Reading the sparse path's copies costs
no memory beyond what the edit program already holds.
"""

from __future__ import annotations

import copy
import operator

import torch.fx as fx

from .. import ir
from ..execution.derived_weights import COPIES, DerivedWeights, packed_conv_weight
from ..execution.kernels.sparse_conv import unpack_weight
from ..graph_keys import DERIVED_WEIGHTS
from .group_linears import group_linears
from .pattern import args_of, call, derived_weights, parameter, set_args

BAKED = "dense_weight_"


def tune_dense(canonical: fx.GraphModule, derived: DerivedWeights) -> fx.GraphModule:
    """A tuned copy of ``canonical`` (module docstring) reading copies held in ``derived``."""
    dense = fx.GraphModule(canonical, copy.deepcopy(canonical.graph))
    dense.add_submodule(DERIVED_WEIGHTS, derived)
    group_linears(dense)
    graph = dense.graph
    derived_node = derived_weights(dense)
    for node in list(graph.nodes):
        if not call(node, ir.conv2d):
            continue
        args = args_of(node)
        weight = args["weight"]
        value = parameter(dense, weight)
        if value is None or args["groups"] != 1 or value.dim() != 4 or value.shape[2:] == (1, 1):
            continue
        with graph.inserting_before(node):
            packed = graph.call_function(packed_conv_weight, (derived_node, weight))
            weight = graph.call_function(unpack_weight, (packed, tuple(value.shape[2:])))
        set_args(node, weight=weight)
    bake_derived_copies(dense)
    graph.eliminate_dead_code()
    delattr(dense, DERIVED_WEIGHTS)
    graph.lint()
    dense.recompile()
    return dense


def bake_derived_copies(dense: fx.GraphModule) -> None:
    """Replace, in place, each derived copy node of ``dense`` (and each view of one) by a
    buffer holding its value now, for a graph that ``torch.compile`` traces: Dynamo cannot
    trace the ``DerivedWeights`` lookup (``benchmarks/inductor_probe.py`` bakes an edit graph
    so too)."""
    graph = dense.graph
    for index, node in enumerate(list(graph.nodes)):
        if not (node.op == "call_function" and node.target in (*COPIES, unpack_weight)):
            continue
        # Their inputs are get_attr nodes: the DerivedWeights, weights, copies baked before.
        args = fx.node.map_arg(node.args, lambda arg: operator.attrgetter(arg.target)(dense))
        dense.register_buffer(f"{BAKED}{index}", node.target(*args), persistent=False)
        with graph.inserting_before(node):
            node.replace_all_uses_with(graph.get_attr(f"{BAKED}{index}"))
        graph.erase_node(node)
