"""lower_kernels: point the edit graph's sparse ops at their Triton implementations.

Why: the edit graph is built once per input signature, and the signature fixes the device, so
the choice between the torch reference ops (CPU, and the specification) and the Triton-backed
ops (CUDA) is made once, here, rather than tested on every call. The Triton-backed ops take the
same arguments and compute the same function (``execution.triton_ops``), so this pass changes
only node targets.

The conv kernel multiplies by its weight packed as one matrix; the packed copies belong to
the program: each is a ``derived_weights.packed_conv_weight`` node of the edit graph's
``DerivedWeights`` (``pattern.derived_weights``), passed to its sparse conv as
``packed_weight``, so they live and go with it (docs/design.md, "State and lifetimes").

It also names, in ``edit.meta[CHANNELS_LAST_KEYS]``, the cache keys that sparse convs read as
their recorded input. The conv kernel gathers each pixel's channels as one vector, which is
contiguous only in a channels-last tensor, so the cache stores those values channels-last
(``EditCache`` packs every step anyway, so the layout costs nothing extra).
"""

from __future__ import annotations

import torch.fx as fx

from ..execution import sparse_ops, triton_ops
from ..execution.derived_weights import packed_conv_weight
from ..graph_keys import CHANNELS_LAST_KEYS
from . import registry
from .pattern import args_of, call, derived_weights, set_args


def lower_kernels(edit: fx.GraphModule, conv_method: str) -> fx.GraphModule:
    """Retarget, in place, every op that has a Triton lowering (``OpSpec.lowerings``), and give
    every sparse conv ``conv_method`` (``SparseConfig.conv_method``); returns ``edit``."""
    lowerings = registry.lowerings()
    for node in edit.graph.nodes:
        if node.op == "call_function" and node.target in lowerings:
            node.target = lowerings[node.target]
    convs = [node for node in edit.graph.nodes if call(node, triton_ops.sparse_conv2d)]
    if convs:
        derived = derived_weights(edit)
        for node in convs:
            with edit.graph.inserting_before(node):
                packed = edit.graph.call_function(
                    packed_conv_weight, (derived, args_of(node)["weight"]))
            set_args(node, packed_weight=packed, method=conv_method)
    recorded = [args_of(node)["recorded"] for node in convs]
    edit.meta[CHANNELS_LAST_KEYS] = frozenset(
        args_of(read)["key"] for read in recorded if call(read, sparse_ops.cache_read))
    edit.recompile()
    return edit
