"""The sparse engine against the oracle (docs/design.md, "Oracle"), through the public API."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fisedit_compiler as fc
from fisedit_compiler import zoo
from fisedit_compiler.compiler.capture import flatten_inputs

TINY = ["sd15-tiny", "sd21-tiny", "sdxl-tiny", "ddpm-tiny"]
POLICIES = [("incremental", "full"), ("incremental", "sparse"), ("cached", "full"),
            ("cached", "sparse")]


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def edited(inputs, mask, seed=1, prompt_shift=0.1):
    """Inputs that differ from ``inputs`` inside ``mask`` (and in the prompt, if there is one)."""
    gen = torch.Generator().manual_seed(seed)
    sample = inputs["sample"].clone()
    noise = torch.randn(sample.shape, generator=gen)
    sample[..., mask] = sample[..., mask] + noise[..., mask]
    result = dict(inputs, sample=sample)
    if "encoder_hidden_states" in inputs:
        result["encoder_hidden_states"] = inputs["encoder_hidden_states"] + prompt_shift
    return result


def box(size, y0, x0, y1, x1):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.fixture(scope="module", params=TINY)
def model(request):
    unet = zoo.unet(request.param)
    return unet, zoo.example_inputs(unet, batch=2, seed=0)


@pytest.fixture(scope="module")
def recorded(model):
    """One engine per policy pair, each with step 0 recorded."""
    unet, inputs = model
    result = {}
    first = fc.compile(unet)
    for group_norm, attention in POLICIES:
        engine = first.with_config(fc.SparseConfig(group_norm=group_norm, self_attention=attention))
        cache = engine.new_cache(num_steps=1)
        output = engine.record(cache, step=0, **inputs)
        result[group_norm, attention] = engine, cache, output
    return result


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_record_equals_eager(model, recorded, policy):
    unet, inputs = model
    _, _, output = recorded[policy]
    with torch.no_grad():
        eager = unet(**inputs)[0]
    assert (output - eager).abs().max().item() <= 1e-5


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_full_mask_equals_dense(model, recorded, policy):
    unet, inputs = model
    engine, cache, _ = recorded[policy]
    size = inputs["sample"].shape[-2:]
    mask = torch.ones(size, dtype=torch.bool)
    new = edited(inputs, mask)
    plan = engine.plan(mask)
    assert plan.full
    with torch.no_grad():
        dense = unet(**new)[0]
    assert relative_error(engine.edit(cache, 0, plan=plan, **new), dense) <= 1e-5


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_empty_mask_returns_recorded_bit_for_bit(model, recorded, policy):
    _, inputs = model
    engine, cache, output = recorded[policy]
    mask = torch.zeros(inputs["sample"].shape[-2:], dtype=torch.bool)
    result = engine.edit(cache, 0, plan=engine.plan(mask), **edited(inputs, mask))
    assert torch.equal(result, output)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_box_edit_equals_oracle_and_keeps_background(model, recorded, policy):
    _, inputs = model
    engine, cache, output = recorded[policy]
    height, width = inputs["sample"].shape[-2:]
    mask = box((height, width), 2, width // 2, 5, width // 2 + 3)
    new = edited(inputs, mask)
    plan = engine.plan(mask)
    result = engine.edit(cache, 0, plan=plan, **new)
    expected = fc.oracle.masked_dense(engine, plan, inputs, new)
    assert relative_error(result, expected) <= 1e-5
    outside = ~plan[0].active
    assert torch.equal(result[..., outside], output[..., outside])
    assert not torch.equal(result, output)


def blobs(size):
    """Masks of one or several rectangles anywhere (borders included), 1 pixel to all."""
    height, width = size

    def rectangle(draw):
        y0 = draw(st.integers(0, height - 1))
        x0 = draw(st.integers(0, width - 1))
        y1 = draw(st.integers(y0 + 1, height))
        x1 = draw(st.integers(x0 + 1, width))
        return y0, x0, y1, x1

    @st.composite
    def strategy(draw):
        mask = torch.zeros(size, dtype=torch.bool)
        for _ in range(draw(st.integers(1, 3))):
            y0, x0, y1, x1 = rectangle(draw)
            mask[y0:y1, x0:x1] = True
        return mask

    return strategy()


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_masks_meet_the_oracle(model, recorded, data):
    _, inputs = model
    policy = data.draw(st.sampled_from(POLICIES))
    dilation = data.draw(st.integers(0, 2))
    engine, cache, _ = recorded[policy]
    mask = data.draw(blobs(tuple(inputs["sample"].shape[-2:])))
    config = fc.SparseConfig(group_norm=policy[0], self_attention=policy[1], dilation=dilation)
    if dilation != engine.config.dilation:
        engine = engine.with_config(config)
        cache = engine.new_cache(1)
        engine.record(cache, 0, **inputs)
    new = edited(inputs, mask, seed=data.draw(st.integers(0, 1000)))
    plan = engine.plan(mask)
    result = engine.edit(cache, 0, plan=plan, **new)
    expected = fc.oracle.masked_dense(engine, plan, inputs, new)
    assert relative_error(result, expected) <= 1e-5


def test_several_steps_edited_in_turn():
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    cache = engine.new_cache(num_steps=3)
    steps = [zoo.example_inputs(unet, seed=step, timestep=900 - 300 * step) for step in range(3)]
    outputs = [engine.record(cache, step, **inputs) for step, inputs in enumerate(steps)]
    mask = box((16, 16), 0, 0, 4, 7)
    plan = engine.plan(mask)
    for step in reversed(range(3)):
        new = edited(steps[step], mask, seed=step)
        result = engine.edit(cache, step, plan=plan, **new)
        assert relative_error(result, fc.oracle.masked_dense(engine, plan, steps[step], new)) <= 1e-5
        assert torch.equal(result[..., ~plan[0].active], outputs[step][..., ~plan[0].active])


def assert_edit_meets_oracle_and_full_mask_is_dense(engine, cache, inputs, mask):
    """Step 0 of ``cache`` edited inside ``mask`` meets the oracle, and edited everywhere
    equals the U-Net run on the edited inputs."""
    new = edited(inputs, mask)
    plan = engine.plan(mask)
    result = engine.edit(cache, 0, plan=plan, **new)
    assert relative_error(result, fc.oracle.masked_dense(engine, plan, inputs, new)) <= 1e-5
    full = torch.ones(mask.shape, dtype=torch.bool)
    with torch.no_grad():
        dense = engine.unet(**new)[0]
    assert relative_error(engine.edit(cache, 0, plan=engine.plan(full), **new), dense) <= 1e-5


def _fourier_unet():
    """A tiny UNet2DConditionModel with a Fourier time embedding: its sin/cos of t times
    large frequencies tells a float64 timestep from a float32 one (~1e-3 at t = 999)."""
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return diffusers.UNet2DConditionModel(
            sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            time_embedding_type="fourier", time_embedding_dim=64).eval()


@pytest.mark.parametrize("make, number", [(lambda: zoo.unet("ddpm-tiny"), 37.5),
                                          (_fourier_unet, 999.0)], ids=["ddpm", "fourier"])
def test_a_number_timestep_runs_as_the_unet_runs_it(make, number):
    """A Python-number timestep, as a caller may pass one: recorded, edited and run dense as
    the U-Net itself runs it (UNet2DModel truncates 37.5 to 37; UNet2DConditionModel keeps
    999.0 in float64), not as a float32 tensor of the number."""
    unet = make()
    inputs = dict(zoo.example_inputs(unet, batch=1, seed=0), timestep=number)
    engine = fc.compile(unet)
    cache = engine.new_cache(1)
    with torch.no_grad():
        expected = unet(**inputs)[0]
    assert relative_error(engine.record(cache, 0, **inputs), expected) <= 1e-6
    size = tuple(inputs["sample"].shape[-2:])
    assert_edit_meets_oracle_and_full_mask_is_dense(engine, cache, inputs, box(size, 1, 1, 4, 4))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "-".join(p))
def test_a_float64_unet_edits_to_float64_precision(policy):
    """The reference ops accumulate in fp32 for half types and in the input's own dtype for
    float64 (a plain .float() rounded a float64 U-Net's edits to fp32: 1e-7 off)."""
    unet = zoo.unet("sd15-tiny").double()
    inputs = {name: value.double() if torch.is_tensor(value) and name != "timestep" else value
              for name, value in zoo.example_inputs(unet, batch=2, seed=0).items()}
    engine = fc.compile(unet, fc.SparseConfig(group_norm=policy[0], self_attention=policy[1]))
    cache = engine.new_cache(num_steps=1)
    recorded = engine.record(cache, 0, **inputs)
    plan = engine.plan(box((16, 16), 3, 5, 7, 9))
    if policy[1] == "full":     # the sparse policy's attention over active tokens is no identity
        assert (engine.edit(cache, 0, plan, **inputs) - recorded).abs().max() < 1e-12
    new = edited(inputs, plan[0].active)
    result = engine.edit(cache, 0, plan, **new)
    assert result.dtype == torch.float64
    assert relative_error(result, fc.oracle.masked_dense(engine, plan, inputs, new)) < 1e-12


# --- generated U-Net configurations --------------------------------------------------------

@st.composite
def unet_configs(draw):
    levels = draw(st.integers(2, 3))
    groups = draw(st.sampled_from([4, 8]))
    channels = tuple(groups * draw(st.integers(1, 4)) for _ in range(levels))
    down = tuple(draw(st.sampled_from(["CrossAttnDownBlock2D", "DownBlock2D"]))
                 for _ in range(levels))
    up = tuple("CrossAttnUpBlock2D" if block == "CrossAttnDownBlock2D" else "UpBlock2D"
               for block in reversed(down))
    heads = tuple(draw(st.sampled_from([2, 4])) for _ in range(levels))
    config = dict(
        sample_size=draw(st.sampled_from([8, 12, 16, 20])),
        block_out_channels=channels, down_block_types=down, up_block_types=up,
        layers_per_block=draw(st.integers(1, 2)), cross_attention_dim=16,
        attention_head_dim=heads, norm_num_groups=groups,
        use_linear_projection=draw(st.booleans()),
        transformer_layers_per_block=tuple(draw(st.integers(1, 2)) for _ in range(levels)),
        mid_block_type=draw(st.sampled_from(["UNetMidBlock2DCrossAttn", None])),
    )
    return config


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(config=unet_configs(), data=st.data())
def test_generated_unets_meet_the_oracle(config, data):
    unet = zoo.from_config(config)
    inputs = zoo.example_inputs(unet, batch=2, seed=0, text_length=7)
    policy = data.draw(st.sampled_from(POLICIES))
    engine = fc.compile(unet, fc.SparseConfig(group_norm=policy[0], self_attention=policy[1]))
    cache = engine.new_cache(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # a generated U-Net must not fall back to dense
        output = engine.record(cache, 0, **inputs)
    with torch.no_grad():
        assert (output - unet(**inputs)[0]).abs().max().item() <= 1e-5
    mask = data.draw(blobs(tuple(inputs["sample"].shape[-2:])))
    assert_edit_meets_oracle_and_full_mask_is_dense(engine, cache, inputs, mask)


# --- statistics and cache accounting ---------------------------------------------------------

def test_stats_count_dense_sparse_and_ideal_macs():
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet)
    engine.record(engine.new_cache(1), 0, **inputs)
    small = engine.stats(engine.plan(box((16, 16), 0, 0, 2, 2)))
    large = engine.stats(engine.plan(box((16, 16), 0, 0, 4, 6)))
    full = engine.stats(engine.plan(torch.ones(16, 16, dtype=torch.bool)))
    assert small["dense_macs"] == large["dense_macs"] == full["dense_macs"] > 0
    assert small["ideal_macs"] <= small["sparse_macs"] < large["sparse_macs"]
    assert large["sparse_macs"] < full["sparse_macs"] == full["dense_macs"]
    assert [level["dense"] for level in full["levels"]] == [True, True]
    assert small["mask_fraction"] == pytest.approx(4 / 256)


def test_cache_holds_only_what_edits_read():
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet)
    cache = engine.new_cache(2)
    engine.record(cache, 0, **inputs)
    program = engine.program(inputs)
    keys = set(cache.breakdown())
    assert keys == {entry.key for entry in program.entries}
    kinds = {entry.kind for entry in program.entries}
    assert kinds == {"value", "group_norm_stats"}
    every_node = sum(node.meta["val"].numel() * 4 for node in program.canonical.graph.nodes
                     if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor))
    assert 0 < cache.nbytes() < every_node / 3
    one_step = cache.nbytes()
    engine.record(cache, 1, **inputs)
    assert cache.nbytes() == 2 * one_step


