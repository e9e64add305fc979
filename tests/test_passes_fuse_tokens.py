"""The fuse_tokens pass: residual add + layer_norm and GEGLU become single ops, same results."""

import copy

import pytest
import torch

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


def test_fused_and_unfused_edits_agree(setup):
    engine, inputs, program, unfused = setup
    fused = linted(fuse_tokens, copy.deepcopy(unfused))
    size = program.levels[0]
    mask = torch.zeros(size, dtype=torch.bool)
    mask[2:size[0] // 2, 1:size[1] // 2] = True
    edited = dict(inputs, sample=torch.where(mask, torch.randn_like(inputs["sample"]),
                                             inputs["sample"]))
    fused_output, unfused_output = edit_outputs(engine, inputs, mask, edited, fused, unfused)
    assert torch.equal(fused_output, unfused_output)   # the same torch ops, in the same order
