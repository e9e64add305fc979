"""The hoist_pass_constants pass: what depends only on the inputs a pass holds fixed leaves the
step graph, and the step computes what it computed before, bit for bit."""

import copy
import operator
import warnings

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, ir, zoo
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.execution import triton_ops
from fisedit_compiler.graph_keys import PASS_CONSTANTS, PASS_VALUES_INPUT
from fisedit_compiler.passes.fuse_tokens import fuse_tokens
from fisedit_compiler.passes.hoist_pass_constants import STEP_INPUTS, hoist_pass_constants
from fisedit_compiler.passes.lower_kernels import lower_kernels
from pass_checks import linted
from test_families import FAMILIES, copied, new_conditions, new_sample


def program_of(unet, inputs, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the dense-node warning of some families
        return fc.compile(unet, fc.SparseConfig(**config)).program(inputs)


def placeholders(gm):
    return {node.name: node for node in gm.graph.nodes if node.op == "placeholder"}


@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny"])
def test_the_text_kv_projections_leave_the_step(name):
    unet = zoo.unet(name)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    edit = program_of(unet, inputs, hoist_pass_constants=False).edit
    text_gemms = [node for node in edit.graph.nodes if node.target is ops.grouped_linear
                  and node.args[0].name == "encoder_hidden_states"]
    assert len(text_gemms) == 1
    hoisted = linted(hoist_pass_constants, copy.deepcopy(edit))
    constants = getattr(hoisted, PASS_CONSTANTS)
    # The step no longer reads the text at all; the constants graph reads only fixed inputs.
    assert not placeholders(hoisted)["encoder_hidden_states"].users
    assert not set(placeholders(constants)) & STEP_INPUTS
    assert sum(node.target is ops.grouped_linear for node in constants.graph.nodes) == 1
    assert not any(node.target is ops.grouped_linear and node.args[0].op == "placeholder"
                   for node in hoisted.graph.nodes)
    # Each value the step still uses is read from the one new placeholder.
    values = placeholders(hoisted)[PASS_VALUES_INPUT]
    reads = list(values.users)
    assert reads and all(read.target is operator.getitem for read in reads)
    assert sorted(read.args[1] for read in reads) == list(range(len(reads)))
    assert len(constants.graph.output_node().args[0]) == len(reads)
    # What the pipeline builds is this pass's result (fold_text_queries, before it, would
    # also move the folded query weights: test_passes_fold_text_queries.py).
    default = program_of(unet, inputs, fold_text_queries=False).edit
    assert str(getattr(default, PASS_CONSTANTS).graph) == str(constants.graph)


def test_a_graph_without_pass_constants_is_left_as_it_was():
    unet = zoo.unet("ddpm-tiny")                  # no text, no class labels: nothing fixed
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    edit = program_of(unet, inputs, hoist_pass_constants=False).edit
    before = str(edit.graph)
    hoisted = linted(hoist_pass_constants, edit)
    assert str(hoisted.graph) == before and not hasattr(hoisted, PASS_CONSTANTS)
    assert program_of(unet, inputs).pass_constants is None


def test_random_and_step_dependent_calls_stay_in_the_step():
    """On a graph of its own: a dropout in training mode draws anew at every step, and what
    reads the sample changes at every step; neither is a pass constant, nor is anything
    computed from them. A weight-only value a moved call reads is copied along."""
    aten = torch.ops.aten
    root = torch.nn.Module()
    root.weight = torch.nn.Parameter(torch.randn(8, 8))
    graph = torch.fx.Graph()
    sample, timestep = graph.placeholder("sample"), graph.placeholder("timestep")
    text = graph.placeholder("encoder_hidden_states")
    weight = graph.get_attr("weight")
    doubled = graph.call_function(aten.mul.Tensor, (weight, 2.0))          # weights only
    projected = graph.call_function(aten.mm.default, (text, doubled))      # a pass constant
    dropped = graph.call_function(aten.dropout.default, (text, 0.5, True))   # random
    after_dropout = graph.call_function(aten.mm.default, (dropped, weight))
    mixed = graph.call_function(aten.add.Tensor, (projected, sample))        # reads the sample
    total = graph.call_function(aten.add.Tensor, (mixed, after_dropout))
    graph.output(graph.call_function(aten.mul.Tensor, (total, timestep)))
    gm = torch.fx.GraphModule(root, graph)
    values = {"sample": torch.randn(4, 8), "timestep": torch.tensor(3.0),
              "encoder_hidden_states": torch.randn(4, 8)}
    torch.manual_seed(0)
    expected = gm(**values)
    hoisted = linted(hoist_pass_constants, gm)
    constants = getattr(hoisted, PASS_CONSTANTS)
    moved = [node.target for node in constants.graph.nodes if node.op == "call_function"]
    assert moved == [aten.mul.Tensor, aten.mm.default]        # the weight copy, the projection
    kept = [node.target for node in hoisted.graph.nodes if node.op == "call_function"]
    assert aten.dropout.default in kept and kept.count(aten.mm.default) == 1
    assert list(placeholders(constants)) == ["encoder_hidden_states"]
    torch.manual_seed(0)
    pass_values = constants(encoder_hidden_states=values["encoder_hidden_states"])
    assert torch.equal(hoisted(**values, **{PASS_VALUES_INPUT: pass_values}), expected)


def test_a_value_a_step_call_adds_into_stays_in_the_step():
    """``linear_accumulate`` (lowered: in place) adds a step-dependent product into a sum of
    fixed inputs: hoisted, that sum would be a pass value every step adds to again."""
    root = torch.nn.Module()
    root.weight = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    root.bias = torch.nn.Parameter(torch.randn(8), requires_grad=False)
    graph = torch.fx.Graph()
    text, sample = graph.placeholder("encoder_hidden_states"), graph.placeholder("sample")
    weight, bias = graph.get_attr("weight"), graph.get_attr("bias")
    total = graph.call_function(ir.add, (text, text))                       # fixed
    norm = graph.call_function(ir.layer_norm, (total, (8,), None, None, 1e-5))
    product = graph.call_function(ir.linear, (sample, weight, bias))       # per step
    graph.output((graph.call_function(ir.add, (product, total)), norm))
    edit = lower_kernels(fuse_tokens(torch.fx.GraphModule(root, graph)), "gather")
    assert any(node.target is triton_ops.linear_accumulate for node in edit.graph.nodes)
    hoisted = linted(hoist_pass_constants, edit)
    text_value, sample_value = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    expected = sample_value @ root.weight.t() + root.bias + 2 * text_value
    constants = getattr(hoisted, PASS_CONSTANTS, None)
    values = {} if constants is None else {
        PASS_VALUES_INPUT: constants(encoder_hidden_states=text_value)}
    for _ in range(3):
        out, _ = hoisted(encoder_hidden_states=text_value, sample=sample_value, **values)
        torch.testing.assert_close(out, expected)


# Families whose fixed inputs feed more than the text K/V: a ControlNet hint's encoder
# (Kandinsky 2.2), IF's text projection and pooling, control residuals (fixed by name, added to
# the sample's activations: nothing of theirs moves).
@pytest.mark.parametrize("family", ["kandinsky22_controlnet", "deepfloyd_if_2",
                                    "sd15_controlnet", "sd15_ip_adapter"])
def test_hoisted_and_unhoisted_edits_agree_bit_for_bit(family):
    unet, inputs = FAMILIES[family]()
    outputs = []
    for hoist in (True, False):
        # Without the query fold, which is the same only up to rounding (its own tests).
        engine = fc.compile(unet, fc.SparseConfig(hoist_pass_constants=hoist,
                                                  fold_text_queries=False))
        cache = engine.new_cache(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine.record(cache, 0, **copied(inputs))
        size = engine.program(inputs).levels[0]
        mask = bench.blob_mask(size, 0.2)
        edited = new_sample(new_conditions(copied(inputs)), mask)
        outputs.append(engine.edit(cache, 0, engine.plan(mask), **copied(edited)))
        if hoist:
            assert engine.program(inputs).pass_constants is not None
    assert torch.equal(*outputs)