# --- bad input --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_tiny():
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet, fc.SparseConfig(check_inputs=True))
    inputs = zoo.example_inputs(unet)
    cache = engine.new_cache(2)
    output = engine.record(cache, 0, **inputs)
    return engine, cache, inputs, output


def snapshot(cache):
    return {step: {key: value.clone() if isinstance(value, torch.Tensor) else
                   {k: v.clone() for k, v in value.items()}
                   for key, value in store.items()} for step, store in cache.steps.items()}


def same_cache(cache, before):
    for step, store in before.items():
        for key, value in store.items():
            now = cache.steps[step][key]
            if isinstance(value, dict):
                assert all(torch.equal(now[k], v) for k, v in value.items())
            else:
                assert torch.equal(now, value)
    return set(cache.steps) == set(before)


def test_an_edit_pass_follows_a_schedule_tensor_under_inference_mode(sd15_tiny):
    """The timesteps are views of one schedule tensor, as a pipeline's loop yields them, made
    under torch.inference_mode (no version counters): each step meets the oracle at its own
    recorded timestep, and another step's timestep is refused."""
    engine = sd15_tiny[0]
    inputs = zoo.example_inputs(engine.unet, batch=2, seed=0)
    mask = box((16, 16), 2, 2, 9, 7)
    plan = engine.plan(mask)
    new = edited(inputs, mask)
    with torch.inference_mode():
        schedule = torch.tensor([900, 600, 300])
        cache = engine.new_cache(len(schedule))
        for step, t in enumerate(schedule):
            engine.record(cache, step, **dict(inputs, timestep=t))
        for step, t in enumerate(schedule):
            actual = engine.edit(cache, step, plan=plan, **dict(new, timestep=t))
            expected = fc.oracle.masked_dense(engine, plan, dict(inputs, timestep=t),
                                              dict(new, timestep=t))
            assert relative_error(actual, expected) <= 1e-5
        with pytest.raises(fc.FiseditError, match=r"recorded at timestep \[300\] but the edit "
                                                  r"passes \[600\]"):
            engine.edit(cache, 2, plan=plan, **dict(new, timestep=schedule[1]))
        # Per-sample timesteps: each sample's is shown where they differ.
        per_sample = engine.new_cache(1)
        engine.record(per_sample, 0, **dict(inputs, timestep=torch.tensor([900, 300])))
        with pytest.raises(fc.FiseditError, match=r"recorded at timestep \[900, 300\] but the "
                                                  r"edit passes \[300, 900\]"):
            engine.edit(per_sample, 0, plan=plan, **dict(new, timestep=torch.tensor([300, 900])))


