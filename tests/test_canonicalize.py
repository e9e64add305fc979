"""canonicalize on small modules exported with torch.export: folds, rewrites, unknown ops."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fisedit_compiler import ir
from fisedit_compiler.compiler import capture
from fisedit_compiler.errors import UnsupportedGraphError
from fisedit_compiler.passes.canonicalize import canonicalize
from pass_checks import pure

aten = torch.ops.aten


def export(module: nn.Module, *args):
    """The captured (ATen) graph of ``module(*args)`` and its canonical form."""
    program = torch.export.export(module.eval(), args, strict=False)
    captured = capture.program_to_graph_module(program)
    return captured, pure(canonicalize, captured)


def calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def ops(gm):
    """Canonical op names of the call nodes, in order (the ATen target for unknown ops)."""
    return [ir.op_name(n) or str(n.target) for n in calls(gm)]


def assert_same_output(module, gm, *args):
    with torch.no_grad():
        expected, actual = module(*args), gm(*args)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=0)


class Folds(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)  # eval mode: identity

    def forward(self, x):
        y = self.drop(x) / 1.0
        y = F.dropout(y, p=0.0, training=True) * 1.0
        return torch.sigmoid(y.contiguous().clone())


def test_noops_folded():
    module, x = Folds(), torch.randn(2, 3, 4)
    captured, gm = export(module, x)
    sources = {n.target for n in calls(captured)}
    assert {aten.dropout.default, aten.div.Tensor, aten.mul.Tensor} <= sources
    assert ops(gm) == ["sigmoid"]
    assert gm.meta["fc_unknown_ops"] == {}
    assert_same_output(module, gm, x)


class IntDiv(nn.Module):
    def forward(self, t):
        return (t / 1.0) * 1.0


def test_division_by_one_that_promotes_is_kept():
    """An integer tensor divided by 1.0 becomes float: not a no-op."""
    module, t = IntDiv(), torch.arange(6)
    _, gm = export(module, t)
    assert ops(gm) == ["div"]
    assert_same_output(module, gm, t)


class PadConv(nn.Module):
    """A symmetric zero pad before a padded conv, and diffusers' asymmetric (0, 1, 0, 1) pad
    before a stride-2 conv (Downsample2D with padding=0, as in DDPM)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x):
        return self.down(F.pad(self.conv(F.pad(x, (1, 1, 1, 1))), (0, 1, 0, 1)))


def test_zero_pad_folded_into_conv():
    module, x = PadConv(), torch.randn(2, 3, 8, 8)
    _, gm = export(module, x)
    assert ops(gm) == ["conv2d", "conv2d"]
    padding = [n.args[4] for n in calls(gm)]  # (top, bottom, left, right)
    assert padding == [(2, 2, 2, 2), (0, 1, 0, 1)]
    assert_same_output(module, gm, x)


class PadNotFoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        padded = F.pad(x, (1, 1, 1, 1))  # also read by the add: the conv cannot absorb it
        return self.conv(F.pad(x, (1, 1, 1, 1), value=1.0)) + padded[:, :1, 1:-1, 1:-1].sum()


def test_pad_kept_when_not_foldable():
    module, x = PadNotFoldable(), torch.randn(2, 3, 8, 8)
    _, gm = export(module, x)
    assert ops(gm).count("aten.pad.default") == 2
    assert gm.meta["fc_unknown_ops"]["aten.pad.default"] == 2
    assert_same_output(module, gm, x)


class CropConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(F.pad(x, (-1, -1, 0, 0)))  # a negative pad crops


def test_negative_pad_not_folded():
    module, x = CropConv(), torch.randn(2, 3, 8, 8)
    _, gm = export(module, x)
    assert ops(gm) == ["aten.pad.default", "conv2d"]
    assert_same_output(module, gm, x)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, -1).transpose(2, 2)


def test_transpose_becomes_permute():
    module, x = Transpose(), torch.randn(2, 3, 4, 5)
    _, gm = export(module, x)
    assert ops(gm) == ["permute"]  # the identity transpose(2, 2) is folded
    assert calls(gm)[0].args[1] == (0, 3, 2, 1)
    assert_same_output(module, gm, x)


class Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1) * 2 + torch.cumsum(x, dim=2)


def test_unknown_op_kept_flagged_and_counted():
    module, x = Cumsum(), torch.randn(2, 3, 4)
    captured, gm = export(module, x)
    unknown = [n for n in calls(gm) if n.meta.get(ir.META_UNKNOWN)]
    assert [n.target for n in unknown] == [aten.cumsum.default] * 2
    assert all(ir.op_name(n) is None for n in unknown)
    assert gm.meta["fc_unknown_ops"] == {"aten.cumsum.default": 2}
    assert ops(gm) == ["aten.cumsum.default", "mul", "aten.cumsum.default", "add"]
    assert_same_output(module, gm, x)
    assert not any(ir.META_UNKNOWN in n.meta for n in captured.graph.nodes)  # input untouched



class Draws(nn.Module):
    """An op that may draw random numbers, depending on its arguments."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        tokens = x.reshape(1, 1, 6, 1).expand(1, 1, 6, 4)
        if self.kind == "causal attention":
            return F.scaled_dot_product_attention(tokens, tokens, tokens,
                                                  is_causal=True).sum(-1).reshape(2, 3)
        if self.kind == "attention dropout":
            return F.scaled_dot_product_attention(tokens, tokens, tokens,
                                                  dropout_p=0.1).sum(-1).reshape(2, 3)
        if self.kind == "alpha dropout outside training":
            return F.alpha_dropout(x, 0.5, training=False) * 2
        if self.kind == "dropout2d in training":
            return F.dropout2d(x.reshape(1, 2, 3, 1), 0.5, training=True).reshape(2, 3)
        return torch.randn_like(x) + x


@pytest.mark.parametrize("kind, refused", [
    ("causal attention", False), ("attention dropout", True),
    ("alpha dropout outside training", False), ("dropout2d in training", True),
    ("randn_like", True)])
def test_random_ops_are_refused_by_their_arguments(kind, refused):
    """A tagged op that cannot draw with these arguments stays (folded or dense); one that
    draws is refused: no edit could draw the recording's numbers again."""
    program = torch.export.export(Draws(kind), (torch.randn(2, 3),), strict=False)
    captured = capture.program_to_graph_module(program)
    if refused:
        with pytest.raises(UnsupportedGraphError, match=r"draws random numbers"):
            canonicalize(captured)
    else:
        assert_same_output(Draws(kind), canonicalize(captured), torch.randn(2, 3))
