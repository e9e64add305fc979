"""Capture: both frontends on every tiny zoo U-Net give canonical graphs equal to eager."""

from collections import Counter

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import ir, zoo
from fisedit_compiler.compiler import capture, pipeline
from fisedit_compiler.passes import registry
from fisedit_compiler.errors import FiseditError, UnsupportedGraphError

TINY = [name for name in zoo.MODEL_NAMES if name.endswith("-tiny")]


def run_graph(gm, inputs):
    """Call a traced graph on the U-Net keyword ``inputs`` (placeholders in ``fc_inputs`` order)."""
    flat = capture.flatten_inputs(inputs)
    with torch.no_grad():
        return gm(*[flat[name] for name in gm.meta["fc_inputs"]])


def op_counts(gm):
    return Counter(ir.op_name(n) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("frontend", capture.FRONTENDS)
@pytest.mark.parametrize("name", TINY)
def test_canonical_equals_eager(traced, name, frontend):
    t = traced(name, frontend)
    with torch.no_grad():
        (expected,) = t.unet(**t.inputs)
    actual = run_graph(t.gm, t.inputs)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-5
    assert t.gm.meta["fc_unknown_ops"] == {}
    assert not any(n.meta.get(ir.META_UNKNOWN) for n in t.gm.graph.nodes)
    assert all(ir.op_name(n) in registry.REGISTRY for n in t.gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", TINY)
def test_frontends_reach_one_dialect(traced, name):
    """One canonicalizer serves both frontends: the same ops, the same number of times."""
    assert op_counts(traced(name, "export").gm) == op_counts(traced(name, "dynamo").gm)


def test_inputs_named_after_unet_kwargs(traced):
    gm = traced("sdxl-tiny").gm
    assert gm.meta["fc_inputs"] == [
        "sample", "timestep", "encoder_hidden_states", "added_cond_kwargs_text_embeds",
        "added_cond_kwargs_time_ids"]
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == gm.meta["fc_inputs"]


def test_captured_stage_is_aten(traced):
    t = traced("sd15-tiny", stage="captured")
    calls = [n for n in t.gm.graph.nodes if n.op == "call_function"]
    assert calls and not any(ir.META_OP in n.meta for n in calls)
    assert Counter(n.target for n in calls)[torch.ops.aten.conv2d.default] == 33
    # Canonical graphs drop `contiguous` copies, so matmuls may see other memory layouts and
    # round differently: the two agree to float noise, not bit for bit.
    canonical = run_graph(traced("sd15-tiny").gm, t.inputs)
    torch.testing.assert_close(run_graph(t.gm, t.inputs), canonical, atol=1e-5, rtol=0)


def test_non_unet_rejected():
    with pytest.raises(FiseditError, match="not a diffusers U-Net.*pipe.unet"):
        capture.capture(torch.nn.Conv2d(4, 4, 3), {"input": torch.randn(1, 4, 8, 8)})


def test_a_torch_compiled_unet_is_refused_with_its_fix():
    """``pipe.unet = torch.compile(pipe.unet, backend="fisedit")`` as in the README: the
    message names the wrapper and how to pass the U-Net itself, not "pass pipe.unet"."""
    import fisedit_compiler as fc

    compiled = torch.compile(zoo.unet("sd15-tiny"), backend="fisedit")
    for call in (capture.check_unet, fc.compile):
        with pytest.raises(FiseditError, match=r"UNet2DConditionModel wrapped by torch.compile.*"
                                               r"pipe\.unet = pipe\.unet\._orig_mod"):
            call(compiled)
    capture.check_unet(compiled._orig_mod)
    with pytest.raises(FiseditError, match="not a diffusers U-Net.*pipe.unet"):
        capture.check_unet(torch.compile(torch.nn.Linear(2, 2), backend="fisedit"))


def test_unknown_frontend_and_stage(traced):
    t = traced("sd15-tiny")
    with pytest.raises(FiseditError, match="unknown frontend 'fx'.*export.*dynamo"):
        pipeline.trace(t.unet, t.inputs, frontend="fx")
    with pytest.raises(FiseditError, match="unknown stage 'lowered'.*captured.*canonical"):
        pipeline.trace(t.unet, t.inputs, stage="lowered")


@pytest.mark.slow
def test_sd15_full_graph():
    """The census of the SD1.5 U-Net's ops (docs/design.md, "Stages")."""
    unet = zoo.unet("sd15")
    gm = pipeline.trace(unet, zoo.example_inputs(unet, batch=2))
    counts = op_counts(gm)
    assert (counts["conv2d"], counts["group_norm"], counts["attention"]) == (98, 61, 32)
    kinds = Counter(n.meta[ir.META_ATTN_KIND] for n in gm.graph.nodes if ir.is_op(n, "attention"))
    assert kinds == {"self": 16, "cross": 16}
    assert gm.meta["fc_unknown_ops"] == {}


class InPlaceResidual(torch.nn.Module):
    """A skip connection that sees a later in-place residual add, as diffusers' T2I-Adapter
    path does (``sample += residual`` on a tensor already kept for the skip)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample, residual):
        hidden = self.conv(sample)
        skip = hidden
        hidden += residual
        return self.conv(hidden) + skip


def test_in_place_ops_are_functionalised():
    module, inputs = InPlaceResidual().eval(), (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8))
    gm = capture.program_to_graph_module(torch.export.export(module, inputs, strict=False))
    assert not any(capture._mutates(n) for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), module(*inputs), rtol=0, atol=0)


class WritesIntoItsInput(torch.nn.Module):
    def forward(self, sample):
        sample.mul_(2)
        return sample + 1


def test_writing_into_an_input_is_refused():
    program = torch.export.export(WritesIntoItsInput(), (torch.randn(1, 4, 8, 8),), strict=False)
    with pytest.raises(FiseditError, match=r"writes in place into its input.*\['sample'\]"):
        capture.program_to_graph_module(program)


def test_nested_inputs_flattened_as_export_names_them():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    flat = capture.flatten_inputs({"sample": a, "down_block_additional_residuals": [b, c],
                                   "added_cond_kwargs": {"image_embeds": [c]}, "scale": 1.0})
    assert list(flat) == ["sample", "down_block_additional_residuals_0",
                          "down_block_additional_residuals_1", "added_cond_kwargs_image_embeds_0"]


def test_inputs_the_unet_fails_on_raise_its_own_error():
    unet = zoo.unet("sd15-tiny")
    inputs = dict(zoo.example_inputs(unet),
                  mid_block_additional_residual=torch.zeros(2, 3, 5, 5),
                  down_block_additional_residuals=[torch.zeros(2, 32, 16, 16)] * 6)
    with pytest.raises(FiseditError, match=r"the U-Net itself fails on these inputs: "
                                           r"RuntimeError: The size of tensor a \(8\) must "
                                           r"match") as error:
        capture.capture(unet, inputs)
    assert isinstance(error.value.__cause__, RuntimeError)
    assert len(inputs["down_block_additional_residuals"]) == 6     # the caller's list kept


def test_a_capture_failure_on_inputs_the_unet_takes_is_an_unsupported_graph(monkeypatch):
    """The U-Net runs on the inputs, the frontend fails: that is an unsupported graph, named
    with its usual causes; the frontend's own error, chained, says where."""
    unet = zoo.unet("sd15-tiny")
    calls = []

    def failing_export(*args, **kwargs):
        raise NotImplementedError("an op the frontend cannot take")

    original_forward = unet.forward
    monkeypatch.setattr(torch.export, "export", failing_export)
    monkeypatch.setattr(unet, "forward", lambda **kw: calls.append(1) or original_forward(**kw))
    with pytest.raises(UnsupportedGraphError, match=r"export cannot capture "
                                                    r"UNet2DConditionModel's forward as one graph "
                                                    r"\(NotImplementedError: an op the frontend "
                                                    r"cannot take\).*torch.where") as error:
        capture.capture(unet, zoo.example_inputs(unet))
    assert isinstance(error.value.__cause__, NotImplementedError)
    assert calls == [1]         # the U-Net was run once, to tell the two failures apart


def test_python_control_flow_on_a_tensor_value_is_named_as_the_cause():
    unet = zoo.unet("sd15-tiny")
    block = unet.mid_block.resnets[0]
    original = block.forward

    def branching(hidden_states, temb, *args, **kwargs):
        out = original(hidden_states, temb, *args, **kwargs)
        return out * 2 if out.mean() > 0 else out          # a branch on a tensor's value

    block.forward = branching
    with pytest.raises(UnsupportedGraphError, match="cannot capture .* Python control flow"):
        capture.capture(unet, zoo.example_inputs(unet))


def test_example_inputs_take_a_per_block_text_width():
    """``cross_attention_dim`` given per block: one text tensor of the common width, or a clear
    error where the blocks' widths differ."""
    cls_name, cfg = zoo.CONFIGS["sd15-tiny"]
    blocks = len(cfg["down_block_types"])
    width = cfg["cross_attention_dim"]
    unet = zoo.from_config(dict(cfg, cross_attention_dim=(width,) * blocks))
    inputs = zoo.example_inputs(unet, batch=2)
    assert inputs["encoder_hidden_states"].shape[-1] == width
    mixed = zoo.from_config(dict(cfg, cross_attention_dim=(width, width * 2)[:1] * (blocks - 1)
                                 + (width * 2,)))
    with pytest.raises(FiseditError, match=r"cross_attention_dim=.*different text widths"):
        zoo.example_inputs(mixed)


@pytest.mark.parametrize("changes", [
    dict(num_class_embeds=5),                                     # SD x4 upscaler
    dict(class_embed_type="timestep"),                            # DeepFloyd IF stage II
    dict(class_embed_type="identity"),
    dict(class_embed_type="projection", projection_class_embeddings_input_dim=12),
    dict(class_embed_type="simple_projection", projection_class_embeddings_input_dim=12),
    dict(encoder_hid_dim=20, encoder_hid_dim_type="text_proj"),
    dict(encoder_hid_dim=32, encoder_hid_dim_type="image_proj",
         addition_embed_type="image"),                            # Kandinsky 2.2
    dict(in_channels=8, encoder_hid_dim=32, encoder_hid_dim_type="image_proj",
         addition_embed_type="image_hint"),                       # Kandinsky 2.2 ControlNet
    dict(encoder_hid_dim=32, encoder_hid_dim_type="text_image_proj",
         addition_embed_type="text_image"),                       # Kandinsky 2.1
], ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()))
def test_example_inputs_run_every_conditioning(changes):
    """Class labels and added conditions as each config needs them: engine.plan before a
    record (which builds the program from these inputs) refused such U-Nets, blaming inputs
    the caller never passed."""
    _, cfg = zoo.CONFIGS["sd15-tiny"]
    unet = zoo.from_config(dict(cfg, cross_attention_dim=32, **changes))
    inputs = zoo.example_inputs(unet, batch=2)
    with torch.no_grad():
        assert unet(**inputs)[0].shape[-2:] == inputs["sample"].shape[-2:]
    mask = torch.zeros(inputs["sample"].shape[-2:], dtype=torch.bool)
    mask[:3, :3] = True
    assert fc.compile(unet).plan(mask).levels[0].count > 0


@pytest.mark.parametrize("sample_size, expected", [
    (16, (16, 16)), ((12, 20), (12, 20)), ([12, 20], (12, 20)),
    (None, None), (0, None), (True, None), ((12,), None), ((12, 0), None), ("16", None)])
def test_configured_latent_size_reads_an_int_or_a_pair(sample_size, expected):
    assert capture.configured_latent_size({"sample_size": sample_size}) == expected


def test_example_inputs_follow_a_non_square_sample_size_and_refuse_none():
    cls_name, cfg = zoo.CONFIGS["sd15-tiny"]
    unet = zoo.from_config(dict(cfg, sample_size=(8, 16)))
    assert zoo.example_inputs(unet, batch=1)["sample"].shape[-2:] == (8, 16)
    unet.register_to_config(sample_size=None)
    with pytest.raises(FiseditError, match=r"sample_size is None.*pass height and width"):
        zoo.example_inputs(unet, batch=1)
    assert zoo.example_inputs(unet, batch=1, height=8, width=8)["sample"].shape[-2:] == (8, 8)


@pytest.mark.parametrize("frontend", ["export", "dynamo"])
def test_an_input_the_forward_never_reads_is_taken_by_both_frontends(frontend):
    """Kandinsky 2.2's image_proj replaces the text states by the image embeddings'
    projection, unread: Dynamo leaves that input out of its graph, export keeps it; the engine
    passes every input, so the dynamo capture takes it too (record and edit meet the oracle)."""
    _, cfg = zoo.CONFIGS["sd15-tiny"]
    unet = zoo.from_config(dict(cfg, cross_attention_dim=32, encoder_hid_dim=32,
                                encoder_hid_dim_type="image_proj", addition_embed_type="image"))
    inputs = zoo.example_inputs(unet, batch=2)
    engine = fc.compile(unet, fc.SparseConfig(frontend=frontend))
    cache = engine.new_cache(1)
    with torch.no_grad():
        dense = unet(**inputs)[0]
    assert torch.allclose(engine.record(cache, 0, **inputs), dense, atol=1e-5)
    mask = torch.zeros(inputs["sample"].shape[-2:], dtype=torch.bool)
    mask[:4, :4] = True
    plan = engine.plan(mask)
    image = dict(inputs["added_cond_kwargs"], image_embeds=inputs["added_cond_kwargs"]
                 ["image_embeds"] + 0.1)
    edited = dict(inputs, added_cond_kwargs=image)
    expected = fc.oracle.masked_dense(engine, plan, inputs, edited)
    actual = engine.edit(cache, 0, plan=plan, **edited)
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5


def test_a_number_timestep_becomes_the_tensor_the_unet_makes_of_it():
    """UNet2DModel truncates a number to long (diffusers' forward); UNet2DConditionModel keeps
    a float in float64 and an int in int64 (its get_time_embed). A number with no U-Net to
    tell which is refused, and so is one that is not finite, before it becomes a tensor."""
    condition, plain = zoo.unet("sd15-tiny"), zoo.unet("ddpm-tiny")
    cases = [(plain, 37.5, torch.long, 37), (plain, 12, torch.long, 12),
             (condition, 999.5, torch.float64, 999.5), (condition, 7, torch.int64, 7)]
    for unet, number, dtype, value in cases:
        timestep = capture.flatten_inputs({"timestep": number}, unet)["timestep"]
        assert timestep.dtype == dtype and timestep.dim() == 0 and timestep.item() == value
    tensor = torch.tensor([3.5])
    assert capture.flatten_inputs({"timestep": tensor})["timestep"] is tensor
    with pytest.raises(FiseditError, match="pass the U-Net .*or pass the timestep as a tensor"):
        capture.flatten_inputs({"timestep": 10.0})
    for number in (float("nan"), float("inf")):
        with pytest.raises(FiseditError, match=f"the timestep is {number}, not finite"):
            capture.flatten_inputs({"timestep": number}, plain)
