"""The group_linears pass: the linears that read one tensor run as one GEMM, same results, and
the grouped weights follow in-place changes of the module's."""

import copy
import operator

import pytest
import torch
import torch.fx as fx

import fisedit_compiler as fc
from fisedit_compiler import bench, ir, zoo
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.graph_keys import DERIVED_WEIGHTS
from fisedit_compiler.passes.fuse import fuse
from fisedit_compiler.passes.fuse_tokens import fuse_tokens
from fisedit_compiler.passes.group_linears import group_linears
from fisedit_compiler.passes.sparsify import sparsify
from pass_checks import edit_outputs, linted, pure


def count(gm, target):
    return sum(node.op == "call_function" and node.target is target for node in gm.graph.nodes)


@pytest.fixture(scope="module", params=["sd15-tiny", "sdxl-tiny"])
def setup(request):
    unet = zoo.unet(request.param)
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet, fc.SparseConfig(group_projections=False,
                                              hoist_pass_constants=False))
    program = engine.program(inputs)
    ungrouped = fuse_tokens(fuse(pure(sparsify, program.canonical, engine.config)))
    return unet, engine, inputs, program, ungrouped


def test_each_attention_runs_one_qkv_gemm_and_the_text_one_kv_gemm(setup):
    _, _, _, program, ungrouped = setup
    assert count(program.edit, ir.linear) == count(ungrouped, ir.linear)    # off: unchanged
    grouped = linted(group_linears, copy.deepcopy(ungrouped))
    self_attentions = sum(1 for n in ungrouped.graph.nodes if n.op == "call_function"
                          and n.target is ops.sparse_attention and n.args[3] is not None)
    calls = [n for n in grouped.graph.nodes if n.op == "call_function"
             and n.target is ops.grouped_linear]
    # Q, K, V of every self-attention; K, V of every cross-attention read the one text input.
    sizes = sorted(len(n.args[3]) for n in calls)
    text = [n for n in calls if n.args[0].op == "placeholder"]
    assert len(text) == 1 and len(text[0].args[3]) == 2 * self_attentions
    assert sizes.count(3) == self_attentions
    assert count(grouped, ir.linear) == count(ungrouped, ir.linear) - sum(sizes)
    # Each grouped linear is replaced by a view of the one GEMM's output.
    assert all(user.target is operator.getitem for n in calls for user in n.users)


def test_grouped_and_ungrouped_edits_agree(setup):
    _, engine, inputs, program, ungrouped = setup
    grouped = linted(group_linears, copy.deepcopy(ungrouped))
    size = program.levels[0]
    mask = torch.zeros(size, dtype=torch.bool)
    mask[1:size[0] // 2, 2:size[1] // 2] = True
    edited = bench.edited_inputs(inputs, mask)
    grouped_output, ungrouped_output = edit_outputs(engine, inputs, mask, edited, grouped,
                                                    ungrouped)
    torch.testing.assert_close(grouped_output, ungrouped_output, rtol=1e-5, atol=1e-5)


def test_the_engine_follows_in_place_weight_changes_through_the_grouped_copy():
    """A LoRA-style in-place change of a grouped projection's weight: the next edit (eager on
    CPU) uses the new weight, as an engine compiled afresh does."""
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    mask = bench.blob_mask((16, 16), 0.2)
    edited = bench.edited_inputs(inputs, mask)

    def edit(engine):
        cache = engine.new_cache()
        engine.record(cache, step=0, **inputs)
        return engine.edit(cache, 0, plan=engine.plan(mask), **edited)

    engine = fc.compile(unet, fc.SparseConfig())
    before = edit(engine)
    derived = getattr(engine.program(inputs).edit, DERIVED_WEIGHTS)
    assert len(derived) > 0 and derived.nbytes() > 0
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight.mul_(1.5)
    after = edit(engine)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, edit(fc.compile(unet, fc.SparseConfig())), rtol=0, atol=0)


def linear_graph(weights: dict, biases: dict, uses: list[tuple[str, str | None]]):
    """An edit-like graph: ``x`` through ``ir.linear`` of each (weight, bias) in ``uses``."""
    root = torch.nn.Module()
    for name, value in {**weights, **biases}.items():
        root.register_buffer(name, value)
    graph = fx.Graph()
    x = graph.placeholder("x")
    outputs = []
    for weight, bias in uses:
        outputs.append(graph.call_function(
            ir.linear, (x, graph.get_attr(weight), None if bias is None else graph.get_attr(bias))))
    graph.output(tuple(outputs))
    return fx.GraphModule(root, graph)


def test_only_linears_that_can_share_a_gemm_are_grouped_and_results_stay():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, 4, generator=gen),
               "c": torch.randn(2, 4, generator=gen), "d": torch.randn(2, 4, generator=gen),
               "e": torch.randn(2, 4, generator=gen).double()}
    biases = {"ba": torch.randn(3, generator=gen), "bb": torch.randn(5, generator=gen)}
    uses = [("a", "ba"), ("b", "bb"), ("c", None), ("d", None), ("e", None)]
    grouped = linted(group_linears, linear_graph(weights, biases, uses))
    calls = [n for n in grouped.graph.nodes if n.op == "call_function"
             and n.target is ops.grouped_linear]
    # With biases (a, b), without (c, d); e, alone in its dtype, stays a linear.
    assert sorted(len(n.args[3]) for n in calls) == [2, 2] and count(grouped, ir.linear) == 1

    floats = uses[:4]
    grouped = linted(group_linears, linear_graph(weights, biases, floats))
    x = torch.randn(6, 4, generator=gen)
    for result, (weight, bias) in zip(grouped(x), floats):
        expected = torch.nn.functional.linear(x, weights[weight],
                                              None if bias is None else biases[bias])
        torch.testing.assert_close(result, expected)


@pytest.mark.gpu
def test_grouped_projections_on_the_gpu_path_meet_the_oracle():
    """Triton kernels and CUDA graphs (the attention kernel reads Q, K and V as strided views of
    one GEMM's output), fp16: grouped and ungrouped edits meet the oracle alike."""
    unet = zoo.unet("sd15-tiny", dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    mask = bench.blob_mask((16, 16), 0.2).cuda()
    edited = bench.edited_inputs(inputs, mask)
    results = {}
    for grouped in (True, False):
        engine = fc.compile(unet, fc.SparseConfig(group_projections=grouped))
        cache = engine.new_cache()
        engine.record(cache, step=0, **inputs)
        plan = engine.plan(mask)
        results[grouped] = engine.edit(cache, 0, plan=plan, **edited)
        expected = fc.oracle.masked_dense(engine, plan, inputs, edited)
        assert bench.relative_error(results[grouped], expected) <= 2e-2
    assert bench.relative_error(results[True], results[False]) <= 2e-2
