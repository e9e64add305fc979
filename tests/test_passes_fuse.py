"""The fuse pass: which ops it folds into sparse convs, and that fusing changes no result."""

import copy

import pytest
import torch
import torch.fx as fx

import fisedit_compiler as fc
from fisedit_compiler import ir, zoo
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.graph_keys import PLAN_INPUT
from fisedit_compiler.passes.fuse import fuse
from fisedit_compiler.passes.pattern import args_of, set_args
from fisedit_compiler.passes.sparsify import sparsify
from pass_checks import edit_outputs, linted, pure


@pytest.fixture(scope="module", params=["sd15-tiny", "sdxl-tiny"])
def setup(request):
    unet = zoo.unet(request.param)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet, fc.SparseConfig())
    return engine, inputs, engine.program(inputs)


def convs(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.sparse_conv2d]


def test_resnet_chains_are_folded_into_convs(setup):
    _, _, program = setup
    canonical = program.canonical
    # Every windowed conv whose input is SiLU(group_norm(..)) in the canonical graph gets both.
    norm_silu_convs = sum(
        1 for n in canonical.graph.nodes if ir.is_op(n, "conv2d")
        and ir.is_op(n.args[0], "silu") and ir.is_op(n.args[0].args[0], "group_norm")
        and tuple(n.args[1].meta["val"].shape[-2:]) != (1, 1))
    fused = convs(program.edit)
    assert norm_silu_convs > 0
    assert sum(n.kwargs.get("norm") is not None and n.kwargs.get("silu") for n in fused) \
        == norm_silu_convs
    # ResnetBlock2D: conv1's bias and time embedding move into conv2's norm; conv2 adds the
    # residual.
    assert not any(n.kwargs.get("temb") is not None for n in fused)
    moved = [n for n in fused if n.kwargs.get("input_temb") is not None]
    assert moved and all(n.kwargs.get("norm") is not None
                         and n.kwargs.get("input_bias") is not None for n in moved)
    assert all(len(n.args[0].users) == 1 and n.args[0].target is ops.sparse_conv2d
               and args_of(n.args[0])["bias"] is None for n in moved)
    assert any(n.kwargs.get("residual") is not None for n in fused)
    # No SiLU or group norm is left between a norm and a conv that could take it.
    for node in fused:
        x = node.args[0]
        assert not (x.op == "call_function" and x.target is ir.silu and len(x.users) == 1)


def test_fused_and_unfused_edits_agree(setup):
    engine, inputs, program = setup
    unfused = pure(sparsify, program.canonical, engine.config)
    refused = linted(fuse, copy.deepcopy(unfused))
    assert len(refused.graph.nodes) < len(unfused.graph.nodes)
    size = program.levels[0]
    mask = torch.zeros(size, dtype=torch.bool)
    mask[1:size[0] // 2, 2:size[1] // 2 + 1] = True
    edited = dict(inputs, sample=torch.where(mask, torch.randn_like(inputs["sample"]),
                                             inputs["sample"]))
    expected, actual = edit_outputs(engine, inputs, mask, edited, unfused, refused)
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()


def resnet_convs(second_user=False, residual=False, divisor=False, temb=True, bias=True):
    """conv1 (+ bias) (-> + temb) (-> + residual) -> group norm -> SiLU -> conv2, as sparsify
    leaves a ResnetBlock2D; with ``second_user`` conv1's sum is also an output."""
    graph = fx.Graph()
    x, recorded, plan, weight, first_bias, stats = (
        graph.placeholder(n) for n in ("x", "recorded", PLAN_INPUT, "w", "b", "stats"))
    conv_args = (recorded, plan, 0, 0, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    first = graph.call_function(ops.sparse_conv2d, (x, *conv_args))
    if bias:
        set_args(first, bias=first_bias)
    summed = first
    if temb:
        summed = graph.call_function(ir.add, (first, graph.placeholder("temb")))
    if residual:
        # A residual is computed from the plan (a constant added would be a time embedding).
        shortcut = graph.call_function(ops.sparse_conv2d, (x, *conv_args))
        summed = graph.call_function(ir.add, (summed, shortcut))
    if divisor:
        summed = graph.call_function(ir.div, (summed, 2.0))
    norm = graph.call_function(ops.sparse_group_norm,
                               (summed, stats, plan, 0, 4, None, None, 1e-5, "incremental"))
    act = graph.call_function(ir.silu, (norm,))
    second = graph.call_function(ops.sparse_conv2d, (act, *conv_args))
    graph.output((second, summed) if second_user else second)
    return linted(fuse, fx.GraphModule(torch.nn.Module(), graph))


@pytest.mark.parametrize("temb, bias", [(True, True), (True, False), (False, True),
                                        (False, False)])
def test_bias_and_time_embedding_move_into_the_next_convs_norm(temb, bias):
    first, second = convs(resnet_convs(temb=temb, bias=bias))
    assert second.args[0] is first and second.kwargs["norm"] is not None
    assert first.kwargs.get("temb") is None and args_of(first)["bias"] is None
    moved_temb, moved_bias = second.kwargs.get("input_temb"), second.kwargs.get("input_bias")
    assert (moved_temb.name if temb else moved_temb) == ("temb" if temb else None)
    assert (moved_bias.name if bias else moved_bias) == ("b" if bias else None)


@pytest.mark.parametrize("case", ["second user", "residual", "divisor"])
@pytest.mark.parametrize("temb", [True, False])
def test_bias_and_time_embedding_stay_where_moving_them_would_change_a_value(case, temb):
    """A sum that something else reads, or a residual added or a division after the bias and
    time embedding (the norm would see them without it), keeps both in the first conv."""
    built = resnet_convs(second_user=case == "second user", residual=case == "residual",
                         divisor=case == "divisor", temb=temb)
    first = next(conv for conv in convs(built) if args_of(conv)["bias"] is not None)
    second = next(conv for conv in convs(built) if conv.kwargs.get("norm") is not None)
    assert args_of(first)["bias"].name == "b"
    assert (first.kwargs["temb"].name if temb else first.kwargs.get("temb")) == \
        ("temb" if temb else None)
    if case == "residual":
        assert first.kwargs["residual"].target is ops.sparse_conv2d
    assert second.kwargs.get("input_temb") is None and second.kwargs.get("input_bias") is None


def test_fuse_leaves_chains_with_other_users_alone():
    graph = fx.Graph()
    x, recorded, plan, weight = (graph.placeholder(n) for n in ("x", "recorded", PLAN_INPUT, "w"))
    act = graph.call_function(ir.silu, (x,))
    conv = graph.call_function(ops.sparse_conv2d, (act, recorded, plan, 0, 0, weight, None,
                                                   (1, 1), (1, 1, 1, 1), (1, 1), 1))
    graph.output((conv, act))                  # the activation has a second user
    gm = linted(fuse, fx.GraphModule(torch.nn.Module(), graph))
    (conv,) = convs(gm)
    assert conv.args[0].target is ir.silu and "silu" not in conv.kwargs