def test_inputs_the_unet_itself_fails_on_are_refused_at_record():
    """An out-of-range class label: the capture's fake tensors carry no values, so the error
    shows only when the recorded graph runs; it is the U-Net's own, as a FiseditError, and the
    cache stays empty."""
    cls_name, cfg = zoo.CONFIGS["sd15-tiny"]
    unet = zoo.from_config(dict(cfg, num_class_embeds=5))
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet, batch=2)
    cache = engine.new_cache(1)
    with pytest.raises(fc.FiseditError, match="the U-Net itself fails on these inputs: "
                                              "IndexError"):
        engine.record(cache, 0, **dict(inputs, class_labels=torch.tensor([1, 9])))
    assert not cache.steps and cache.signature is None
    engine.record(cache, 0, **dict(inputs, class_labels=torch.tensor([1, 4])))
    assert list(cache.steps) == [0]


@pytest.mark.parametrize("case, message", [
    ("wrong_shape", "latent is 16x16"),
    ("image_resolution", "image-resolution mask"),
    ("not_bool", "dtype bool"),
    ("three_dims", "2-D"),
])
def test_bad_masks_are_refused(sd15_tiny, case, message):
    engine = sd15_tiny[0]
    mask = {"wrong_shape": torch.zeros(8, 8, dtype=torch.bool),
            "image_resolution": torch.zeros(128, 128, dtype=torch.bool),
            "not_bool": torch.zeros(16, 16),
            "three_dims": torch.zeros(1, 16, 16, dtype=torch.bool)}[case]
    with pytest.raises(fc.FiseditError, match=message):
        engine.plan(mask)


def test_bad_edits_are_refused_and_leave_the_cache_intact(sd15_tiny):
    engine, cache, inputs, _ = sd15_tiny
    mask = box((16, 16), 1, 1, 3, 3)
    plan = engine.plan(mask)
    assert not plan[0].dense
    before = snapshot(cache)
    unrecorded = edited(inputs, mask)
    with pytest.raises(fc.FiseditError, match="has not been recorded"):
        engine.edit(cache, 1, plan=plan, **unrecorded)
    with pytest.raises(fc.FiseditError, match="out of range"):
        engine.edit(cache, 5, plan=plan, **unrecorded)
    with pytest.raises(fc.FiseditError, match="timestep"):
        engine.edit(cache, 0, plan=plan, **dict(unrecorded, timestep=inputs["timestep"] - 1))
    other_size = zoo.example_inputs(engine.unet, height=8, width=8)
    with pytest.raises(fc.FiseditError, match="do not match the recorded generation"):
        engine.edit(cache, 0, plan=plan, **other_size)
    # The timestep as a 0-d tensor (diffusers takes both forms): the message names the input.
    with pytest.raises(fc.FiseditError, match=r"timestep is \[\] float32 on cpu where the "
                                              r"recording has \[2\] float32.*recorded form"):
        engine.edit(cache, 0, plan=plan, **dict(unrecorded, timestep=inputs["timestep"][0]))
    with pytest.raises(fc.FiseditError, match="outside the edit mask"):
        engine.edit(cache, 0, plan=plan, **edited(inputs, torch.ones(16, 16, dtype=torch.bool)))
    with pytest.raises(fc.FiseditError, match="plan="):
        engine.edit(cache, 0, **unrecorded)
    with pytest.raises(fc.FiseditError, match="new_cache"):
        engine.record(cache, 1, **zoo.example_inputs(engine.unet, batch=1))
    with pytest.raises(fc.FiseditError, match="different SparseConfig"):
        fc.compile(engine.unet).edit(cache, 0, plan=plan, **unrecorded)
    assert same_cache(cache, before)


def test_an_edit_inside_the_mask_passes_the_input_check(sd15_tiny):
    engine, cache, inputs, output = sd15_tiny
    mask = box((16, 16), 1, 1, 3, 3)
    result = engine.edit(cache, 0, plan=engine.plan(mask), **edited(inputs, mask))
    assert result.shape == output.shape


def test_compile_refuses_a_unet_whose_weights_are_on_the_meta_device():
    with torch.device("meta"):
        unet = zoo.from_config(zoo.config("sd15-tiny"))
    with pytest.raises(fc.FiseditError, match=r"weights are on the meta device \(e.g. "
                                              r"conv_in.weight\).*load them first"):
        fc.compile(unet)
    unet._hf_hook = object()        # as enable_sequential_cpu_offload leaves it
    with pytest.raises(fc.FiseditError, match=r"behind an offloading hook.*"
                                              r"pipe.remove_all_hooks\(\)"):
        fc.compile(unet)


