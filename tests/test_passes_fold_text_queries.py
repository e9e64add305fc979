"""The fold_text_queries pass: each cross-attention's query projection moves into its text keys,
which the pass constants compute once per pass; edits equal the unfolded ones up to rounding
and meet the oracle, and the background stays the recording bit for bit."""

import copy
import warnings

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, ir, zoo
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.graph_keys import PASS_CONSTANTS
from fisedit_compiler.passes import fold_text_queries as fold_module
from fisedit_compiler.passes.fold_text_queries import fold_text_queries, folding_pays
from fisedit_compiler.passes.pattern import args_of
from pass_checks import linted


def program_of(unet, inputs, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the dense-node warning of some families
        return fc.compile(unet, fc.SparseConfig(**config)).program(inputs)


def calls(gm, target) -> list:
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is target]


def cross_attentions(gm) -> list:
    return [node for node in calls(gm, ops.sparse_attention) if args_of(node)["policy"] == "cross"]


@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny"])
def test_every_cross_attention_folds_and_its_keys_leave_the_step(name):
    unet = zoo.unet(name)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    unfolded = program_of(unet, inputs, fold_text_queries=False).edit
    crossing = len(cross_attentions(unfolded))
    assert crossing >= 2
    edit = program_of(unet, inputs).edit                # on by default
    assert not cross_attentions(edit)
    # Each text attention reads the rows its query projection read; no linear is left
    # without users, and the folded keys are pass constants (computed once per pass).
    folded = calls(edit, ops.text_attention)
    assert len(folded) == crossing
    assert not calls(edit, ops.fold_text_keys)
    assert len(calls(getattr(edit, PASS_CONSTANTS), ops.fold_text_keys)) == crossing
    assert len(calls(edit, ir.linear)) == len(calls(unfolded, ir.linear)) - crossing
    # Self-attentions are untouched.
    assert len(calls(edit, ops.sparse_attention)) == len(calls(unfolded, ops.sparse_attention)) \
        - crossing


def test_the_pass_alone_rewrites_the_pattern_and_leaves_a_valid_graph():
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    edit = program_of(unet, inputs, hoist_pass_constants=False).edit   # nothing folded
    assert not calls(edit, ops.text_attention)
    crossing = len(cross_attentions(edit))
    folded = linted(fold_text_queries, copy.deepcopy(edit))
    assert len(calls(folded, ops.text_attention)) == len(calls(folded, ops.fold_text_keys)) \
        == crossing
    assert not cross_attentions(folded)


def test_a_query_bias_leaves_its_attention_as_it_was():
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    edit = copy.deepcopy(program_of(unet, inputs, hoist_pass_constants=False).edit)
    first = cross_attentions(edit)[0]
    projection = args_of(args_of(args_of(first)["q"])["x"])["x"]
    assert projection.target is ir.linear
    # Any [C]-sized parameter does as a bias for the matcher: the out projection's.
    out_bias = next(node for node in edit.graph.nodes if node.op == "get_attr"
                    and node.target.endswith("attn2_to_out_0_bias"))
    projection.args = (projection.args[0], projection.args[1], out_bias)
    folded = linted(fold_text_queries, edit)
    assert cross_attentions(folded) == [first]
    assert len(calls(folded, ops.text_attention)) == 3


def test_keys_computed_from_the_sample_leave_their_attention_as_it_was():
    """An added-KV attention joins the text's keys with the image tokens' (computed from the
    sample): not fixed for the pass, so folding them would run the fold at every step."""
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    edit = copy.deepcopy(program_of(unet, inputs, hoist_pass_constants=False).edit)
    first = cross_attentions(edit)[0]
    sample = next(node for node in edit.graph.nodes if node.name == "sample")
    with edit.graph.inserting_before(first):
        image_part = edit.graph.call_function(torch.sum, (sample,))
        joined = edit.graph.call_function(torch.add, (args_of(first)["k"], image_part))
    first.args = (first.args[0], joined) + first.args[2:]
    folded = linted(fold_text_queries, edit)
    assert cross_attentions(folded) == [first]
    assert len(calls(folded, ops.text_attention)) == 3


def test_an_attention_mask_leaves_the_attentions_as_they_were():
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    inputs["encoder_attention_mask"] = torch.ones(2, 77)
    edit = program_of(unet, inputs, fold_text_queries=True).edit
    assert not calls(edit, ops.text_attention) and len(cross_attentions(edit)) == 4


