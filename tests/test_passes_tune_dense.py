"""The tune_dense pass: the engine's dense graph computes the canonical graph's function with
channels-last conv weights and grouped projections, reading the program's derived copies (no
second copy), and follows in-place weight changes through them."""

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import ir, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.execution import sparse_ops
from fisedit_compiler.execution.kernels.sparse_conv import pack_weight, unpack_weight
from fisedit_compiler.passes.pattern import args_of


def calls(gm, target):
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is target]


def attribute(gm, node):
    return getattr(gm, node.target)


@pytest.fixture(scope="module", params=["sd15-tiny", "sdxl-tiny"])
def setup(request):
    unet = zoo.unet(request.param)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    program = engine.program(inputs)
    return unet, inputs, program


def test_the_dense_graph_computes_the_canonical_function_and_leaves_it_alone(setup):
    _, inputs, program = setup
    canonical_nodes = [(node.op, node.target) for node in program.canonical.graph.nodes]
    dense = program.dense_graph()
    assert [(node.op, node.target) for node in program.canonical.graph.nodes] == canonical_nodes
    flat = flatten_inputs(inputs)
    torch.testing.assert_close(dense(**flat), program.canonical(**flat), rtol=1e-5, atol=1e-5)


def test_conv_weights_are_channels_last_views_of_the_packed_copies(setup):
    _, _, program = setup
    dense = program.dense_graph()
    packed = [entry[2] for entry in program.derived._entries.values() if entry[3] is pack_weight]
    canonical = [attribute(program.canonical, args_of(node)["weight"])
                 for node in calls(program.canonical, ir.conv2d)]
    weights = [attribute(dense, args_of(node)["weight"]) for node in calls(dense, ir.conv2d)]
    channels_last = [w for w in weights if w.shape[2:] != (1, 1)]
    spatial = [w for w in canonical if w.shape[2:] != (1, 1)]
    assert len(channels_last) == len(spatial) == len(packed) > 0
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in channels_last)
    packed_memory = {p.data_ptr() for p in packed}
    assert {w.data_ptr() for w in channels_last} <= packed_memory, "views, no second copy"
    entries = len(program.derived)
    program.dense_graph()
    assert len(program.derived) == entries, "a second dense graph reads the same copies"


def test_projections_are_grouped_from_the_programs_copies(setup):
    _, _, program = setup
    dense = program.dense_graph()
    grouped = calls(dense, sparse_ops.grouped_linear)
    assert grouped, "each attention's Q, K, V and the text's K, V run as one GEMM"
    joined = {entry[2].data_ptr() for entry in program.derived._entries.values()
              if entry[3] is not pack_weight}
    assert {attribute(dense, args_of(node)["weight"]).data_ptr() for node in grouped} <= joined


def test_the_dense_graph_follows_in_place_weight_changes_after_a_refresh():
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    program = fc.compile(unet).program(inputs)
    dense = program.dense_graph()
    flat = flatten_inputs(inputs)
    with torch.no_grad():
        unet.down_blocks[0].resnets[0].conv1.weight.mul_(1.5)
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(1.5)
    program.derived.refresh()        # what SparseEngine.refresh_weights runs
    torch.testing.assert_close(dense(**flat), unet(**inputs)[0], rtol=1e-5, atol=1e-5)


def test_unpack_weight_is_the_weight_in_channels_last_memory():
    weight = torch.randn(5, 3, 3, 2)
    packed = pack_weight(weight)
    unpacked = unpack_weight(packed, (3, 2))
    assert torch.equal(unpacked, weight) and unpacked.data_ptr() == packed.data_ptr()
    assert unpacked.is_contiguous(memory_format=torch.channels_last)
    assert packed.stride() == (1, 3 * 3 * 2)
