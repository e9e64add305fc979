"""pattern: what the fusion passes match, by argument name and with checked users.

Why: a fusion that reads ``conv.args[3]`` or unpacks ``norm.args`` into five names breaks
silently when an op's signature changes (an argument added, two swapped). Here a call node's
arguments are bound to its target's signature (``args_of``), so a pass names what it reads,
and a signature change fails loudly at the first match. Rewrites set arguments by name too
(``set_args``). A matched node may be absorbed only where the pass knows all its users
(``only_user``), as in Inductor's pattern matcher, whose ``CallFunction(target, KeywordArg(..))``
patterns with their user checks are the model (docs/design.md, "Stages").
"""

from __future__ import annotations

import functools
import inspect
import operator

import torch
import torch.fx as fx

from ..execution.derived_weights import DerivedWeights
from ..graph_keys import DERIVED_WEIGHTS


@functools.lru_cache(maxsize=None)
def _signature(target) -> inspect.Signature:
    return inspect.signature(target)


def call(node, target, *, users: int | None = None) -> bool:
    """Whether ``node`` is a call of ``target`` (with exactly ``users`` users, when given)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is target
            and (users is None or len(node.users) == users))


def args_of(node: fx.Node) -> dict:
    """The call's arguments by parameter name, defaults filled in."""
    bound = _signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def set_args(node: fx.Node, **changes) -> None:
    """Give named parameters of the call new values; positional parameters stay positional,
    keyword-only ones are keywords."""
    signature = _signature(node.target)
    unknown = set(changes) - set(signature.parameters)
    if unknown:
        raise TypeError(f"{node.target.__name__} has no parameter {sorted(unknown)}")
    args = list(node.args)
    kwargs = dict(node.kwargs)
    for index, (name, parameter) in enumerate(signature.parameters.items()):
        if name not in changes:
            continue
        if parameter.kind == inspect.Parameter.KEYWORD_ONLY or index >= len(args):
            kwargs[name] = changes[name]
        else:
            args[index] = changes[name]
    node.args, node.kwargs = tuple(args), kwargs


def parameter(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node names, or None for anything else."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = operator.attrgetter(node.target)(gm)
    return value if isinstance(value, torch.Tensor) else None


def only_user(node: fx.Node) -> fx.Node | None:
    """The node's single user, or None when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def derived_weights(gm: fx.GraphModule) -> fx.Node:
    """A ``get_attr`` node, at the top of the graph, of the graph's ``DerivedWeights`` (made and
    attached on first use): the derived weight copies of the program (packed conv weights,
    grouped projections) live there and go with it."""
    if not hasattr(gm, DERIVED_WEIGHTS):
        gm.add_submodule(DERIVED_WEIGHTS, DerivedWeights())
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == DERIVED_WEIGHTS:
            return node
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]) if placeholders else \
            gm.graph.inserting_before(next(iter(gm.graph.nodes))):
        return gm.graph.get_attr(DERIVED_WEIGHTS)
