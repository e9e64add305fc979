"""fuse: fold each sparse conv's group norm and SiLU (before) and its time-embedding add,
residual add and output division (after) into the conv node; then move the bias and the
time-embedding add of a conv that feeds only the next conv's norm into that norm.

Why: a ResNet block is ``norm -> SiLU -> conv -> + temb`` then ``norm -> SiLU -> conv -> +
shortcut``: eight ops over the same compact tensors for two convolutions. On the GPU
(``execution.triton_ops.sparse_conv2d``) the fused node runs as two launches: one group-norm
kernel computes the statistics, normalises the compact input and applies the SiLU in one pass
(only new values: the halo reads the recorded post-activation input as it is, docs/design.md
"Sparse ops"), then the conv kernel adds bias, time embedding and residual and divides before
it stores, so the epilogue's intermediate tensors never reach memory. (Applying the norm inside
the conv's loads was measured slower: the conv reads each input value once per tap,
benchmarks/RESULTS.md.) The first conv's bias and ``+ temb`` then move to the second conv's
norm (``input_bias``, ``input_temb``), whose kernel adds them as it reads the values: the first
conv is then a bare GEMM, and its epilogue launch goes (one per ResNet block with a time
embedding). Measured on SD1.5 at 5% (benchmarks/RESULTS.md, session 28), moving only the time
embedding removed 22 launches, but cuBLAS's split-K kernels with the bias epilogue it left took
~2 us more than without on the widest conv1s, most of what the launch cost; the bias moves
with it since session 29. On the reference path ``sparse_ops.sparse_conv2d`` computes the same
sequence with torch ops, so fused and unfused graphs agree, and the CPU oracle tests check the
fusion itself.

The rewrite is local and conservative: an op is absorbed only when its single user is the next
op of the chain, the norm is at the conv's input level, the time embedding is a global value
(it does not depend on the plan) added before the residual, and the division is by a number.
A bias and a time embedding move only from a conv with no residual or division after it,
whose single user is the conv with the norm; adding them before the norm is then the same
function. (A time embedding of another shape than ``[B or 1, C, 1]`` runs the receiving conv
on its torch reference, as it ran the giving one before the move: ``execution.triton_ops``.)
"""

from __future__ import annotations

import torch.fx as fx

from .. import ir
from ..execution import sparse_ops as ops
from ..graph_keys import PLAN_INPUT
from .pattern import args_of, call, only_user, set_args


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


def _fuse_prologue(graph: fx.Graph, conv: fx.Node) -> None:
    conv_args = args_of(conv)
    x = conv_args["x"]
    absorbed = []
    silu = False
    if call(x, ir.silu) and only_user(x) is conv:
        absorbed.append(x)
        silu, x = True, args_of(x)["x"]
    norm = None
    if call(x, ops.sparse_group_norm) and only_user(x) is (absorbed[-1] if absorbed else conv):
        norm_args = args_of(x)
        if norm_args["level"] == conv_args["level_in"]:
            absorbed.append(x)
            norm = tuple(norm_args[name] for name in
                         ("stats", "groups", "weight", "bias", "eps", "policy"))
            x = norm_args["x"]
    if not absorbed:
        return
    set_args(conv, x=x, norm=norm, silu=silu)
    for node in absorbed:          # consumer first, so each has no users left when erased
        graph.erase_node(node)
    if norm is not None and call(x, ops.sparse_conv2d) and only_user(x) is conv:
        _move_epilogue_into_norm(x, conv)


def _move_epilogue_into_norm(producer: fx.Node, conv: fx.Node) -> None:
    """``conv(norm(producer + bias + temb))`` with the bias and the add in ``producer``'s
    epilogue becomes ``conv(norm(producer_without_both + bias + temb))`` with both added by
    ``conv``'s norm (``input_bias``, ``input_temb``)."""
    fused = args_of(producer)
    temb, bias = fused.get("temb"), fused.get("bias")
    if ((temb is None and bias is None) or fused.get("residual") is not None
            or fused.get("out_divisor") is not None):
        return
    set_args(producer, temb=None, bias=None)
    moved = {"input_temb": temb, "input_bias": bias}
    set_args(conv, **{name: value for name, value in moved.items() if value is not None})


def _fuse_epilogue(graph: fx.Graph, conv: fx.Node, positional: set) -> None:
    fused: dict = {}
    chain: list[fx.Node] = []
    last = conv
    while (user := only_user(last)) is not None and user.op == "call_function":
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
    set_args(conv, **fused)
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