def test_compile_refuses_a_module_that_is_not_a_unet():
    with pytest.raises(fc.FiseditError, match="not a diffusers U-Net"):
        fc.compile(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("field, value", [("group_norm", "approx"), ("self_attention", "dense"),
                                          ("tile", 0), ("dilation", -1), ("dense_threshold", 2.0)])
def test_bad_configs_are_refused(field, value):
    with pytest.raises(fc.FiseditError, match=field):
        fc.SparseConfig(**{field: value})


def test_an_identical_mask_gets_the_same_plan_back():
    engine = fc.compile(zoo.unet("sd15-tiny"))
    mask = box((16, 16), 2, 3, 8, 9)
    plan = engine.plan(mask)
    assert engine.plan(mask.clone()) is plan             # its captured graphs are reused
    other = engine.plan(box((16, 16), 2, 3, 8, 10))
    assert other is not plan and not torch.equal(other.raw, plan.raw)
    assert engine.plan(mask) is not plan                 # only the last plan is kept
    assert torch.equal(engine.plan(mask).raw, plan.raw)


# Issue 18: every bad argument is refused before any capture, and nothing is dropped silently.

def test_step_indices_of_any_integer_type_are_taken(sd15_tiny):
    engine, cache, inputs, _ = sd15_tiny
    plan = engine.plan(box((16, 16), 1, 1, 3, 3))
    expected = engine.edit(cache, 0, plan=plan, **inputs)
    for step in (np.int64(0), torch.tensor(0)):
        assert torch.equal(engine.edit(cache, step, plan=plan, **inputs), expected)
    with pytest.raises(fc.FiseditError, match="step must be an int, got float"):
        engine.edit(cache, 0.0, plan=plan, **inputs)


def test_inputs_in_another_order_are_the_same_generation(sd15_tiny):
    engine, cache, inputs, output = sd15_tiny
    reordered = dict(reversed(list(inputs.items())))
    assert list(reordered) != list(inputs)
    assert engine.signature(reordered) == engine.signature(inputs)
    programs = len(engine._programs)
    plan = engine.plan(box((16, 16), 2, 2, 6, 6))
    changed = edited(inputs, plan.raw.cpu())
    expected = engine.edit(cache, 0, plan=plan, **changed)
    assert torch.equal(engine.edit(cache, 0, plan=plan, **dict(reversed(list(changed.items())))),
                       expected)
    assert len(engine._programs) == programs, "no second program for the same inputs"


@pytest.mark.parametrize("frontend", ["export", "dynamo"])
@pytest.mark.parametrize("timestep", [500, 500.0])
def test_a_python_number_timestep_is_a_graph_input(timestep, frontend):
    # diffusers takes a number; the graph must take it as an input, not bake it in.
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet, fc.SparseConfig(frontend=frontend))
    inputs = dict(zoo.example_inputs(unet), timestep=timestep)
    cache = engine.new_cache(2)
    later = dict(inputs, timestep=type(timestep)(20))
    with torch.no_grad():
        assert relative_error(engine.record(cache, 0, **inputs), unet(**inputs)[0]) < 1e-5
        recorded = engine.record(cache, 1, **later)
        assert relative_error(recorded, unet(**later)[0]) < 1e-5
    mask = box((16, 16), 4, 4, 8, 8)
    plan = engine.plan(mask)
    changed = edited(later, mask)
    output = engine.edit(cache, 1, plan=plan, **changed)
    assert relative_error(output, fc.oracle.masked_dense(engine, plan, later, changed)) < 1e-5
    outside = ~plan[0].active
    assert torch.equal(output[..., outside], recorded[..., outside])


def test_autocast_and_inputs_that_require_grad_are_refused(sd15_tiny):
    engine, cache, inputs, _ = sd15_tiny
    before = snapshot(cache)
    plan = engine.plan(box((16, 16), 1, 1, 3, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for call in (lambda: engine.record(engine.new_cache(1), 0, **inputs),
                     lambda: engine.edit(cache, 0, plan, **inputs),
                     lambda: engine.dense(**inputs)):
            with pytest.raises(fc.FiseditError, match=r"torch.autocast is on for cpu.*convert "
                                                      r"the U-Net and its inputs instead"):
                call()
    needs_grad = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"]
                      .clone().requires_grad_())
    with pytest.raises(fc.FiseditError, match=r"U-Net input\(s\) encoder_hidden_states "
                                              r"require grad"):
        engine.edit(cache, 0, plan, **needs_grad)
    assert same_cache(cache, before)


@pytest.mark.parametrize("extra, message", [
    ({"foo": 1}, "unknown U-Net input"),
    ({"cross_attention_kwargs": {"scale": 0.5}}, r"cross_attention_kwargs \['scale'\].*"
                                                 r"fuse_lora.*torch.compile backend"),
    ({"cross_attention_kwargs": {"gligen": {"boxes": torch.zeros(2, 1, 4)}}},
     r"cross_attention_kwargs \['gligen'\]: GLIGEN's grounding boxes and embeddings are not "
     r"inputs of the engine's captured graphs.*torch.compile backend"),
    ({"return_dict": True}, "return_dict"),
    ({"class_labels": "cat"}, "class_labels must be a tensor"),
    ({"class_labels": torch.tensor([1, 2])}, "no class embedding .* would be ignored"),
    ({"mid_block_additional_residual": torch.randn(2, 64, 4, 4)},
     "mid_block_additional_residual was given without down_block_additional_residuals, so "
     "diffusers would ignore it"),
    ({"timestep_cond": torch.randn(2, 32)}, "has no time_cond_proj_dim .* drop timestep_cond"),
    ({"down_block_additional_residuals": (torch.randn(2, 32, 16, 16),)},
     "deprecated T2I-Adapter form, which needs a list.*down_intrablock_additional_residuals"),
    ({"encoder_attention_mask": torch.ones(2, 5)},
     r"encoder_attention_mask has shape \(2, 5\) but the text states are \(2, 77, 32\); "
     r"pass one row per text state over its tokens, shape \[2, 77\]"),
    ({"encoder_attention_mask": torch.ones(1, 77)}, r"encoder_attention_mask has shape \(1, 77\)"),
])
def test_stray_keywords_are_refused_not_ignored(sd15_tiny, extra, message):
    engine, cache, inputs, _ = sd15_tiny
    plan = engine.plan(box((16, 16), 1, 1, 3, 3))
    with pytest.raises(fc.FiseditError, match=message):
        engine.edit(cache, 0, plan=plan, **dict(inputs, **extra))
    with pytest.raises(fc.FiseditError, match=message):
        engine.record(engine.new_cache(1), 0, **dict(inputs, **extra))


def test_empty_cross_attention_kwargs_ask_for_nothing(sd15_tiny):
    engine, cache, inputs, recorded = sd15_tiny
    mask = box((16, 16), 1, 1, 3, 3)
    plan = engine.plan(mask)
    changed = edited(inputs, mask)
    assert torch.equal(engine.edit(cache, 0, plan=plan, cross_attention_kwargs={}, **changed),
                       engine.edit(cache, 0, plan=plan, **changed))


def test_missing_and_misplaced_inputs_are_refused_before_capture(sd15_tiny):
    engine = sd15_tiny[0]
    traces = dict(engine._traces)
    with pytest.raises(fc.FiseditError, match="missing U-Net input.*encoder_hidden_states"):
        engine.record(engine.new_cache(1), 0, sample=torch.zeros(2, 4, 16, 16), timestep=1)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v
            for k, v in zoo.example_inputs(engine.unet).items()}
    with pytest.raises(fc.FiseditError, match="sample is on the meta device, which holds "
                                              "shapes but no values"):
        engine.record(engine.new_cache(1), 0, **meta)
    assert engine._traces == traces                      # nothing was captured