def test_without_pass_constants_nothing_is_folded():
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    edit = program_of(unet, inputs, hoist_pass_constants=False, fold_text_queries=True).edit
    assert not calls(edit, ops.text_attention) and not calls(edit, ops.fold_text_keys)


@pytest.mark.parametrize("heads, channels, pays", [
    (8, 320, True), (8, 640, True), (8, 1280, True),         # SD1.5's levels
    (10, 640, False), (20, 1280, False)])                    # SDXL's
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_folding_pays_where_the_folded_keys_read_little_more_than_the_weight(
        heads, channels, pays, batch, dtype):
    """Keys of 77 tokens: the folded keys ``[2, H, 77, C]`` against the ``[C, C]`` query
    weight in fp16 (where the rule was measured) decide, whatever the batch and dtype."""
    graph = torch.fx.Graph()
    keys = graph.placeholder("keys")
    keys.meta["val"] = torch.empty(batch, heads, 77, channels // heads, dtype=dtype,
                                   device="meta")
    weight = torch.empty(channels, channels, dtype=dtype, device="meta")
    assert folding_pays(keys, weight) is pays
    del keys.meta["val"]                                    # shape unknown: never folded
    assert folding_pays(keys, weight) is False


def test_cross_attentions_whose_folded_keys_read_too_much_stay_as_they_were(monkeypatch):
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    monkeypatch.setattr(fold_module, "MAX_EXTRA_KEY_BYTES", 0)
    edit = program_of(unet, inputs).edit
    assert not calls(edit, ops.text_attention) and len(cross_attentions(edit)) == 4


def test_the_flag_is_checked():
    with pytest.raises(fc.FiseditError, match="fold_text_queries"):
        fc.SparseConfig(fold_text_queries="yes")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_folded_edits_meet_the_oracle_and_keep_the_background(kernels):
    """A new prompt (the folded keys change with it) and a blob mask, over two passes: the
    folded engine against the unfolded one and the oracle, and the recording outside the
    region, bit for bit."""
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engines = [fc.compile(unet, fc.SparseConfig(kernels=kernels, fold_text_queries=fold))
               for fold in (True, False)]
    caches, recorded = [], []
    for engine in engines:
        caches.append(engine.new_cache(1))
        recorded.append(engine.record(caches[-1], 0, **inputs))
    mask = bench.blob_mask((16, 16), 0.1)
    # Two prompts under the reference ops; one under the interpreted kernels (slow on a CPU).
    for shift in (0.5, -0.5) if kernels == "torch" else (0.5,):
        edited = dict(bench.edited_inputs(inputs, mask),
                      encoder_hidden_states=inputs["encoder_hidden_states"] + shift)
        folded, unfolded = (engine.edit(cache, 0, engine.plan(mask), **edited)
                            for engine, cache in zip(engines, caches))
        torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)
        plan = engines[0].plan(mask)
        expected = fc.oracle.masked_dense(engines[0], plan, inputs, edited)
        torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)
        outside = ~plan[0].active
        assert torch.equal(folded[..., outside], recorded[0][..., outside])
        assert not torch.equal(folded, recorded[0])


def test_folded_keys_follow_a_text_changed_within_a_pass():
    """The folded keys are pass constants: a text rewritten in place between two steps of a
    pass must reach the next step's folded keys, as it reaches the unfolded engine's K/V."""
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engines = [fc.compile(unet, fc.SparseConfig(kernels="torch", fold_text_queries=fold))
               for fold in (True, False)]
    mask = bench.blob_mask((16, 16), 0.1)
    outputs = []
    for engine in engines:
        cache = engine.new_cache(3)
        for step in range(3):
            engine.record(cache, step, **inputs)
        edited = dict(bench.edited_inputs(inputs, mask),
                      encoder_hidden_states=inputs["encoder_hidden_states"] + 0.5)
        plan = engine.plan(mask)
        outputs.append([engine.edit(cache, 0, plan, **edited)])
        edited["encoder_hidden_states"].mul_(-1.0)          # in place, mid-pass
        outputs[-1].append(engine.edit(cache, 1, plan, **edited))
    folded, unfolded = outputs
    for got, expected in zip(folded, unfolded):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(folded[0], folded[1], atol=1e-3)
