"""Every diffusers U-Net family, through the engine: the background promise, checked directly.

Tiny versions of diffusers' own test configurations, called with the keyword arguments their
pipelines pass: score-SDE (``UNet2DModel``, FIR resampling), the SD latent upscaler (K blocks:
reflect pad, Fourier time), DeepFloyd IF stages I and II and Kandinsky 2.1 and 2.2 (avg-pool
``ResnetDownsampleBlock2D``), Kandinsky 2.2 with a ControlNet hint, and SD 1.5 with ControlNet
residuals, T2I-Adapter residuals (added in place) and IP-Adapter image embeddings (a list).

Whatever the analysis cannot follow, an edit must keep the recording outside the plan's region
bit for bit; these tests check that apart from the oracle, and the oracle as well.
"""

import math
import warnings

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import oracle, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.engine.engine import node_macs

BATCH = 2


def _randn(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=gen)


def _build(cls_name, **config):
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(diffusers, cls_name)(**config).eval()


_K_DOWN = ("KDownBlock2D",) + ("KCrossAttnDownBlock2D",) * 3
_RESNET_SIMPLE = dict(
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
    resnet_time_scale_shift="scale_shift", sample_size=16,
)
_IF = dict(_RESNET_SIMPLE, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
           addition_embed_type_num_heads=2, cross_attention_norm="group_norm", act_fn="gelu")
_KANDINSKY22 = dict(_RESNET_SIMPLE, in_channels=4, out_channels=8, encoder_hid_dim=32,
                    encoder_hid_dim_type="image_proj", attention_head_dim=4)