def test_non_finite_inputs_are_refused_before_any_work(sd15_tiny):
    """NaN or infinite noise, text states or timesteps: refused at a generation's first
    recorded step before capture, at an edit pass's first step, and a later recorded step's
    timestep (read on the host anyway); the cache is left as it was."""
    engine, cache, inputs, _ = sd15_tiny
    traces = dict(engine._traces)
    fresh = zoo.example_inputs(engine.unet, height=24, width=24)     # a signature not compiled
    sample = fresh["sample"].clone()
    sample[0, 0, 0, 0] = float("nan")
    with pytest.raises(fc.FiseditError, match="input.*sample hold NaN or infinite values"):
        engine.record(engine.new_cache(1), 0, **dict(fresh, sample=sample))
    with pytest.raises(fc.FiseditError, match="the timestep is nan, not finite"):
        engine.record(engine.new_cache(1), 0, **dict(fresh, timestep=float("nan")))
    assert engine._traces == traces                      # nothing was captured
    before = snapshot(cache)
    text = inputs["encoder_hidden_states"].clone()
    text[1, 2, 3] = float("inf")
    mask = box((16, 16), 1, 1, 3, 3)
    with pytest.raises(fc.FiseditError, match="encoder_hidden_states hold NaN or infinite"):
        engine.edit(cache, 0, plan=engine.plan(mask),
                    **dict(edited(inputs, mask), encoder_hidden_states=text))
    two = engine.new_cache(2)
    engine.record(two, 0, **inputs)
    with pytest.raises(fc.FiseditError, match=r"the timestep is \[nan, nan\], not finite"):
        engine.record(two, 1, **dict(inputs, timestep=torch.full((2,), float("nan"))))
    assert 1 not in two.steps and same_cache(cache, before)
    # Step 0 recorded again into a cache that holds a generation starts a new one: checked too.
    kept = snapshot(two)
    noisy = inputs["sample"].clone()
    noisy[1, 0, 2, 2] = float("nan")
    with pytest.raises(fc.FiseditError, match="input.*sample hold NaN or infinite values"):
        engine.record(two, 0, **dict(inputs, sample=noisy))
    assert same_cache(two, kept)


def test_an_attention_mask_may_exclude_with_minus_infinity_but_not_hold_nan():
    """An additive attention mask holds -inf where it excludes keys; NaN or +inf in it would
    make the attention's output NaN, so they are refused like any input's."""
    from fisedit_compiler.engine.engine import check_finite_inputs

    bias = torch.zeros(2, 77)
    bias[:, 70:] = float("-inf")
    check_finite_inputs({"sample": torch.zeros(2), "encoder_attention_mask": bias})
    for bad in (float("nan"), float("inf")):
        poisoned = bias.clone()
        poisoned[0, 3] = bad
        with pytest.raises(fc.FiseditError, match="encoder_attention_mask hold NaN or infinite"):
            check_finite_inputs({"sample": torch.zeros(2), "encoder_attention_mask": poisoned})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_against_the_cache_are_refused_before_compiling(sd15_tiny, dtype):
    engine, cache, inputs, _ = sd15_tiny
    plan = engine.plan(box((16, 16), 1, 1, 3, 3))
    cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}
    programs = dict(engine._programs)
    # Inputs of another dtype than the U-Net's weights: refused as such, whatever the cache.
    message = (rf"sample is {str(dtype)[6:]} but the U-Net's weights are float32; convert it "
               r"with .to\(torch.float32\)")
    with pytest.raises(fc.FiseditError, match=message):
        engine.edit(cache, 0, plan=plan, **cast)
    with pytest.raises(fc.FiseditError, match=message):
        engine.record(cache, 1, **cast)
    assert engine._programs == programs                  # no program built for the new dtype


def test_a_cache_of_another_engine_is_refused(sd15_tiny):
    """Same config, other weights: the values in the cache are another U-Net's."""
    engine, cache, inputs, _ = sd15_tiny
    other = fc.compile(zoo.unet("sd15-tiny", seed=1), engine.config)
    with pytest.raises(fc.FiseditError, match="made by another engine"):
        other.edit(cache, 0, plan=engine.plan(box((16, 16), 1, 1, 3, 3)), **inputs)
    with pytest.raises(fc.FiseditError, match="made by another engine"):
        other.record(cache, 1, **inputs)


def test_a_recording_made_with_other_weights_is_refused():
    """Weights changed in place after recording (a LoRA loaded or fused): the recorded values
    no longer match what an edit would compute, so the edit and a further step's record are
    refused, the cache left as it was; recorded again, edits run on the current weights."""
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet)
    cache = engine.new_cache(2)
    engine.record(cache, 0, **inputs)
    mask = box((16, 16), 1, 1, 3, 3)
    plan = engine.plan(mask)
    engine.edit(cache, 0, plan=plan, **edited(inputs, mask))
    before = snapshot(cache)
    with torch.no_grad():
        unet.mid_block.resnets[0].conv1.weight.mul_(1.1)
    with pytest.raises(fc.FiseditError, match="weights were written in place after this "
                                              "generation.*for the backend a new fc.recording"):
        engine.edit(cache, 0, plan=plan, **edited(inputs, mask))
    with pytest.raises(fc.FiseditError, match="weights changed in place since this generation"):
        engine.record(cache, 1, **inputs)
    assert same_cache(cache, before) and 1 not in cache.steps
    again = engine.new_cache(1)
    engine.record(again, 0, **inputs)
    result = engine.edit(again, 0, plan=plan, **edited(inputs, mask))
    fresh = fc.compile(unet)
    fresh_cache = fresh.new_cache(1)
    fresh.record(fresh_cache, 0, **inputs)
    torch.testing.assert_close(result, fresh.edit(fresh_cache, 0, plan=fresh.plan(mask),
                                                  **edited(inputs, mask)), rtol=0, atol=0)


@pytest.mark.parametrize("write", [
    lambda weight: weight.data.add_(0.01),                       # PEFT's unsafe merge
    lambda weight: weight.data.copy_(weight.detach() * 1.5),     # an EMA model's copy_to
])
def test_weights_written_through_data_refuse_the_recording_and_a_new_one_uses_them(write):
    """A write through param.data moves no version counter; the weights' values, compared at
    an edit pass's first step (``content_fingerprint``), still tell the recording is of other
    weights: the edit (sparse or full-mask) is refused and the cache left as it was. A new
    generation's recording makes the derived copies (grouped projections, packed conv
    weights) again, so its edits are those of the U-Net as it is; written back, the old
    recording edits again as it did."""
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet)
    mask = box((16, 16), 1, 1, 5, 5)
    cache = engine.new_cache(1)
    engine.record(cache, 0, **inputs)
    plan = engine.plan(mask)
    expected = engine.edit(cache, 0, plan=plan, **edited(inputs, mask))    # copies made
    before = snapshot(cache)
    weights = [unet.mid_block.resnets[0].conv1.weight,
               unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight]
    saved = [weight.detach().clone() for weight in weights]
    for weight in weights:
        write(weight)
    try:
        for edit_plan in (plan, engine.plan(torch.ones(16, 16, dtype=torch.bool))):
            with pytest.raises(fc.FiseditError, match=r"written after this generation was "
                                                      r"recorded, through param\.data"):
                engine.edit(cache, 0, plan=edit_plan, **edited(inputs, mask))
        assert same_cache(cache, before)
        again = engine.new_cache(1)
        engine.record(again, 0, **inputs)
        result = engine.edit(again, 0, plan=plan, **edited(inputs, mask))
        fresh = fc.compile(unet)
        fresh_cache = fresh.new_cache(1)
        fresh.record(fresh_cache, 0, **inputs)
        assert torch.equal(result, fresh.edit(fresh_cache, 0, plan=fresh.plan(mask),
                                              **edited(inputs, mask)))
    finally:
        for weight, value in zip(weights, saved):
            weight.data.copy_(value)
    assert torch.equal(engine.edit(cache, 0, plan=plan, **edited(inputs, mask)), expected)


