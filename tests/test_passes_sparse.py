"""The sparsify and cache passes: what they rewrite, what they record, and the dense fallback."""

import re

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import ir, zoo
from fisedit_compiler.compiler import capture
from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.graph_keys import SPARSE_MODES
from fisedit_compiler.passes import registry
from fisedit_compiler.passes.analyze import analyze
from fisedit_compiler.passes.cache import derive_cache_set, insert_cache_writes
from fisedit_compiler.passes.canonicalize import canonicalize
from fisedit_compiler.passes.fuse import fuse
from fisedit_compiler.passes.fuse_tokens import fuse_tokens
from fisedit_compiler.passes.lower_kernels import lower_kernels
from fisedit_compiler.passes.sparsify import sparsify
from pass_checks import box_edit, linted, pure


@pytest.fixture(scope="module")
def program():
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet)
    return fc.compile(unet).program(inputs)


def targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def test_every_heavy_op_becomes_its_sparse_form(program):
    canonical, edit = program.canonical, program.edit
    count = lambda name: sum(ir.is_op(n, name) for n in canonical.graph.nodes)
    edit_targets = targets(edit)
    convs = edit_targets.count(ops.sparse_conv2d) + edit_targets.count(ops.pointwise_conv2d)
    assert convs == count("conv2d")
    fused_norms = sum(n.kwargs.get("norm") is not None for n in edit.graph.nodes
                      if n.target is ops.sparse_conv2d)
    assert edit_targets.count(ops.sparse_group_norm) + fused_norms == count("group_norm")
    # A cross-attention whose query projection is folded (fold_text_queries) is a text attention.
    assert edit_targets.count(ops.sparse_attention) + edit_targets.count(ops.text_attention) \
        == count("attention")
    assert edit_targets.count(ops.upsample_gather) == count("upsample_nearest")
    for name in ("conv2d", "group_norm", "attention", "upsample_nearest"):
        assert registry.REGISTRY[name].fn not in edit_targets
    modes = {program.modes.get(node.name) for node in canonical.graph.nodes
             if node.op == "call_function"}
    assert modes == {"sparse", "global"}


def test_every_pass_returns_a_valid_graph_and_leaves_its_input_alone(traced):
    """Each sparse pass lints, and sparsify and the record pass never touch the canonical graph,
    so one analyzed graph serves every config (build_program keeps no copy)."""
    canonical = traced("sd15-tiny").gm
    canonical.graph.lint()
    for config in (fc.SparseConfig(), fc.SparseConfig(group_norm="cached",
                                                      self_attention="sparse")):
        edit = pure(sparsify, canonical, config)
        assert set(edit.meta[SPARSE_MODES]) >= {n.name for n in canonical.graph.nodes
                                                     if n.op == "call_function"}
        edit = linted(fuse, edit)
        edit = linted(fuse_tokens, edit)
        edit = linted(lower_kernels, edit, config.conv_method)
        assert any(n.target in registry.lowerings().values() for n in edit.graph.nodes)
        pure(insert_cache_writes, canonical, derive_cache_set(edit), config)


def test_cache_set_is_derived_from_what_sparse_ops_read(program):
    canonical = program.canonical
    nodes = {node.name: node for node in canonical.graph.nodes}
    output = canonical.graph.output_node().args[0]
    entries = derive_cache_set(program.edit)
    assert entries == program.entries
    for entry in entries:
        source = nodes[entry.source]
        if entry.kind == "group_norm_stats":
            assert ir.is_op(source, "group_norm")
            continue
        if source.meta[ir.META_DEPENDS] == {"timestep"}:
            # a time-embedding value that positional nodes use: recorded once per step
            assert any(user.meta[ir.META_DOMAIN].kind != "global" for user in source.users)
            assert source.meta[ir.META_DOMAIN].kind == "global"
            continue
        readers = [user for user in source.users if ir.is_op(user, "conv2d", "attention")]
        windowed = any(ir.is_op(user, "conv2d") and tuple(user.args[1].meta["val"].shape[-2:]) != (1, 1)
                       for user in readers)
        self_kv = any(ir.is_op(user, "attention") and user.meta[ir.META_ATTN_KIND] == "self"
                      and source is not user.args[0] for user in readers)
        assert windowed or self_kv or source is output, entry
    # a positional pointwise intermediate is never recorded, nor the global chain behind a
    # recorded time-embedding value
    recorded = {entry.source for entry in entries}
    assert not any(ir.is_op(nodes[name], "linear", "layer_norm", "gelu") for name in recorded
                   if nodes[name].meta[ir.META_DOMAIN].kind != "global")
    assert not any(ir.is_op(node, "linear") and node.meta[ir.META_DEPENDS] == {"timestep"}
                   for node in program.edit.graph.nodes)


