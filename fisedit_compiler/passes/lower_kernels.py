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

And it gives the sparse convs and the mixed self-attentions whose recorded values come straight
from the cache a ``recorded_shift``: the cache's ``cache_shift``, a byte distance on the device
(``kernels.recorded_shift``). A recorded step's own store has none, so nothing changes; a
CUDA graph's static store sets it, so the captured step (or, where a capture failed, the step
run on the static store) reads the recorded step it stands for where that step lives instead
of a copy of it in the static store (``engine.cuda_graph``). The keys
read only so are named in ``edit.meta[IN_PLACE_KEYS]``: the static store copies every other
value before a replay, and ``EditCache`` lays these out after the rest, so that copy is one
run of memory. Every key read at the shift is named in ``edit.meta[SHIFTED_KEYS]``: a key
read at the shift and also otherwise is copied, and the shift then measures from the static
store's own copy of the step (``engine.cuda_graph``).
"""

from __future__ import annotations

import torch.fx as fx

from ..execution import sparse_ops, triton_ops
from ..execution.derived_weights import packed_conv_weight
from ..graph_keys import CHANNELS_LAST_KEYS, IN_PLACE_KEYS, SHIFTED_KEYS
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
    edit.meta[IN_PLACE_KEYS], edit.meta[SHIFTED_KEYS] = _shift_recorded_reads(edit)
    edit.recompile()
    return edit


# The arguments of each op that take a recorded value its kernel reads at the recorded shift.
_SHIFTED_ARGUMENTS = {triton_ops.sparse_conv2d: ("recorded",),
                      triton_ops.sparse_attention: ("recorded_k", "recorded_v")}


def _shift_recorded_reads(edit: fx.GraphModule) -> tuple[frozenset, frozenset]:
    """Give each op of ``_SHIFTED_ARGUMENTS`` whose recorded arguments are all cache reads
    the cache's shift; returns the keys that nothing reads otherwise, and the keys read at
    the shift."""
    graph = edit.graph
    reads = [node for node in graph.nodes if call(node, sparse_ops.cache_read)]
    if not reads:
        return frozenset(), frozenset()
    shift = None
    shifted_uses = set()            # (cache read, op) pairs read at the shift
    for node in graph.nodes:
        names = _SHIFTED_ARGUMENTS.get(node.target) if node.op == "call_function" else None
        recorded = [args_of(node)[name] for name in names or ()]
        if not recorded or not all(call(read, sparse_ops.cache_read) for read in recorded):
            continue
        if shift is None:       # one shift, before the first op that reads it
            with graph.inserting_before(node):
                shift = graph.call_function(sparse_ops.cache_shift,
                                            (args_of(recorded[0])["cache"],))
        set_args(node, recorded_shift=shift)
        shifted_uses.update((read, node) for read in recorded)
    keys_read_elsewhere = {args_of(read)["key"] for read in reads
                           if any((read, user) not in shifted_uses
                                  or _passed_elsewhere(user, read) for user in read.users)}
    in_place = frozenset(args_of(read)["key"] for read in reads) - keys_read_elsewhere
    return in_place, frozenset(args_of(read)["key"] for read, _ in shifted_uses)


def _passed_elsewhere(op: fx.Node, read: fx.Node) -> bool:
    """Whether ``op`` takes ``read`` in an argument other than its shifted recorded ones."""
    shifted = _SHIFTED_ARGUMENTS[op.target]
    passed = []
    for name, value in args_of(op).items():
        if name not in shifted:
            fx.node.map_arg(value, passed.append)
    return read in passed