def test_a_plan_with_other_tiles_names_them(sd15_tiny):
    engine, cache, inputs, _ = sd15_tiny
    other = engine.with_config(fc.SparseConfig(tile=2, check_inputs=True))
    with pytest.raises(fc.FiseditError, match=r"with tiles \[2, 2\].*with tiles \[4, 2\]"):
        engine.edit(cache, 0, plan=other.plan(box((16, 16), 1, 1, 3, 3)), **inputs)


@pytest.mark.parametrize("call, message", [
    (lambda e: e.new_cache(2, "1000"), "device_budget_bytes must be an int"),
    (lambda e: e.new_cache(2.0), "num_steps must be an int"),
    (lambda e: e.new_cache(0), "num_steps 0 is out of range"),
    (lambda e: e.plan(torch.zeros(16, 16, dtype=torch.bool, device="meta")), "meta device"),
    (lambda e: e.plan(torch.ones(16, 16, dtype=torch.bool).to_sparse()),
     r"layout sparse_coo; pass a dense tensor \(mask.to_dense\(\)\)"),
    (lambda e: fc.compile(e.unet, {"dilation": 1}), r"SparseConfig\(\*\*config\)"),
    # None would silently mean the defaults, dropping the engine's own settings.
    (lambda e: e.with_config(None), r"with_config needs a SparseConfig, got None; for the "
                                    r"defaults pass fc.SparseConfig\(\)"),
    (lambda e: e.with_config({"tile": 2}), r"from a dict: fc.SparseConfig\(\*\*config\)"),
    (lambda e: e.refresh_weights("x"), "refresh_weights' fingerprint must be the weights' "
                                       r"content_fingerprint \(a tuple\) or None, got str"),
    # A list has no .bool(): the hint says how to get a tensor first.
    (lambda e: e.plan([[0, 1], [1, 0]]), r"got torch.int64 \(made from the list given\).*"
                                         r"after torch.as_tensor\(mask\)"),
])
def test_bad_engine_arguments_are_refused(sd15_tiny, call, message):
    with pytest.raises(fc.FiseditError, match=message):
        call(sd15_tiny[0])


def test_captured_steps_of_cpu_inputs_are_refused(sd15_tiny):
    engine, _, inputs, _ = sd15_tiny
    with pytest.raises(fc.FiseditError, match="the CUDA-graph path, but the inputs are on cpu"):
        engine.captured_steps(**inputs)


def test_a_unet_in_training_mode_with_dropout_is_refused_with_eval_as_the_fix():
    unet = zoo.from_config(dict(zoo.CONFIGS["sd15-tiny"][1], dropout=0.1)).train()
    engine = fc.compile(unet)
    with pytest.raises(fc.FiseditError, match=r"draws random numbers \(aten.dropout.* call "
                                              r"\.eval\(\) before compiling"):
        engine.program(zoo.example_inputs(unet))
    # Dropout with p = 0 (diffusers' default) draws nothing: training mode compiles.
    plain = zoo.unet("sd15-tiny").train()
    inputs = zoo.example_inputs(plain)
    engine = fc.compile(plain)
    with torch.no_grad():
        recorded = engine.record(engine.new_cache(1), 0, **inputs)
        assert relative_error(recorded, plain(**inputs)[0]) < 1e-5


class _Noisy(torch.nn.Module):
    """A block that adds noise drawn inside the U-Net (a user's augmentation)."""

    def __init__(self, block, generator: bool):
        super().__init__()
        self.block, self.generator = block, generator

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        if self.generator:
            noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        else:
            noise = torch.randn_like(out)
        return out + 0.1 * noise


@pytest.mark.parametrize("generator", [False, True], ids=["randn_like", "seeded-generator"])
def test_a_unet_that_draws_random_numbers_is_refused_naming_the_module(generator):
    """An edit cannot draw the recording's numbers again: refused, not computed wrong."""
    unet = zoo.unet("sd15-tiny")
    unet.mid_block.resnets[0] = _Noisy(unet.mid_block.resnets[0], generator)
    engine = fc.compile(unet)
    with pytest.raises(fc.FiseditError, match=r"draws random numbers \(aten.randn.* in module "
                                              r"'mid_block.resnets.0'.*outside the U-Net"):
        engine.record(engine.new_cache(1), 0, **zoo.example_inputs(unet))


@pytest.mark.parametrize("mask, bucketed, message", [
    (None, None, "bool tensor or array of shape .*got NoneType"),
    ("mask.png", None, "load_mask_png"),
    ("image", None, r"got Image; read an image with fisedit_compiler.execution.plan."
                    r"image_mask\(image\)"),
    (box((16, 16), 1, 1, 3, 3), "no", "bucketed must be True or False, got str 'no'"),
    (box((16, 16), 1, 1, 3, 3), 1, "bucketed must be True or False, got int"),
])
def test_plan_refuses_what_is_no_mask_and_a_bucketed_that_is_no_flag(sd15_tiny, mask, bucketed,
                                                                    message):
    from PIL import Image

    engine = sd15_tiny[0]
    if isinstance(mask, str) and mask == "image":
        mask = Image.fromarray(box((16, 16), 1, 1, 3, 3).numpy())
    programs = dict(engine._programs)
    with pytest.raises(fc.FiseditError, match=message):
        engine.plan(mask, bucketed=bucketed)
    assert engine._programs == programs


def test_plan_before_any_record_refuses_an_image_resolution_mask():
    """Nothing compiled yet: a mask at a whole multiple of the configured latent (128x128 for
    sd15-tiny's 16x16) is the image's, refused before the U-Net is compiled at that size."""
    engine = fc.compile(zoo.unet("sd15-tiny"))
    for side in (128, 32):
        with pytest.raises(fc.FiseditError, match=f"image-resolution mask.*downsample it to "
                                                  f"16x16.*{side}x{side} latent, record it first"):
            engine.plan(torch.zeros(side, side, dtype=torch.bool))
    assert engine._programs == {} and engine._traces == {}


def test_wrong_input_shapes_are_refused_before_capture(sd15_tiny):
    engine, cache, inputs, output = sd15_tiny
    before, traces = snapshot(cache), dict(engine._traces)
    wide = dict(inputs, encoder_hidden_states=torch.randn(2, 77, 64))
    with pytest.raises(fc.FiseditError, match=r"encoder_hidden_states has shape \(2, 77, 64\) "
                                              r"but .* last dimension of 32 \(config.cross_"):
        engine.record(cache, 1, **wide)
    with pytest.raises(fc.FiseditError, match="last dimension of 32"):
        engine.dense(**wide)
    with pytest.raises(fc.FiseditError, match=r"sample has shape \(2, 3, 16, 16\) but this "
                                              r"U-Net takes \[batch, 4, height, width\]"):
        engine.record(cache, 1, **dict(inputs, sample=inputs["sample"][:, :3]))
    with pytest.raises(fc.FiseditError, match=r"sample has shape \(4, 16, 16\)"):
        engine.dense(**dict(inputs, sample=inputs["sample"][0]))
    assert engine._traces == traces and same_cache(cache, before) and 1 not in cache.steps
    assert torch.equal(engine.record(engine.new_cache(1), 0, **inputs), output)