def test_sparse_attention_policy_records_no_self_attention_kv():
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet)
    full = fc.compile(unet).program(inputs)
    sparse = fc.compile(unet, fc.SparseConfig(self_attention="sparse")).program(inputs)
    attention_inputs = {n.args[1].name for n in full.canonical.graph.nodes
                        if ir.is_op(n, "attention") and n.meta[ir.META_ATTN_KIND] == "self"}
    assert attention_inputs <= {e.source for e in full.entries}
    assert not attention_inputs & {e.source for e in sparse.entries}


def test_record_graph_writes_exactly_the_entries(program):
    writes = [node.args[1] for node in program.record.graph.nodes
              if node.op == "call_function" and node.target is ops.cache_write]
    assert sorted(writes) == sorted(entry.key for entry in program.entries)


def test_an_unsupported_op_runs_dense_with_a_warning_and_stays_exact():
    unet = zoo.unet("sd15-tiny")
    # torch.roll mixes positions: no canonical form, so the engine must fall back to dense.
    unet.conv_in.register_forward_hook(lambda module, args, out: out + 0.1 * torch.roll(out, 1, -1))
    run = box_edit(unet, slice(2, 4), slice(10, 12))
    # Named by the module the nodes come from, which a user knows, beside the node names.
    assert any(issubclass(w.category, UserWarning)
               and re.search(r"run dense in edits \(exact but slower\), in conv_in \(roll",
                             str(w.message)) for w in run.caught)
    assert run.engine.program(run.inputs).canonical.meta["fc_unknown_ops"]
    assert run.error <= 1e-5
    empty = run.engine.plan(torch.zeros(16, 16, dtype=torch.bool))
    torch.testing.assert_close(run.engine.edit(run.cache, 0, plan=empty, **run.inputs),
                               run.recorded)


@pytest.mark.parametrize("act_fn", ["relu", "mish"])
def test_diffusers_other_activations_run_sparse(act_fn):
    """act_fn "relu" and "mish" (beside silu and gelu) are pointwise ops, not dense
    fallbacks."""
    _, cfg = zoo.CONFIGS["sd15-tiny"]
    run = box_edit(zoo.from_config(dict(cfg, act_fn=act_fn)), slice(2, 4), slice(10, 12))
    assert not any("run dense in edits" in str(w.message) for w in run.caught)
    assert not run.engine.program(run.inputs).canonical.meta["fc_unknown_ops"]
    assert run.error <= 1e-5


class PooledOutput(torch.nn.Module):
    def forward(self, sample):
        return sample.mean(dim=(2, 3))


def test_an_output_without_positions_is_refused():
    """Restricting the output to the region is what keeps the background on every model."""
    program = torch.export.export(PooledOutput(), (torch.randn(2, 4, 8, 8),), strict=False)
    gm = analyze(canonicalize(capture.program_to_graph_module(program)))
    with pytest.raises(FiseditError, match=r"output \[2, 4\] does not show its positions"):
        sparsify(gm, fc.SparseConfig())


@pytest.mark.filterwarnings("ignore:.*run dense")
def test_a_self_attention_mask_runs_dense_and_the_oracle_agrees_under_the_sparse_policy():
    # A U-Net attention_mask reaches the self-attentions; they run dense and exact, so the
    # sparse policy's oracle (active keys only) must not apply to them either.
    unet = zoo.from_config(dict(zoo.config("sd15-tiny"), mid_block_type=None))
    inputs = zoo.example_inputs(unet, text_length=7)
    inputs["attention_mask"] = (torch.rand(2, 256, generator=torch.Generator().manual_seed(5))
                                > 0.2).long()
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 5:10] = True
    changed = dict(inputs, sample=inputs["sample"] + mask * 0.5)
    engine = fc.compile(unet, fc.SparseConfig(self_attention="sparse"))
    cache = engine.new_cache(1)
    recorded = engine.record(cache, 0, **inputs)
    plan = engine.plan(mask)
    output = engine.edit(cache, 0, plan=plan, **changed)
    expected = fc.oracle.masked_dense(engine, plan, inputs, changed)
    assert ((output - expected).norm() / expected.norm()).item() < 1e-5
    outside = ~plan[0].active
    assert torch.equal(output[..., outside], recorded[..., outside])


