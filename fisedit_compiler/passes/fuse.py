"""fuse: fold each sparse conv's group norm and SiLU (before) and its time-embedding add,
residual add and output division (after) into the conv node.

Why: a ResNet block is ``norm -> SiLU -> conv -> + temb`` then ``norm -> SiLU -> conv -> +
shortcut``: eight ops over the same compact tensors for two convolutions. On the GPU the fused
conv applies the norm as a per-(batch, channel) scale and shift and the SiLU while it loads new
values (the halo reads the recorded post-activation input as it is, docs/design.md "Sparse ops"), and adds
bias, time embedding and residual before it stores, so the intermediate tensors never reach
memory and each conv costs one statistics kernel plus one conv kernel. On the reference path
``sparse_ops.sparse_conv2d`` computes the same sequence with torch ops, so fused and unfused
graphs agree, and the CPU oracle tests check the fusion itself.

The rewrite is local and conservative: an op is absorbed only when its single user is the next
op of the chain, the norm is at the conv's input level, the time embedding is a global value
(it does not depend on the plan) added before the residual, and the division is by a number.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ir
from ..execution import sparse_ops as ops
from ..graph_keys import PLAN_INPUT


def fuse(edit: fx.GraphModule) -> fx.GraphModule:
    """Fuse in place and return ``edit`` (see the module docstring)."""
    graph = edit.graph
    plan = next(node for node in graph.nodes if node.op == "placeholder"
                and node.name == PLAN_INPUT)
    positional = _descendants(plan)
    for conv in [n for n in graph.nodes if n.op == "call_function"
                 and n.target is ops.sparse_conv2d]:
        _fuse_prologue(graph, conv)
        _fuse_epilogue(graph, conv, positional)
    graph.lint()
    edit.recompile()
    return edit


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _fuse_prologue(graph: fx.Graph, conv: fx.Node) -> None:
    x, level_in = conv.args[0], conv.args[3]
    absorbed = []
    silu = False
    if ir.is_call(x, ir.silu) and _only_user(x) is conv:
        absorbed.append(x)
        silu, x = True, x.args[0]
    norm = None
    if (ir.is_call(x, ops.sparse_group_norm) and _only_user(x) is (absorbed[-1] if absorbed else conv)
            and x.args[3] == level_in):
        _, stats, _, _, groups, weight, bias, eps, policy = x.args
        absorbed.append(x)
        norm, x = (stats, groups, weight, bias, eps, policy), x.args[0]
    if not absorbed:
        return
    conv.args = (x,) + conv.args[1:]
    conv.kwargs = {**conv.kwargs, "norm": norm, "silu": silu}
    for node in absorbed:          # consumer first, so each has no users left when erased
        graph.erase_node(node)


def _fuse_epilogue(graph: fx.Graph, conv: fx.Node, positional: set) -> None:
    fused: dict = {}
    chain: list[fx.Node] = []
    last = conv
    while (user := _only_user(last)) is not None and user.op == "call_function":
        other = _other_operand(user, last)
        if (user.target is ir.add and isinstance(other, fx.Node) and "temb" not in fused
                and "residual" not in fused and other not in positional):
            fused["temb"] = other
        elif (user.target is ir.add and isinstance(other, fx.Node) and "residual" not in fused
              and other in positional):
            fused["residual"] = other
        elif (user.target is ir.div and user.args[0] is last and isinstance(other, (int, float))
              and "out_divisor" not in fused):
            fused["out_divisor"] = float(other)
        else:
            break
        chain.append(user)
        last = user
    if not chain:
        return
    # The fused conv takes the place of the chain's last node, after its extra operands.
    last.append(conv)
    conv.kwargs = {**conv.kwargs, **fused}
    last.replace_all_uses_with(conv)
    for node in reversed(chain):
        graph.erase_node(node)


def _other_operand(node: fx.Node, operand: fx.Node):
    if len(node.args) != 2 or node.kwargs:
        return None
    first, second = node.args
    if first is operand and second is not operand:
        return second
    if second is operand and first is not operand:
        return first
    return None


def _descendants(root: fx.Node) -> set:
    seen, stack = set(), [root]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return seen
