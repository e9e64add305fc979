"""canonicalize: map an ATen-level captured graph onto the canonical op set of ``ir``.

Why: export and Dynamo reach ATen with many spellings of one thing (``view``, ``reshape``,
``flatten``, ``unsqueeze`` are all reshapes; ``transpose`` is a permute; ``chunk`` is a split;
``to.dtype`` may be a no-op). Passes should match one form. This pass rewrites every known op to
its canonical function with positional, fully explicit arguments (shapes taken from the
captured static shapes), folds no-ops (division or multiplication by 1.0, dropout with p = 0 or
in eval, casts to the same dtype, ``contiguous``, ``clone``, metadata asserts) and folds a zero
``pad`` that feeds only convolutions into their (top, bottom, left, right) padding. The rules
are the ops' own, in their registry entries (``OpSpec.aten``); this pass only drives them.

An op with no canonical form is copied unchanged, tagged ``META_UNKNOWN`` and listed in
``gm.meta["fc_unknown_ops"]``: never dropped, so the canonical graph still equals eager. A
random op (ATen's ``nondeterministic_seeded`` tag: ``randn_like``, a dropout in training mode,
a generator's ``randperm``) is refused instead: an edit cannot draw the recording's numbers
again, so no edit, not even one that changes nothing, could equal the recording.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from .. import ir
from ..errors import UnsupportedGraphError
from ..graph_keys import UNKNOWN_OPS
from . import registry
from .registry.spec import aten_arguments

aten = torch.ops.aten


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a new GraphModule in the canonical dialect (the input graph is left unchanged)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node | object] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lambda n: env[n]))
            continue
        if node.op != "call_function":
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        rule = registry.aten_rule(node.target) or _FOLDS.get(node.target)
        result = rule(_Builder(graph, env, node), aten_arguments(node)) if rule else None
        if result is None:
            _refuse_if_random(node)
            new = graph.node_copy(node, lambda n: env[n])
            new.meta[ir.META_UNKNOWN] = True
            env[node] = new
        else:
            env[node] = result
    graph.eliminate_dead_code()
    result_gm = fx.GraphModule(gm, graph)
    result_gm.meta.update(gm.meta)
    result_gm.meta[UNKNOWN_OPS] = unknown_ops(result_gm)
    return result_gm


def canonical_call(graph: fx.Graph, name: str, args, meta: dict, source: str) -> fx.Node:
    """A call of op ``name``'s canonical function on ``args``, with the metadata of the node(s)
    it stands for (``meta``; an unknown op's tag dropped) and its op and ``source`` named:
    how canonicalize and the fold passes make canonical nodes."""
    new = graph.call_function(registry.REGISTRY[name].fn, tuple(args))
    new.meta.update({key: item for key, item in meta.items() if key != ir.META_UNKNOWN})
    new.meta[ir.META_OP] = name
    new.meta[ir.META_SOURCE] = source
    return new


def unknown_ops(gm: fx.GraphModule) -> dict[str, int]:
    """{ATen op: count} of the graph's nodes with no canonical form (``META_UNKNOWN``); the
    fold passes recount them after rewriting some into canonical ops."""
    return dict(Counter(str(node.target) for node in gm.graph.nodes
                        if node.meta.get(ir.META_UNKNOWN)))


def _refuse_if_random(node: fx.Node) -> None:
    if not _draws(node):
        return
    modules = node.meta.get("nn_module_stack") or {}
    path = next(reversed(modules.values()), ("",))[0] if modules else ""
    where = f" in module {path!r}" if path else ""
    frames = (node.meta.get("stack_trace") or "").strip().splitlines()
    line = f" ({frames[-2].strip()})" if len(frames) >= 2 else ""
    fix = ("call .eval() before compiling (a dropout in training mode draws at every call; "
           "in a forward of your own, pass training=self.training to F.dropout and "
           "dropout_p=0 to scaled_dot_product_attention outside training)"
           if "dropout" in str(node.target) or "attention" in str(node.target) else
           "draw the numbers outside the U-Net and pass them in, or remove the random op")
    raise UnsupportedGraphError(
        f"the U-Net draws random numbers ({node.target}{where}{line}): an edit cannot draw the "
        f"recording's numbers again, so it could not equal the recorded generation; {fix}")


def _draws(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers: an op of ATen's ``nondeterministic_seeded`` tag,
    unless its arguments make it deterministic (a dropout with p = 0 or outside training,
    an attention with dropout_p = 0). (Capture does not decompose, so no deterministic op
    reaches here as its tagged building blocks.)"""
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    a = aten_arguments(node)
    if "dropout_p" in a:                                 # scaled_dot_product_attention
        return a["dropout_p"] != 0
    if "p" in a and "train" in a:                        # the dropout family
        return a["train"] is not False and a["p"] != 0
    return True


class _Builder:
    """Emits canonical nodes for one source node, carrying its metadata over; the ops' ATen
    rules receive it as ``b``."""

    def __init__(self, graph: fx.Graph, env: dict, source: fx.Node):
        self.graph, self.env, self.source = graph, env, source

    def get(self, value):
        return fx.map_arg(value, lambda n: self.env[n])

    def shape(self, value=None) -> list[int]:
        node = self.source if value is None else value
        return [int(s) for s in node.meta["val"].shape]

    def emit(self, name: str, *args) -> fx.Node:
        return canonical_call(self.graph, name, args, self.source.meta, str(self.source.target))

    def forward(self, value):
        """Fold the node into ``value`` (a canonical node of the new graph)."""
        return self.get(value)


def _dropout(b: _Builder, a: dict):
    if a["p"] == 0 or not a["train"]:
        return b.forward(a["input"])
    return None


# ATen ops that are no-ops here, so no canonical op claims them: they fold into their input
# (or, for a side-effect-only metadata assert, into nothing). Every other rule is an op's, in
# its registry entry.
_FOLDS = {
    aten.dropout.default: _dropout,
    aten.alpha_dropout.default: _dropout,
    aten.feature_dropout.default: _dropout,
    aten.feature_alpha_dropout.default: _dropout,
    aten.contiguous.default: lambda b, a: b.forward(a["self"]),
    aten.clone.default: lambda b, a: b.forward(a["self"]),
    aten.alias.default: lambda b, a: b.forward(a["self"]),
    aten.detach.default: lambda b, a: b.forward(a["self"]),
    aten._assert_tensor_metadata.default: lambda b, a: _DROPPED,
}

# What a side-effect-only node (a metadata assert) maps to: nothing in the new graph uses it.
_DROPPED = object()
