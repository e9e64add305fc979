"""lower_kernels: point the edit graph's sparse ops at their Triton implementations.

Why: the edit graph is built once per input signature, and the signature fixes the device, so
the choice between the torch reference ops (CPU, and the specification) and the Triton-backed
ops (CUDA) is made once, here, rather than tested on every call. The Triton-backed ops take the
same arguments and compute the same function (``execution.triton_ops``), so this pass changes
only node targets.

It also names, in ``edit.meta[CHANNELS_LAST_KEYS]``, the cache keys that sparse convs read as
their recorded input. The conv kernel gathers each pixel's channels as one vector, which is
contiguous only in a channels-last tensor, so the cache stores those values channels-last
(``EditCache`` packs every step anyway, so the layout costs nothing extra).
"""

from __future__ import annotations

import torch.fx as fx

from .. import ir
from ..execution import sparse_ops, triton_ops
from ..execution.triton_ops import LOWERINGS
from ..graph_keys import CHANNELS_LAST_KEYS


def lower_kernels(edit: fx.GraphModule) -> fx.GraphModule:
    """Retarget, in place, every op that has a Triton lowering; returns ``edit``."""
    for node in edit.graph.nodes:
        if node.op == "call_function" and node.target in LOWERINGS:
            node.target = LOWERINGS[node.target]
    edit.meta[CHANNELS_LAST_KEYS] = frozenset(
        node.args[1].args[1] for node in edit.graph.nodes
        if ir.is_call(node, triton_ops.sparse_conv2d)
        and ir.is_call(node.args[1], sparse_ops.cache_read))
    edit.recompile()
    return edit