@pytest.mark.parametrize("changes, width, other", [
    # encoder_hid_proj (DeepFloyd IF's text_proj) reads the states at encoder_hid_dim.
    (dict(encoder_hid_dim=24), 24, 32),
    # One cross_attention_dim per block, all the same: that one.
    (dict(cross_attention_dim=(32, 32)), 32, 24),
    # image_proj (Kandinsky 2.2) replaces the states with the image embeddings: any width.
    (dict(encoder_hid_dim=24, encoder_hid_dim_type="image_proj",
          addition_embed_type="image"), None, None),
])
def test_the_text_width_is_the_one_the_config_reads(changes, width, other):
    unet = zoo.from_config(dict(zoo.CONFIGS["sd15-tiny"][1], **changes))
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(zoo.unet("sd15-tiny"), seed=0, text_length=7)
    if "image_proj" in changes.values():
        inputs["added_cond_kwargs"] = {"image_embeds": torch.randn(2, 24)}
        for any_width in (5, 32):
            states = torch.randn(2, 7, any_width)
            with torch.no_grad():
                expected = unet(**dict(inputs, encoder_hidden_states=states))[0]
            assert torch.equal(engine.dense(**dict(inputs, encoder_hidden_states=states)),
                               expected)
        return
    with pytest.raises(fc.FiseditError, match=f"last dimension of {width}"):
        engine.dense(**dict(inputs, encoder_hidden_states=torch.randn(2, 7, other)))
    right = dict(inputs, encoder_hidden_states=torch.randn(2, 7, width))
    with torch.no_grad():
        assert torch.equal(engine.dense(**right), unet(**right)[0])


def test_added_cond_kwargs_keys_the_unet_does_not_read_are_refused():
    unet = zoo.unet("sdxl-tiny")
    engine = fc.compile(unet)
    inputs = zoo.example_inputs(unet)
    conditions = inputs["added_cond_kwargs"]
    cache = engine.new_cache(1)
    typo = dict(inputs, added_cond_kwargs=dict(conditions, time_id=conditions["time_ids"]))
    with pytest.raises(fc.FiseditError, match=r"key\(s\) 'time_id' that this U-Net does not "
                                              r"read \(with addition_embed_type='text_time' "
                                              r"it reads text_embeds, time_ids\)"):
        engine.record(cache, 0, **typo)
    # Flattened, as the backend passes them.
    flat = dict(flatten_inputs(inputs), added_cond_kwargs_time_id=conditions["time_ids"])
    with pytest.raises(fc.FiseditError, match="'time_id'"):
        engine.record(cache, 0, **flat)
    assert not cache.steps and engine._programs == {}
    sd15 = fc.compile(zoo.unet("sd15-tiny"))
    with pytest.raises(fc.FiseditError, match="with addition_embed_type=None it reads none"):
        sd15.dense(**dict(zoo.example_inputs(sd15.unet), added_cond_kwargs=conditions))
    with pytest.raises(fc.FiseditError, match="added_cond_kwargs must be a dict"):
        engine.dense(**dict(inputs, added_cond_kwargs=[conditions["time_ids"]]))


def test_prepare_checks_its_inputs_against_the_cache(sd15_tiny):
    engine, cache, inputs, _ = sd15_tiny
    before, programs = snapshot(cache), dict(engine._programs)
    batch1 = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with pytest.raises(fc.FiseditError, match=r"do not match the recorded generation: .*sample "
                                              r"is \[1, 4, 16, 16\] float32 on cpu where the "
                                              r"recording has \[2, 4, 16, 16\]"):
        engine.prepare(cache, 0, **batch1)
    with pytest.raises(fc.FiseditError, match=r"step 1 has not been recorded \(recorded steps: "
                                              r"\[0\]\)"):
        engine.prepare(cache, 1, **inputs)
    assert engine._programs == programs and same_cache(cache, before)
    assert engine.prepare(cache, 0, **inputs)["graphs_captured"] == 0      # cpu: nothing
    assert same_cache(cache, before)


def test_the_oracle_checks_its_arguments_before_computing(sd15_tiny, monkeypatch):
    engine, _, inputs, _ = sd15_tiny
    mask = box((16, 16), 1, 1, 3, 3)
    plan = engine.plan(mask)
    new = edited(inputs, mask)
    expected = fc.oracle.masked_dense(engine, plan, inputs, new)

    def computing(*args):
        raise AssertionError("the oracle computed before refusing its arguments")

    monkeypatch.setattr(fc.oracle._Recorder, "run_all", computing)
    cases = [
        ((mask, inputs, new), "needs plan=engine.plan\\(mask\\), a MaskPlan, got Tensor"),
        ((plan, inputs, {k: v for k, v in new.items() if k != "timestep"}),
         "missing U-Net input.*timestep"),
        ((plan, inputs, {k: v[:1] if isinstance(v, torch.Tensor) else v
                         for k, v in new.items()}),
         r"edited inputs do not match the original inputs: sample is \[1, 4, 16, 16\] float32 "
         r"on cpu where the original has \[2, 4, 16, 16\]"),
        ((engine.with_config(fc.SparseConfig(tile=2)).plan(mask), inputs, new),
         r"with tiles \[2, 2\].*with tiles \[4, 2\]"),
    ]
    for args, message in cases:
        with pytest.raises(fc.FiseditError, match=message):
            fc.oracle.masked_dense(engine, *args)
    with pytest.raises(fc.FiseditError, match="needs the engine the plan was made with .*got "
                                              "UNet2DConditionModel"):
        fc.oracle.masked_dense(engine.unet, plan, inputs, new)
    with pytest.raises(fc.FiseditError, match="original_inputs must be a dict .* got NoneType"):
        fc.oracle.masked_dense(engine, plan, None, new)
    with pytest.raises(fc.FiseditError, match="edited_inputs must be a dict .* got list"):
        fc.oracle.masked_dense(engine, plan, inputs, [new])
    monkeypatch.undo()
    reordered = {name: new[name] for name in reversed(list(new))}    # inputs go by name
    assert torch.equal(fc.oracle.masked_dense(engine, plan, inputs, reordered), expected)


