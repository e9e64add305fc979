"""The fuse_tokens pass: residual add + layer_norm and GEGLU become single ops, same results."""

import copy
import operator

import pytest
import torch
import torch.fx as fx

import fisedit_compiler as fc
from fisedit_compiler import ir, zoo
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.passes.fuse import fuse
from fisedit_compiler.passes.fuse_tokens import fuse_tokens
from fisedit_compiler.passes.sparsify import sparsify
from pass_checks import edit_outputs, linted, pure


@pytest.fixture(scope="module", params=["sd15-tiny", "sd21-tiny"])
def setup(request):
    unet = zoo.unet(request.param)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet, fc.SparseConfig())
    program = engine.program(inputs)
    unfused = linted(fuse, pure(sparsify, program.canonical, engine.config))
    return engine, inputs, program, unfused


def count(gm, target):
    return sum(node.op == "call_function" and node.target is target for node in gm.graph.nodes)


def test_every_transformer_block_is_fused(setup):
    _, _, program, unfused = setup
    norms = [n for n in unfused.graph.nodes if n.op == "call_function"
             and n.target is ir.layer_norm]
    after_add = [n for n in norms if n.args[0].target is ir.add]
    geglus = count(unfused, ir.gelu)                 # one GELU per feed-forward GEGLU here
    assert after_add and len(after_add) < len(norms) and geglus > 0
    # Every layer norm becomes the fused op: with the add before it, or with no residual.
    fused = [n for n in program.edit.graph.nodes if n.op == "call_function"
             and n.target is ops.add_layer_norm]
    assert len(fused) == len(norms) and count(program.edit, ir.layer_norm) == 0
    assert sum(n.args[1] is None for n in fused) == len(norms) - len(after_add)
    assert count(program.edit, ops.geglu) == geglus
    assert count(program.edit, ir.gelu) == 0


def test_each_feed_forward_accumulates_into_the_stored_sum(setup):
    """``ff(norm3(total)) + total``: the output linear adds into the sum, its bias moved into
    the fused add + layer norm that stores the sum."""
    _, _, program, unfused = setup
    blocks = count(unfused, ir.gelu)                 # one feed-forward per transformer block
    accumulating = [n for n in program.edit.graph.nodes if n.op == "call_function"
                    and n.target is ops.linear_accumulate]
    assert len(accumulating) == blocks
    for node in accumulating:
        total = node.args[2]
        assert total.target is operator.getitem and total.args[1] == 0 and len(total.users) == 1
        assert total.args[0].target is ops.add_layer_norm
        assert total.args[0].kwargs["sum_bias"] is not None


def test_a_sum_read_elsewhere_keeps_its_add():
    graph = fx.Graph()
    x, residual, hidden, weight, bias = (graph.placeholder(n) for n in
                                         ("x", "residual", "hidden", "w", "b"))
    total = graph.call_function(ir.add, (x, residual))
    norm = graph.call_function(ir.layer_norm, (total, (8,), None, None, 1e-5))
    product = graph.call_function(ir.linear, (hidden, weight, bias))
    out = graph.call_function(ir.add, (product, total))
    graph.output((out, norm, total))                # the sum is also an output
    gm = linted(fuse_tokens, fx.GraphModule(torch.nn.Module(), graph))
    assert count(gm, ops.linear_accumulate) == 0 and count(gm, ops.add_layer_norm) == 1


def test_fused_and_unfused_edits_agree(setup):
    engine, inputs, program, unfused = setup
    fused = linted(fuse_tokens, copy.deepcopy(unfused))
    size = program.levels[0]
    mask = torch.zeros(size, dtype=torch.bool)
    mask[2:size[0] // 2, 1:size[1] // 2] = True
    edited = dict(inputs, sample=torch.where(mask, torch.randn_like(inputs["sample"]),
                                             inputs["sample"]))
    fused_output, unfused_output = edit_outputs(engine, inputs, mask, edited, fused, unfused)
    # The same torch ops but one order: the feed-forward's bias is added to the residual
    # before the product (linear_accumulate), so the fp32 sums may differ in their last bits.
    scale = unfused_output.abs().max()
    assert (fused_output - unfused_output).abs().max() <= 1e-5 * scale