def score_sde():
    unet = _build("UNet2DModel", sample_size=16, in_channels=3, out_channels=3,
                  block_out_channels=(32, 64, 64), layers_per_block=1,
                  time_embedding_type="fourier", norm_eps=1e-6, norm_num_groups=None,
                  mid_block_scale_factor=math.sqrt(2.0),
                  down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
                  up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"))
    randn = _randn(0)
    return unet, dict(sample=randn(BATCH, 3, 16, 16), timestep=torch.full((BATCH,), 0.5))


def latent_upscaler():
    unet = _build("UNet2DConditionModel", sample_size=16, in_channels=8, out_channels=5,
                  block_out_channels=(32, 32, 64, 64), layers_per_block=1, act_fn="gelu",
                  attention_head_dim=8, norm_num_groups=None, time_cond_proj_dim=16,
                  conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
                  down_block_types=_K_DOWN, mid_block_type=None,
                  up_block_types=("KCrossAttnUpBlock2D",) * 3 + ("KUpBlock2D",),
                  resnet_time_scale_shift="scale_shift", time_embedding_type="fourier",
                  timestep_post_act="gelu")
    randn = _randn(0)
    return unet, dict(sample=randn(BATCH, 8, 16, 16), timestep=torch.full((BATCH,), 0.5),
                      encoder_hidden_states=randn(BATCH, 7, 32), timestep_cond=randn(BATCH, 16))


def deepfloyd_if_1():
    unet = _build("UNet2DConditionModel", **_IF, in_channels=3, out_channels=6)
    randn = _randn(0)
    return unet, dict(sample=randn(BATCH, 3, 16, 16), timestep=torch.full((BATCH,), 500.0),
                      encoder_hidden_states=randn(BATCH, 7, 32))


def deepfloyd_if_2():
    unet = _build("UNet2DConditionModel", **_IF, in_channels=6, out_channels=6,
                  class_embed_type="timestep", mid_block_scale_factor=1.414,
                  time_embedding_act_fn="gelu", time_embedding_dim=32)
    randn = _randn(0)
    return unet, dict(sample=randn(BATCH, 6, 16, 16), timestep=torch.full((BATCH,), 500.0),
                      encoder_hidden_states=randn(BATCH, 7, 32),
                      class_labels=torch.full((BATCH,), 250.0))


def kandinsky21():
    unet = _build("UNet2DConditionModel", addition_embed_type="text_image",
                  **dict(_KANDINSKY22, encoder_hid_dim_type="text_image_proj"))
    randn = _randn(0)
    return unet, dict(sample=randn(BATCH, 4, 16, 16), timestep=torch.full((BATCH,), 500.0),
                      encoder_hidden_states=randn(BATCH, 7, 32),
                      added_cond_kwargs={"text_embeds": randn(BATCH, 32),
                                         "image_embeds": randn(BATCH, 32)})


def kandinsky22():
    unet = _build("UNet2DConditionModel", **_KANDINSKY22, addition_embed_type="image")
    randn = _randn(0)
    return unet, dict(sample=randn(BATCH, 4, 16, 16), timestep=torch.full((BATCH,), 500.0),
                      encoder_hidden_states=None,
                      added_cond_kwargs={"image_embeds": randn(BATCH, 32)})


def kandinsky22_controlnet():
    # The hint's embedding is concatenated to the 4 latent channels.
    unet = _build("UNet2DConditionModel", **dict(_KANDINSKY22, in_channels=8),
                  addition_embed_type="image_hint")
    randn = _randn(0)
    return unet, dict(sample=randn(BATCH, 4, 16, 16), timestep=torch.full((BATCH,), 500.0),
                      encoder_hidden_states=None,
                      added_cond_kwargs={"image_embeds": randn(BATCH, 32),
                                         "hint": randn(BATCH, 3, 128, 128)})


def sd15_controlnet():
    unet = zoo.unet("sd15-tiny")
    randn = _randn(1)
    return unet, dict(zoo.example_inputs(unet, batch=BATCH), down_block_additional_residuals=[
        randn(BATCH, 32, 16, 16), randn(BATCH, 32, 16, 16), randn(BATCH, 32, 8, 8),
        randn(BATCH, 64, 8, 8), randn(BATCH, 64, 8, 8)],
        mid_block_additional_residual=randn(BATCH, 64, 8, 8))


def sd15_t2i_adapter():
    unet = zoo.unet("sd15-tiny")
    randn = _randn(1)
    return unet, dict(zoo.example_inputs(unet, batch=BATCH),
                      down_intrablock_additional_residuals=[randn(BATCH, 32, 16, 16),
                                                            randn(BATCH, 64, 8, 8)])


def sd15_ip_adapter():
    """sd15-tiny with one IP-Adapter loaded as diffusers' loader sets it up."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = zoo.unet("sd15-tiny")
    channels, dim = unet.config.block_out_channels, unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(
            image_embed_dim=16, cross_attention_dim=dim, num_image_text_embeds=4)])
        processors = {}
        for name in unet.attn_processors:
            block, index = name.split(".")[:2]
            width = (channels[-1] if block == "mid_block" else
                     channels[::-1][int(index)] if block == "up_blocks" else channels[int(index)])
            processors[name] = AttnProcessor2_0() if "attn1" in name else \
                IPAdapterAttnProcessor2_0(hidden_size=width, cross_attention_dim=dim,
                                          num_tokens=(4,))
        unet.set_attn_processor(processors)
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    return unet.eval(), dict(zoo.example_inputs(unet, batch=BATCH),
                             added_cond_kwargs={"image_embeds": [_randn(1)(BATCH, 1, 16)]})


FAMILIES = {f.__name__: f for f in (
    score_sde, latent_upscaler, deepfloyd_if_1, deepfloyd_if_2, kandinsky21, kandinsky22,
    kandinsky22_controlnet, sd15_controlnet, sd15_t2i_adapter, sd15_ip_adapter)}


def copied(value):
    """``value`` with its lists copied: diffusers pops T2I-Adapter residuals off theirs."""
    if isinstance(value, dict):
        return {key: copied(inner) for key, inner in value.items()}
    return list(value) if isinstance(value, list) else value


def new_conditions(value, name=""):
    """Every conditioning tensor (all but the sample and timestep) shifted: a new prompt,
    new image embeddings, new control residuals."""
    if isinstance(value, dict):
        return {key: new_conditions(inner, key) for key, inner in value.items()}
    if isinstance(value, list):
        return [new_conditions(inner, name) for inner in value]
    if isinstance(value, torch.Tensor) and name not in ("sample", "timestep", "class_labels"):
        return value + 0.5
    return value


def new_sample(inputs, mask):
    sample = inputs["sample"].clone()
    sample[..., mask] += torch.randn(sample[..., mask].shape, generator=torch.Generator()
                                     .manual_seed(2))
    return dict(inputs, sample=sample)


def call(unet, inputs):
    """The U-Net's output tensor, called as a pipeline calls it (a fresh list each call)."""
    with torch.no_grad():
        return unet(**dict(copied(inputs), return_dict=False))[0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(unet, inputs, engine, cache, recorded output) with step 0 recorded."""
    unet, inputs = FAMILIES[request.param]()
    engine = fc.compile(unet)
    cache = engine.new_cache(num_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # the dense-node warning names what runs dense
        output = engine.record(cache, 0, **inputs)
    return unet, inputs, engine, cache, output


def box(size):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[4:8, 5:9] = True
    return mask


def test_record_equals_eager(family):
    unet, inputs, _, _, output = family
    torch.testing.assert_close(output, call(unet, inputs), rtol=0, atol=1e-5)


def test_identity_edit_returns_recorded(family):
    _, inputs, engine, cache, output = family
    plan = engine.plan(box(inputs["sample"].shape[-2:]))
    torch.testing.assert_close(engine.edit(cache, 0, plan, **inputs), output, rtol=0, atol=1e-5)


def test_empty_mask_with_new_conditions_returns_recorded(family):
    _, inputs, engine, cache, output = family
    plan = engine.plan(torch.zeros(inputs["sample"].shape[-2:], dtype=torch.bool))
    assert torch.equal(engine.edit(cache, 0, plan, **new_conditions(inputs)), output)


def test_edit_keeps_background_and_meets_oracle(family):
    _, inputs, engine, cache, output = family
    mask = box(inputs["sample"].shape[-2:])
    plan = engine.plan(mask)
    edited = new_conditions(new_sample(inputs, mask))
    result = engine.edit(cache, 0, plan, **edited)
    outside = ~plan[0].active
    assert torch.equal(result[..., outside], output[..., outside])
    assert not torch.allclose(result, output, atol=1e-3)    # the region did change
    reference = oracle.masked_dense(engine, plan, inputs, edited)
    torch.testing.assert_close(result, reference, rtol=0, atol=1e-4)


def test_full_mask_equals_dense(family):
    unet, inputs, engine, cache, _ = family
    mask = torch.ones(inputs["sample"].shape[-2:], dtype=torch.bool)
    edited = new_conditions(new_sample(inputs, mask))
    result = engine.edit(cache, 0, engine.plan(mask), **edited)
    torch.testing.assert_close(result, call(unet, edited), rtol=0, atol=1e-4)


def test_dense_graph_equals_the_module(family):
    """The graph ``engine.dense`` compiles on CUDA (``passes.tune_dense``: channels-last conv
    weights and grouped linears from the program's copies), run here eagerly on the CPU."""
    unet, inputs, engine, _, _ = family
    dense = engine.program(inputs).dense_graph()
    edited = new_conditions(inputs)
    result = dense(**flatten_inputs(copied(edited)))
    torch.testing.assert_close(result, call(unet, edited), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["sd15_t2i_adapter", "latent_upscaler", "kandinsky22",
                                  "score_sde"])
def test_backend_records_and_edits(name):
    """The torch.compile backend: the T2I-Adapter's list-valued input, popped empty by each
    call and added in place; the latent upscaler, whose resampling kernels are buffers
    Dynamo passes as graph inputs; Kandinsky 2.2, whose encoder_hidden_states=None Dynamo
    drops from the graph's inputs; score-SDE, whose skip blocks' NumPy scale factors Dynamo
    makes graph inputs from the first call."""
    unet, inputs = FAMILIES[name]()
    compiled = torch.compile(unet, backend="fisedit")
    with fc.recording(compiled) as recording:
        recorded = call(compiled, inputs)
    torch.testing.assert_close(recorded, call(unet, inputs), rtol=0, atol=1e-5)
    mask = box(inputs["sample"].shape[-2:])
    with fc.editing(recording, mask):
        same = call(compiled, inputs)
    torch.testing.assert_close(same, recorded, rtol=0, atol=1e-5)
    edited = new_conditions(new_sample(inputs, mask))
    with fc.editing(recording, mask) as editing:
        result = call(compiled, edited)
    outside = ~editing.plan[0].active
    assert torch.equal(result[..., outside], recorded[..., outside])
    reference = oracle.masked_dense(recording.engine, editing.plan, recording.inputs[0],
                                    editing.inputs[0])
    torch.testing.assert_close(result, reference, rtol=0, atol=1e-4)


def test_what_runs_dense_is_a_small_part(family):
    """Ops the analysis cannot follow run dense: resampling, pads and the added-KV attention's
    K/V concatenation, a small part of the work; the attention itself stays sparse.

    Counted from how the program runs each node (``Program.modes``), not from one plan: a plan
    may also run a whole level dense because its active fraction passes the dense threshold
    (the latent upscaler's 2x2 level under this box, 3.8% of its MACs), which is the cost
    model's choice, not a node the analysis could not follow."""
    _, inputs, engine, _, _ = family
    program = engine.program(inputs)
    plan = engine.plan(box(inputs["sample"].shape[-2:]))
    rows = node_macs(program, plan, engine.config)
    dense = sum(row["dense_macs"] for row in rows if program.modes.get(row["name"]) == "dense")
    assert dense <= 0.1 * sum(row["dense_macs"] for row in rows)
    assert not any(row["op"] == "attention" and program.modes.get(row["name"]) == "dense"
                   for row in rows)


def test_freeu_edits_as_its_filter_on_any_view():
    """FreeU's Fourier filter on ``[B, C, H, W]`` spectra and the same function on
    ``[B*C, H, W]`` views are one U-Net: their edits must be equal (the 4-D spectra were
    placed as spatial values and restricted to the region, an edit 3x further from the dense
    U-Net inside the region than without FreeU)."""
    import diffusers.utils.torch_utils as torch_utils

    unet = zoo.unet("sd15-tiny")
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    randn = _randn(0)
    inputs = zoo.example_inputs(unet, batch=BATCH, seed=0)
    mask = torch.zeros(inputs["sample"].shape[-2:], dtype=torch.bool)
    mask[:3, :3] = True
    edited = dict(inputs, sample=torch.where(mask, 3 * randn(*inputs["sample"].shape),
                                             inputs["sample"]))
    four_d = torch_utils.fourier_filter

    def on_views(x, threshold, scale):
        batch, channels, height, width = x.shape
        return four_d(x.reshape(1, batch * channels, height, width), threshold,
                      scale).reshape(x.shape)

    edits = []
    for fourier_filter in (four_d, on_views):
        with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            patch.setattr(torch_utils, "fourier_filter", fourier_filter)
            engine = fc.compile(unet)
            cache = engine.new_cache(1)
            recorded = engine.record(cache, 0, **inputs)
            plan = engine.plan(mask)
            edits.append(engine.edit(cache, 0, plan, **edited))
            expected = oracle.masked_dense(engine, plan, inputs, edited)
            assert torch.allclose(edits[-1], expected, rtol=1e-4, atol=1e-5)
            outside = ~plan.levels[0].active
            assert torch.equal(edits[-1][..., outside], recorded[..., outside])
    assert torch.allclose(edits[0], edits[1], rtol=1e-5, atol=1e-6)