@pytest.mark.parametrize("case, message", [
    ("half", r"sample is float16 but the U-Net's weights are float32; convert it with "
             r"\.to\(torch\.float32\)"),
    ("long_sample", r"sample is int64 but the U-Net's weights are float32"),
    ("double_states", r"encoder_hidden_states is float64 but the U-Net's weights are float32; "
                      r"convert it with \.to\(torch\.float32\)"),
    ("states_batch_1", r"encoder_hidden_states has a batch of 1 but the sample has 2; pass one "
                       r"row of text states per latent"),
    ("states_batch_3", r"encoder_hidden_states has a batch of 3 but the sample has 2"),
    ("three_timesteps", r"timestep has shape \(3,\) but the sample's batch is 2; pass one "
                        r"timestep .* or one per latent \(shape \[2\]\)"),
    ("timestep_2d", r"timestep has shape \(2, 2\)"),
    ("complex_timestep", r"timestep is complex64; pass a real timestep"),
    ("bool_timestep", r"timestep is bool; pass a real timestep"),
    ("empty_batch", r"sample has an empty batch .*; pass at least one latent"),
])
def test_inputs_of_the_wrong_dtype_or_batch_are_refused_before_capture(sd15_tiny, case,
                                                                       message):
    engine, cache, inputs, output = sd15_tiny
    states = inputs["encoder_hidden_states"]
    bad = {"half": {k: v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                    for k, v in inputs.items()},
           "long_sample": dict(inputs, sample=inputs["sample"].long()),
           "double_states": dict(inputs, encoder_hidden_states=states.double()),
           "states_batch_1": dict(inputs, encoder_hidden_states=states[:1]),
           "states_batch_3": dict(inputs, encoder_hidden_states=states[[0, 1, 1]]),
           "three_timesteps": dict(inputs, timestep=torch.tensor([1.0, 2.0, 3.0])),
           "timestep_2d": dict(inputs, timestep=torch.ones(2, 2)),
           "complex_timestep": dict(inputs, timestep=torch.full((2,), 500 + 3j)),
           "bool_timestep": dict(inputs, timestep=torch.ones(2, dtype=torch.bool)),
           "empty_batch": dict(inputs, sample=inputs["sample"][:0], encoder_hidden_states=
                               states[:0], timestep=inputs["timestep"][:0])}[case]
    before, traces = snapshot(cache), dict(engine._traces)
    fresh = fc.compile(engine.unet)
    for call in (lambda: engine.record(cache, 1, **bad), lambda: engine.dense(**bad),
                 lambda: fresh.record(fresh.new_cache(1), 0, **bad)):
        with pytest.raises(fc.FiseditError, match=message):
            call()
    assert engine._traces == traces and fresh._traces == {}
    assert same_cache(cache, before) and 1 not in cache.steps


def test_inputs_of_a_lower_precision_than_a_double_unet_are_refused():
    unet = zoo.unet("sd15-tiny", dtype=torch.float64)
    engine = fc.compile(unet)
    inputs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in zoo.example_inputs(unet).items()}
    with pytest.raises(fc.FiseditError, match=r"sample is float32 but the U-Net's weights are "
                                              r"float64; convert it with \.to\(torch\.float64\)"):
        engine.record(engine.new_cache(1), 0, **inputs)
    assert engine._traces == {}


def test_inputs_the_unet_itself_fails_on_are_told_as_such(sd15_tiny):
    """Inputs no check knows (ControlNet residuals of the wrong size) fail capture: the error
    says the U-Net itself fails, with its own error as the cause, not export's."""
    engine, cache, inputs, _ = sd15_tiny
    bad = dict(inputs, mid_block_additional_residual=torch.zeros(2, 3, 5, 5),
               down_block_additional_residuals=[torch.zeros(2, 32, 16, 16)] * 6)
    before, programs = snapshot(cache), dict(engine._programs)
    fresh = fc.compile(engine.unet)
    with pytest.raises(fc.FiseditError, match=r"the U-Net itself fails on these inputs: "
                                              r"RuntimeError: The size of tensor a") as error:
        fresh.record(fresh.new_cache(1), 0, **bad)
    assert isinstance(error.value.__cause__, RuntimeError)
    assert "attention_mask" not in str(error.value)
    assert fresh._traces == {} and fresh._programs == {}
    assert same_cache(cache, before) and engine._programs == programs
    # A mask over the text tokens passed as attention_mask (diffusers' self-attention mask
    # over the image tokens): the U-Net's own error, and the likely mix-up named.
    text_mask = torch.ones(2, inputs["encoder_hidden_states"].shape[1])
    with pytest.raises(fc.FiseditError, match=r"itself fails.*not the text tokens: a mask "
                                              r"over the text tokens is encoder_attention_mask"):
        fresh.record(fresh.new_cache(1), 0, **inputs, attention_mask=text_mask)
    assert fresh._programs == {}


def test_stats_refuses_a_plan_of_another_engine(sd15_tiny):
    engine = sd15_tiny[0]
    other = engine.with_config(fc.SparseConfig(tile=1, dilation=0, check_inputs=True))
    mask = box((16, 16), 2, 2, 4, 4)
    with pytest.raises(fc.FiseditError, match=r"the plan was made for levels .* with tiles "
                                              r"\[1, 1\].*engine.plan\(mask\)"):
        engine.stats(other.plan(mask))
    with pytest.raises(fc.FiseditError, match="stats needs plan=engine.plan"):
        engine.stats(mask)
    assert engine.stats(engine.plan(mask))["sparse_macs"] > 0


@pytest.mark.parametrize("has_triton, interpret, why", [
    (True, False, r"Triton runs on CUDA devices, and on the CPU only under TRITON_INTERPRET=1"),
    (False, True, r"triton is not installed"),
])
def test_triton_kernels_where_triton_cannot_run_are_refused(monkeypatch, has_triton, interpret,
                                                           why):
    """An explicit kernels="triton" is not quietly replaced by the torch reference."""
    from fisedit_compiler import config as config_module
    from fisedit_compiler.compiler import pipeline

    monkeypatch.setattr(config_module, "HAS_TRITON", has_triton)
    monkeypatch.setattr(config_module, "INTERPRET", interpret)
    unet = zoo.unet("sd15-tiny")
    message = (rf"kernels='triton'.* cannot run on cpu: {why}.*use kernels='auto' .* or "
               r"kernels='torch'")
    with pytest.raises(fc.FiseditError, match=message):
        fc.compile(unet, fc.SparseConfig(kernels="triton"))
    with pytest.raises(fc.FiseditError, match=message):      # the backend's path
        pipeline.check_kernels(fc.SparseConfig(kernels="triton"), "cpu")
    assert not pipeline.check_kernels(fc.SparseConfig(kernels="auto"), "cpu")
    fc.compile(unet, fc.SparseConfig(kernels="auto"))


def test_a_forward_with_var_keywords_takes_the_keywords_it_passes_on():
    """A subclass whose forward passes ``**kwargs`` on to diffusers' forward takes them (the
    names are the parent's, not in the subclass's signature), and still meets the oracle."""
    from diffusers import UNet2DConditionModel

    class Halved(UNet2DConditionModel):
        def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
            return super().forward(sample * 0.5, timestep, encoder_hidden_states, **kwargs)

    torch.manual_seed(0)
    unet = Halved(**zoo.config("sd15-tiny")).eval()
    inputs = dict(zoo.example_inputs(unet, batch=2), cross_attention_kwargs=None)
    engine = fc.compile(unet)
    cache = engine.new_cache(1)
    recorded = engine.record(cache, 0, **inputs)
    with torch.no_grad():
        assert (recorded - unet(**inputs)[0]).abs().max() <= 1e-5
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:6, 9:12] = True
    plan = engine.plan(mask)
    edited = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"] + 0.1)
    result = engine.edit(cache, 0, plan=plan, **edited)
    expected = fc.oracle.masked_dense(engine, plan, inputs, edited)
    assert (result - expected).abs().max() <= 1e-5 * expected.abs().max()
