"""fold_attention: diffusers' explicit attention (AttnProcessor: baddbmm, softmax, bmm) becomes
the canonical attention op, so its edits run sparse; other uses of those ops stay as they are."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

import fisedit_compiler as fc
from fisedit_compiler import bench, ir, zoo
from fisedit_compiler.compiler.capture import capture
from fisedit_compiler.compiler.pipeline import trace
from fisedit_compiler.graph_keys import UNKNOWN_OPS
from fisedit_compiler.passes.canonicalize import canonicalize
from fisedit_compiler.passes.fold_attention import fold_attention
from pass_checks import attention_nodes, box, edit_checked, linted


def explicit_unet(**changes):
    """sd15-tiny (or ``changes`` of its config) with diffusers' explicit attention processor."""
    _, cfg = zoo.CONFIGS["sd15-tiny"]
    unet = zoo.from_config(dict(cfg, **changes))
    unet.set_attn_processor(AttnProcessor())
    return unet


def test_the_explicit_attention_folds_to_the_attention_op():
    default = zoo.unet("sd15-tiny")
    explicit = explicit_unet()
    inputs = zoo.example_inputs(explicit, batch=2)
    gm = trace(explicit, inputs, "export", "canonical")
    assert len(attention_nodes(gm)) == len(attention_nodes(trace(default, inputs)))
    assert not gm.meta[UNKNOWN_OPS]             # no baddbmm, softmax, bmm or empty left
    assert all(node.meta[ir.META_ATTN_KIND] in ("self", "cross") for node in attention_nodes(gm))
    flat = fc.compiler.capture.flatten_inputs(inputs)
    with torch.no_grad():
        folded = gm(*[flat[name] for name in gm.meta["fc_inputs"]])
        assert bench.relative_error(folded, explicit(**inputs)[0]) <= 1e-5


def test_the_fold_changes_nothing_without_the_pattern():
    unet = zoo.unet("sd15-tiny")
    canonical = canonicalize(capture(unet, zoo.example_inputs(unet, batch=2)))
    before = str(canonical.graph)
    assert str(linted(fold_attention, canonical).graph) == before


def test_explicit_attention_edits_run_sparse_and_exact():
    unet = explicit_unet()
    inputs = zoo.example_inputs(unet, batch=2)
    engine = edit_checked(unet, inputs, box(slice(5, 8), slice(2, 4)))
    modes = engine.program(inputs).modes
    assert all(modes[node.name] == "sparse"
               for node in attention_nodes(engine.program(inputs).canonical))


def test_a_text_mask_folds_as_the_attention_mask():
    """An encoder_attention_mask reaches the explicit attention as baddbmm's added input
    (beta=1): it becomes the op's additive mask over the text tokens."""
    unet = explicit_unet()
    inputs = zoo.example_inputs(unet, batch=2)
    text_mask = torch.ones(2, inputs["encoder_hidden_states"].shape[1], dtype=torch.bool)
    text_mask[:, 5:] = False
    inputs["encoder_attention_mask"] = text_mask
    engine = edit_checked(unet, inputs, box(slice(0, 3), slice(13, 16)))
    masked = [node for node in attention_nodes(engine.program(inputs).canonical)
              if node.args[3] is not None]
    assert masked and all(node.meta[ir.META_ATTN_KIND] == "cross" for node in masked)


def test_upcast_casts_around_the_explicit_attention_fold_too():
    """bf16 with upcast_attention: the queries and keys are cast to fp32 before baddbmm and
    the probabilities back to bf16 before bmm; the op takes bf16 operands (its softmax in
    fp32), as the default processor does, within bf16 rounding of the explicit form."""
    unet = explicit_unet(upcast_attention=True).to(torch.bfloat16)
    inputs = zoo.example_inputs(unet, batch=2)
    gm = trace(unet, inputs, "export", "canonical")
    assert attention_nodes(gm) and not gm.meta[UNKNOWN_OPS]
    assert not any(ir.is_call(node, ir.cast) and node.args[1] == torch.float32
                   for node in gm.graph.nodes if node.meta.get(ir.META_MODULE, "").endswith(
                       ("attn1", "attn2")))
    edit_checked(unet, inputs, box(slice(6, 9), slice(6, 9)), tolerance=3e-2)


class VariantProcessor(AttnProcessor):
    """Explicit attention with the scores changed: half of an added bias (``beta``), the
    softmax in another dtype or over another dim. Only the plain form is the pattern."""

    def __init__(self, beta=0.0, softmax_dtype=None, softmax_dim=-1):
        self.beta, self.softmax_dtype, self.softmax_dim = beta, softmax_dtype, softmax_dim

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        bias = torch.ones(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                          device=query.device)
        scores = torch.baddbmm(bias, query, key.transpose(-1, -2), beta=self.beta,
                               alpha=attn.scale)
        if self.softmax_dtype is not None:
            scores = scores.to(self.softmax_dtype)
        probs = scores.softmax(dim=self.softmax_dim).to(query.dtype)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("variant, folds", [
    ({}, True), ({"beta": 0.5}, False), ({"softmax_dtype": torch.bfloat16}, False),
    ({"softmax_dim": 1}, False)], ids=["plain", "beta", "narrower-softmax", "softmax-dim"])
def test_only_the_plain_pattern_folds(variant, folds):
    unet = zoo.unet("sd15-tiny")
    unet.set_attn_processor(VariantProcessor(**variant))
    inputs = zoo.example_inputs(unet, batch=2)
    gm = trace(unet, inputs, "export", "canonical")
    assert bool(attention_nodes(gm)) == folds
    assert ("aten.baddbmm.default" in gm.meta[UNKNOWN_OPS]) == (not folds)
    flat = fc.compiler.capture.flatten_inputs(inputs)
    with torch.no_grad():
        out = gm(*[flat[name] for name in gm.meta["fc_inputs"]])
        # (A bf16 softmax amplifies the graph's float32 reorderings; folded it was 1.4e-4 off.)
        assert bench.relative_error(out, unet(**inputs)[0]) <= 5e-5


@pytest.mark.skipif(not fc.config.HAS_TRITON, reason="needs Triton (its interpreter on CPU)")
def test_the_folded_attention_runs_on_the_triton_kernel():
    """The folded op's [batch * heads, tokens, dim] operands reach the attention kernel (under
    the interpreter on CPU)."""
    unet = explicit_unet()
    inputs = zoo.example_inputs(unet, batch=2)
    edit_checked(unet, inputs, box(slice(5, 7), slice(6, 8)), fc.SparseConfig(kernels="triton"))