def test_a_text_attention_mask_keeps_cross_attention_sparse_and_exact():
    # diffusers turns encoder_attention_mask into one bias row over the text tokens, shared
    # by every query: the active queries take it as it is.
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, text_length=7)
    text_mask = torch.ones(2, 7)
    text_mask[:, 5:] = 0
    inputs["encoder_attention_mask"] = text_mask
    engine = fc.compile(unet)
    program = engine.program(inputs)
    attentions = [node.name for node in program.canonical.graph.nodes if ir.is_op(node, "attention")]
    assert attentions and all(program.modes[name] == "sparse" for name in attentions)
    cache = engine.new_cache(1)
    recorded = engine.record(cache, 0, **inputs)
    with torch.no_grad():
        assert torch.allclose(recorded, unet(**inputs)[0], atol=1e-5)
    # [batch, 1, (1,) tokens] broadcast as diffusers' [batch, tokens] does: accepted, the same.
    for spelled in (text_mask[:, None], text_mask[:, None, None]):
        again = engine.record(engine.new_cache(1), 0, **dict(inputs, encoder_attention_mask=spelled))
        assert torch.allclose(again, recorded, atol=1e-6)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:8, 4:9] = True
    plan = engine.plan(mask)
    changed = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"] + 0.5)
    changed["encoder_attention_mask"] = text_mask.clone()
    changed["encoder_attention_mask"][:, 1] = 0
    output = engine.edit(cache, 0, plan=plan, **changed)
    expected = fc.oracle.masked_dense(engine, plan, inputs, changed)
    assert ((output - expected).norm() / expected.norm()).item() < 1e-5
    outside = ~plan[0].active
    assert torch.equal(output[..., outside], recorded[..., outside])


class LowRankDelta:
    """A user's attention processor: the default one plus ``hidden_states @ down @ up`` with
    constant factors (a hand-made LoRA)."""

    def __init__(self, width: int, rank: int = 2):
        from diffusers.models.attention_processor import AttnProcessor2_0

        gen = torch.Generator().manual_seed(3)
        self.inner = AttnProcessor2_0()
        self.down = torch.randn(width, rank, generator=gen) * 0.1
        self.up = torch.randn(rank, width, generator=gen) * 0.1

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self.inner(attn, hidden_states, *args, **kwargs) + (
            hidden_states @ self.down @ self.up)


def test_a_matmul_by_a_constant_matrix_is_a_projection():
    unet = zoo.unet("sd15-tiny")
    unet.set_attn_processor({name: LowRankDelta(unet.get_submodule(
        name.rsplit(".processor", 1)[0]).to_q.in_features) for name in unet.attn_processors})
    run = box_edit(unet, slice(2, 4), slice(10, 12))
    assert not any("run dense in edits" in str(w.message) for w in run.caught)
    assert not run.engine.program(run.inputs).canonical.meta["fc_unknown_ops"]
    assert run.error <= 1e-5


def test_a_matmul_of_two_activations_is_not_a_projection():
    """``x @ y`` where y has positions too (here the sample's own tokens, transposed): a
    mixing of positions, which runs dense and exact."""
    unet = zoo.unet("sd15-tiny")

    def mix(module, args, out):
        tokens = out.flatten(2)                               # [B, C, HW]
        mixed = (tokens.transpose(1, 2) @ tokens[0]).mean(-1)  # [B, HW, HW] -> [B, HW]
        return out + 1e-3 * mixed.reshape(out.shape[0], 1, *out.shape[2:])

    unet.conv_in.register_forward_hook(mix)
    run = box_edit(unet, slice(2, 4), slice(10, 12))
    assert any("run dense in edits" in str(w.message) for w in run.caught)
    assert run.error <= 1e-5
