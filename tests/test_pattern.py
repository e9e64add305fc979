"""passes.pattern: the fusion passes read and set call arguments by name, users checked."""

import operator

import pytest
import torch.fx as fx

from fisedit_compiler import ir
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.passes.pattern import args_of, call, only_user, set_args


def conv_graph():
    graph = fx.Graph()
    x, recorded, plan, weight = (graph.placeholder(name) for name in ("x", "rec", "plan", "w"))
    conv = graph.call_function(ops.sparse_conv2d, (x, recorded, plan, 0, 1, weight, None,
                                                   (1, 1), (1, 1, 1, 1), (1, 1), 1))
    out = graph.call_function(operator.add, (conv, x))
    graph.output(out)
    return graph, conv, out


def test_args_are_read_by_name_with_defaults():
    _, conv, _ = conv_graph()
    args = args_of(conv)
    assert args["level_in"] == 0 and args["level_out"] == 1 and args["padding"] == (1, 1, 1, 1)
    assert args["norm"] is None and args["silu"] is False       # keyword-only defaults


def test_set_args_keeps_positional_parameters_positional():
    _, conv, _ = conv_graph()
    set_args(conv, level_in=2, silu=True)
    assert conv.args[3] == 2 and conv.kwargs == {"silu": True}
    with pytest.raises(TypeError, match="no parameter"):
        set_args(conv, no_such_argument=1)


def test_calls_and_users_are_checked():
    graph, conv, out = conv_graph()
    graph.lint()
    assert call(conv, ops.sparse_conv2d, users=1) and not call(conv, ops.sparse_conv2d, users=2)
    assert not call(conv, ir.conv2d) and not call(3, ops.sparse_conv2d)
    assert only_user(conv) is out and only_user(out) is not None
    assert only_user(next(iter(graph.nodes))) is None         # x has two users
