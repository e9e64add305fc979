"""EditSession: exact background, oracle-exact sparse calls, masks, continuous edits, errors."""

import copy
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import zoo
from fisedit_compiler.edit_flow import EditSession
from fisedit_compiler.edit_flow import mask as tac
from fisedit_compiler.edit_flow.session import (_check_first_timestep_once, contrast_batch,
                                               plan_note)
from fisedit_compiler.errors import FiseditError

STEPS = 6
PROBE = 2


def _corner_mask(size=16):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[0:3, 0:3] = True
    return mask


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15-tiny")
    zoo.pipeline("sd15-tiny", path=folder)          # built and saved
    return folder


@pytest.fixture(scope="module")
def pipe(pipe_folder):
    loaded = zoo.pipeline(None, path=pipe_folder)    # loaded as a user would
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def session(pipe):
    s = EditSession(pipe)
    s.generate("a red circle", seed=0, num_inference_steps=STEPS, output_type="np")
    return s


def _outside_equal(result, reference_latents):
    """The final latents equal the reference outside the edit's region (its dilated mask),
    which a plan's whole tiles reach past."""
    outside = ~result.region
    return torch.equal(result.latents[..., outside], reference_latents[..., outside])


def _outside_pixels(result, scale=8):
    """bool [H, W]: pixels outside the edit's region (its dilated mask, nearest upsampling)."""
    region = result.region.cpu().numpy()
    return ~np.kron(region, np.ones((scale, scale), dtype=bool))


def test_user_mask_background_and_oracle(session, monkeypatch):
    calls = []
    edit = session.engine.edit

    def spy(cache, step, plan, **inputs):
        output = edit(cache, step, plan, **inputs)
        calls.append((step, plan, dict(inputs, sample=inputs["sample"].clone()), output.clone()))
        return output

    monkeypatch.setattr(session.engine, "edit", spy)
    result = session.edit("a blue circle", mask=_corner_mask(), probe_steps=PROBE,
                          output_type="np")
    assert [c[0] for c in calls] == list(range(PROBE, STEPS))
    assert not result.plan.levels[0].dense
    assert _outside_equal(result, session.original.latents[-1])
    assert not torch.equal(result.latents, session.original.latents[-1])
    assert torch.equal(result.mask, _corner_mask())
    step, plan, inputs, output = calls[-1]
    expected = fc.oracle.masked_dense(session.engine, plan, session.original.unet_inputs[step],
                                      inputs)
    expected = expected[0] if isinstance(expected, (tuple, list)) else expected
    assert ((output - expected).norm() / expected.norm()).item() <= 1e-5
    report = result.report
    assert report["mask_source"] == "user" and report["probe_steps"] == PROBE
    assert report["macs"]["unet_call"]["sparse_macs"] < report["macs"]["unet_call"]["dense_macs"]
    assert 0 < report["mask_area_fraction"] <= report["active_area_fraction"] < 1
    timings = report["timings_s"]
    assert 0 < timings["first_sparse_step_s"] <= timings["sparse_s"] <= timings["edit_s"]
    phases = ("checks_s", "probe_s", "sparse_s", "composite_s")
    assert sum(timings[phase] for phase in phases) == pytest.approx(timings["edit_s"])
    assert result.images.shape == (1, 128, 128, 3)


def test_edit_s_counts_the_checks_before_the_run(session, monkeypatch):
    """The report times the edit call from its entry: the argument and weight checks before
    the pipeline runs are in edit_s (checks_s), not left out of it."""
    import fisedit_compiler.edit_flow.session as session_module

    slow = 0.05
    check = session_module._check_output_type

    def slow_check(output_type):
        time.sleep(slow)
        return check(output_type)

    monkeypatch.setattr(session_module, "_check_output_type", slow_check)
    began = time.perf_counter()
    result = session.edit("a blue circle", mask=_corner_mask(), probe_steps=0,
                          output_type="latent")
    wall = time.perf_counter() - began
    timings = result.report["timings_s"]
    assert slow <= timings["checks_s"] < timings["edit_s"] <= wall


def test_generate_captures_the_vae_read_the_first_edit_repeats(pipe, monkeypatch):
    """generate prepares its VAE reader (on a GPU: the read's CUDA graph, which the first
    edit's check would otherwise capture); a pipeline without a VAE has none to prepare."""
    from fisedit_compiler.execution.derived_weights import WeightFingerprint

    prepared = []
    monkeypatch.setattr(WeightFingerprint, "prepare", lambda self: prepared.append(self))
    session = EditSession(pipe)
    session.generate("a red circle", seed=0, num_inference_steps=2, output_type="latent")
    assert prepared == [session._decoder_values]
    assert prepared[0].tensors[0] is next(pipe.vae.parameters())
    monkeypatch.setattr(pipe, "vae", None)
    session.generate("a red circle", seed=0, num_inference_steps=2, output_type="latent")
    assert len(prepared) == 1


def test_user_mask_without_probe(session):
    result = session.edit("a blue circle", mask=_corner_mask(), probe_steps=0, output_type="np")
    assert result.report["sparse_steps"] == STEPS
    assert _outside_equal(result, session.original.latents[-1])


@pytest.mark.parametrize("estimator", list(tac.ESTIMATORS))
def test_auto_mask_and_intersect(session, estimator):
    auto = session.edit("a blue circle", probe_steps=3, mask_estimator=estimator,
                        output_type="np")
    assert auto.mask.dtype == torch.bool and auto.mask.shape == (16, 16)
    assert auto.report["mask_source"] == "auto"
    assert auto.report["mask_estimator"] == estimator
    assert _outside_equal(auto, session.original.latents[-1])
    both = session.edit("a blue circle", mask=_corner_mask(), probe_steps=3,
                        mask_estimator=estimator, mask_mode="intersect", output_type="np")
    assert torch.equal(both.mask, auto.mask & _corner_mask())
    assert _outside_equal(both, session.original.latents[-1])


def test_an_intersection_that_marks_nothing_is_warned_about():
    from fisedit_compiler import shapes

    s = EditSession(zoo.pipeline("shapes"))
    s.generate(shapes.DEMO_PROMPT, seed=0, num_inference_steps=STEPS, output_type="latent")
    auto = s.edit(shapes.DEMO_EDIT, output_type="latent")       # the circle at the centre
    corner = torch.zeros_like(auto.mask)
    corner[-2:, -2:] = True                                     # the empty bottom right
    assert auto.mask.any() and not (auto.mask & corner).any()
    with pytest.warns(UserWarning, match="share no latent pixel.*mask_mode='replace'"):
        both = s.edit(shapes.DEMO_EDIT, mask=corner, mask_mode="intersect",
                      output_type="latent")
    assert torch.equal(both.latents, s.original.latents[-1])
    # Accepted, the original image would be recorded as the new prompt's, and the edit the
    # user wanted would then change nothing.
    before = s.original
    with pytest.raises(FiseditError, match="this edit's mask is empty.*a later edit to that "
                                           "prompt would change nothing"):
        s.accept(both)
    assert s.original is before
    s.accept(auto)
    assert s.original.prompt == shapes.DEMO_EDIT


@pytest.mark.parametrize("estimator", ["noise-contrast", "probe"])
def test_a_new_negative_prompt_beside_a_prompt_change_is_planned_over_the_whole_image(estimator):
    """The contrast of conditional predictions sees the prompt's change (a local mask) but
    not the negative prompt's, which acts on the whole image: the estimate must not cut it
    down to the prompt's region. The probe sees both, but its cut would keep only where the
    change shows most (it kept 16-62% of the shapes model's latent, and dense regeneration
    moved the rest by up to 0.8)."""
    from fisedit_compiler import shapes

    s = EditSession(zoo.pipeline("shapes"))
    s.generate(shapes.DEMO_PROMPT, seed=0, num_inference_steps=5, guidance_scale=5.0,
               output_type="latent")
    prompt_only = s.edit(shapes.DEMO_EDIT, mask_estimator=estimator, output_type="latent")
    assert not prompt_only.report["global_change"] and not prompt_only.mask.all()
    negative = "a large black star at the bottom right"
    both = s.edit(shapes.DEMO_EDIT, negative_prompt=negative, mask_estimator=estimator,
                  output_type="latent")
    assert both.report["global_change"] and both.mask.all()
    assert both.report["mask_unet_evaluations"] == 0
    assert both.report["unseen_change"] == "the negative prompt"
    assert plan_note(both.report).startswith(
        "the edit changes the negative prompt, which may act anywhere in the image and which "
        f"the {estimator} estimator cannot confine")
    alone = s.edit(shapes.DEMO_PROMPT, negative_prompt=negative, mask_estimator=estimator,
                   output_type="latent")
    assert alone.report["global_change"] and alone.mask.all()
    # A pipeline argument at its default value of another type is no change: still local.
    same = s.edit(shapes.DEMO_EDIT, eta=0, mask_estimator=estimator, output_type="latent")
    assert not same.report["global_change"] and torch.equal(same.mask, prompt_only.mask)
    assert same.report["unseen_change"] is None


def test_layer_sizes_of_odd_latents():
    from fisedit_compiler.edit_flow.attention import layer_size

    assert layer_size((9, 9), 25) == (5, 5)          # a stride-2 conv rounds up
    assert layer_size((17, 11), 54) == (9, 6)
    assert layer_size((9, 9), 16) == (4, 4)          # a 2x2 pooling rounds down
    assert layer_size((64, 64), 256) == (16, 16)
    with pytest.raises(ValueError, match="no downsampling of the 9x9 latent has 7 positions"):
        layer_size((9, 9), 7)


@pytest.mark.parametrize("estimator", ["cross-attention", "noise-contrast+cross-attention"])
def test_attention_estimators_at_an_odd_latent_size(pipe, estimator):
    """72 px: a 9x9 latent whose next level is 5x5 (the conv rounds up)."""
    s = EditSession(pipe)
    s.generate("a red circle", seed=0, num_inference_steps=2, height=72, width=72,
               output_type="latent")
    result = s.edit("a blue circle", mask_estimator=estimator, output_type="latent")
    assert result.mask.shape == (9, 9)
    assert _outside_equal(result, s.original.latents[-1])


def test_one_call_estimators_run_sparse_from_the_first_step(session, monkeypatch):
    calls = []
    edit = session.engine.edit

    def spy(cache, step, plan, **inputs):
        calls.append(step)
        return edit(cache, step, plan, **inputs)

    monkeypatch.setattr(session.engine, "edit", spy)
    result = session.edit("a blue circle", output_type="latent")   # the default estimator
    report = result.report
    assert report["mask_estimator"] == tac.DEFAULT_ESTIMATOR and report["probe_steps"] == 0
    assert calls == list(range(STEPS))                   # no dense probe step
    # One batched call of the conditional rows at two steps: one CFG step's U-Net batch.
    assert report["mask_unet_evaluations"] == 1.0
    assert _outside_equal(result, session.original.latents[-1])
    # The probe's evaluations are its dense steps, a fifth of the steps by default.
    probe = session.edit("a blue circle", mask_estimator="probe", output_type="latent")
    assert probe.report["probe_steps"] == probe.report["mask_unet_evaluations"] == 1


def test_a_global_change_is_planned_dense(session, monkeypatch):
    monkeypatch.setattr(tac, "GLOBAL_AREA", -1.0)          # every change counts as global
    result = session.edit("a blue circle", output_type="latent")
    assert result.report["global_change"] and bool(result.mask.all())
    assert result.plan.levels[0].fraction == 1.0


def test_a_partial_mask_planned_dense_by_the_threshold_is_named(session):
    """A mask whose tiles pass the finest level's dense threshold runs every level dense: the
    report's note says why a part of the image recomputed all of it."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :10] = True                 # 62% of the latent, grown to whole tiles: all of it
    result = session.edit("a blue circle", mask=mask, output_type="latent")
    assert result.plan.levels[0].dense and not result.report["global_change"]
    assert "passes the finest level's dense threshold" in plan_note(result.report)
    assert plan_note(session.edit("a blue circle", mask=_corner_mask(),
                                  output_type="latent").report) == ""


def test_global_change_detection():
    blob = torch.zeros(16, 16)
    blob[4:8, 4:8] = 1.0
    assert not tac.is_global(blob)
    everywhere = torch.rand(16, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    assert tac.is_global(everywhere)
    assert not tac.is_global(torch.zeros(16, 16))


def test_half_the_otsu_cut_keeps_the_rim_of_a_change():
    score = torch.zeros(16, 16)
    score[4:10, 4:10] = 0.3                                # the rim of a change
    score[5:9, 5:9] = 1.0                                  # its centre
    assert int(tac.binarize(score).sum()) == 16            # Otsu keeps the centre
    assert int(tac.binarize(score, cut=0.5).sum()) == 36


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_estimate_inverts_the_forward_process(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8,
                                                                          generator=generator)
    alphas = torch.tensor([0.3, 0.9])
    a, s = alphas.sqrt().view(-1, 1, 1, 1), (1 - alphas).sqrt().view(-1, 1, 1, 1)
    sample = a * x0 + s * noise
    prediction = {"epsilon": noise, "v_prediction": a * noise - s * x0, "sample": x0}
    contrast = tac.Contrast(samples=sample, old=prediction[prediction_type],
                            new=prediction[prediction_type], alphas=alphas,
                            prediction_type=prediction_type, final=x0[:1])
    assert torch.allclose(tac.x0_estimate(contrast, contrast.new), x0, atol=1e-5)


@pytest.mark.parametrize("config", [dict(), dict(timestep_type="continuous",
                                                prediction_type="v_prediction")])
def test_cumulative_alphas_follow_the_schedulers_noise_level(config):
    # Euler's U-Net input is x0 + sigma * noise scaled to unit variance; its continuous
    # timesteps (0.25 log sigma) index no table, which the rounded lookup read from its end.
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from fisedit_compiler.edit_flow.session import cumulative_alphas

    euler = EulerDiscreteScheduler(**config)
    euler.set_timesteps(10)
    alphas = cumulative_alphas(euler, [0, 4], euler.timesteps[[0, 4]])
    sigmas = euler.sigmas[[0, 4]]
    assert torch.allclose(alphas, 1 / (1 + sigmas ** 2))
    if not config:                 # discrete timesteps: close to the table at the rounded ones
        rounded = euler.timesteps[[0, 4]].round().long()
        assert torch.allclose(alphas, euler.alphas_cumprod[rounded], rtol=0.05)
    ddim = DDIMScheduler()
    ddim.set_timesteps(10)
    assert torch.equal(cumulative_alphas(ddim, [0, 4], ddim.timesteps[[0, 4]]),
                       ddim.alphas_cumprod[ddim.timesteps[[0, 4]]])


def test_contrast_steps():
    assert tac.contrast_steps(20) == [0, 4] and tac.contrast_steps(50) == [0, 10]
    assert tac.contrast_steps(2) == [0]                    # both fractions round to step 0


def test_changed_tokens_and_their_attention_maps(pipe):
    from fisedit_compiler.edit_flow.attention import TokenAttentionMaps, changed_tokens

    new, old = changed_tokens(pipe.tokenizer, "a red circle", "a blue circle")
    tokens = pipe.tokenizer("a blue circle").input_ids
    assert new and old and all(0 < i < len(tokens) - 1 for i in new + old)
    maps = TokenAttentionMaps([new, []], (16, 16))
    # One layer, 2 rows x 2 heads, an 8x8 grid, 77 tokens; attention 1 on the chosen tokens.
    probabilities = torch.zeros(4, 64, 77)
    probabilities[:, :, new] = 1.0 / len(new)
    maps("layer", probabilities, batch_size=2)
    assert torch.allclose(maps.maps[0], torch.ones(16, 16)) and not maps.maps[1].any()


def test_np_edit_composites_the_background(session):
    kept = session.original.images.copy()
    args = dict(mask=_corner_mask(), probe_steps=PROBE, output_type="np")
    result = session.edit("a blue circle", **args)
    raw = session.edit("a blue circle", composite_background=False, **args)
    outside = _outside_pixels(result)
    assert outside.any() and not outside.all()
    assert np.array_equal(result.images[:, outside], kept[:, outside])     # the original's
    assert np.array_equal(result.images[:, ~outside], raw.images[:, ~outside])   # the edit's
    assert torch.equal(result.latents, raw.latents)
    assert result.report["background_composited"] is True
    assert result.report["composite_area_fraction"] == pytest.approx(1 - outside.mean())
    assert result.report["composite_area_fraction"] <= result.report["active_area_fraction"]
    assert raw.report["background_composited"] is False
    assert raw.report["composite_area_fraction"] is None
    assert np.array_equal(session.original.images, kept)   # an edit leaves the original alone


@pytest.fixture(scope="module")
def other_session(pipe):
    """A second session, for tests that regenerate with other output types."""
    return EditSession(pipe)


def test_pil_edit_composites_and_a_mismatched_output_type_is_refused(other_session,
                                                                     monkeypatch):
    s = other_session
    original = s.generate("a red circle", seed=0, num_inference_steps=STEPS, output_type="pil")
    args = dict(mask=_corner_mask(), probe_steps=PROBE)
    result = s.edit("a blue circle", output_type="pil", **args)
    outside = _outside_pixels(result)
    edited, kept = np.asarray(result.images[0]), np.asarray(original[0])
    assert edited.dtype == np.uint8 and edited.shape == (128, 128, 3)
    assert np.array_equal(edited[outside], kept[outside])                 # byte-identical
    assert result.report["background_composited"] is True

    # A mismatched output type is refused before any pipeline step runs.
    before = (s.cache, s.original, s.cache_nbytes())
    with monkeypatch.context() as patch:
        patch.setattr(s, "_run", lambda *a, **k: pytest.fail("the pipeline ran"))
        with pytest.raises(FiseditError, match=r"as 'np'.*output_type='pil'.*"
                                               r"composite_background=False"):
            s.edit("a blue circle", output_type="np", **args)
    assert (s.cache, s.original, s.cache_nbytes()) == before
    # ... and the session still edits: without compositing, or with the recorded type.
    raw = s.edit("a blue circle", output_type="np", composite_background=False, **args)
    assert raw.report["background_composited"] is False and raw.images.shape == (1, 128, 128, 3)
    latent = s.edit("a blue circle", output_type="latent", **args)      # nothing to composite
    assert latent.report["background_composited"] is False
    assert torch.equal(latent.images, latent.latents)
    again = s.edit("a blue circle", output_type="pil", **args)
    assert np.array_equal(np.asarray(again.images[0]), edited)


def test_accept_then_edit_composites_against_the_accepted_images(other_session):
    s = other_session
    s.generate("a red circle", seed=0, num_inference_steps=STEPS, output_type="pil")
    first = s.edit("a blue circle", mask=_corner_mask(), probe_steps=PROBE, output_type="pil")
    s.accept(first)
    accepted = np.asarray(first.images[0])
    assert np.array_equal(np.asarray(s.original.images[0]), accepted)
    assert s.original.output_type == "pil"
    second_mask = torch.zeros(16, 16, dtype=torch.bool)
    second_mask[12:15, 12:15] = True
    second = s.edit("a blue circle and a green square", mask=second_mask, probe_steps=PROBE,
                    output_type="pil")
    outside = _outside_pixels(second)
    assert np.array_equal(np.asarray(second.images[0])[outside], accepted[outside])


def test_pt_edit_composites_the_background(other_session):
    s = other_session
    original = s.generate("a red circle", seed=0, num_inference_steps=STEPS, output_type="pt")
    result = s.edit("a blue circle", mask=_corner_mask(), probe_steps=PROBE, output_type="pt")
    assert result.images.shape == (1, 3, 128, 128)
    outside = torch.from_numpy(_outside_pixels(result))
    assert torch.equal(result.images[..., outside], original[..., outside])
    assert result.report["background_composited"] is True


def test_output_type_must_be_known(other_session):
    with pytest.raises(FiseditError, match="output_type must be one of"):
        other_session.edit("a blue circle", mask=_corner_mask(), output_type="numpy")


def test_shared_tokens_alignment(pipe):
    from fisedit_compiler.edit_flow.attention import shared_tokens

    new, old = shared_tokens(pipe.tokenizer, "a cat", "a big cat")
    # Byte-level tokens: <bos> a</w> c a t</w> ... and <bos> a</w> b i g</w> c a t</w> ...
    assert new.numel() == old.numel() == 77 - 3
    assert new[:5].tolist() == [0, 1, 5, 6, 7] and old[:5].tolist() == [0, 1, 2, 3, 4]


def test_cross_attention_control(session, pipe):
    from fisedit_compiler.edit_flow.attention import CrossAttentionControl, shared_tokens

    # With the recorded prompt, injecting the recorded maps reproduces the recorded call (up
    # to the processors' different attention kernels). (An edit with the recorded prompt runs
    # no call: it is the generation.)
    control = CrossAttentionControl(*shared_tokens(pipe.tokenizer, session.original.prompt,
                                                   session.original.prompt))
    recorded_inputs = session.original.unet_inputs[0]
    with torch.no_grad():
        with control.installed(pipe.unet, "capture"):
            pipe.unet(**recorded_inputs)
        with control.installed(pipe.unet, "inject"):
            injected = pipe.unet(**recorded_inputs)[0]
    recorded = session.original.unet_outputs[0]
    assert ((injected - recorded).norm() / recorded.norm()).item() < 1e-4
    edited = session.edit("a blue circle", probe_steps=PROBE, cross_attention_control=True,
                          output_type="latent")
    assert edited.report["cross_attention_control"]
    shared, _ = shared_tokens(pipe.tokenizer, session.original.prompt, "a blue circle")
    assert edited.report["shared_token_positions"] == shared.numel()
    assert _outside_equal(edited, session.original.latents[-1])
    # Each dense step runs two calls (the original prompt's, captured, and the edit's).
    macs = edited.report["macs"]
    dense, sparse = macs["unet_call"]["dense_macs"], macs["unet_call"]["sparse_macs"]
    estimate = edited.report["mask_unet_evaluations"]         # the estimator's call
    assert macs["edit_unet_macs"] == pytest.approx((2 * PROBE + estimate) * dense
                                                   + (STEPS - PROBE) * sparse)
    assert not any(type(p).__name__ == "_HookedAttnProcessor"
                   for p in pipe.unet.attn_processors.values())


def test_cache_accounting(session):
    assert session.cache_nbytes() > 0
    assert session.cache_nbytes() == session.cache.nbytes()


def test_a_cache_budget_offloads_steps_and_changes_no_result(session, pipe):
    budgeted = EditSession(pipe, cache_budget_bytes=session.cache_nbytes() // (2 * STEPS))
    budgeted.generate("a red circle", seed=0, num_inference_steps=STEPS, output_type="np")
    assert budgeted.cache.offloaded == set(range(STEPS))   # not even one step fits
    assert budgeted.cache_nbytes() == session.cache_nbytes()
    args = dict(mask=_corner_mask(), probe_steps=1, output_type="np")
    expected = session.edit("a blue circle", **args)
    actual = budgeted.edit("a blue circle", **args)
    assert torch.equal(actual.latents, expected.latents)
    budgeted.accept(actual)                                # accept re-records under the budget
    assert budgeted.cache.offloaded == set(range(STEPS))


def test_smoothing_before_the_cut_removes_speckle_and_fills_dropouts():
    # A changed block with two low pixels inside and three single-pixel spikes outside: the
    # speckle of a noise contrast at a pure-noise step.
    score = torch.full((16, 16), 0.1)
    score[4:10, 4:10] = 1.0
    score[6, 6] = score[7, 8] = 0.2
    score[13, 2] = score[2, 13] = score[12, 12] = 0.9
    block = torch.zeros(16, 16, dtype=torch.bool)
    block[4:10, 4:10] = True
    raw = tac.binarize(score)                              # Otsu's cut on the raw score
    assert int((raw & ~block).sum()) == 3 and int((block & ~raw).sum()) == 2
    assert torch.equal(tac.binarize(score, smooth=True), block)
    # The shipped noise-contrast estimator smooths and cuts at Otsu's own threshold.
    estimator = tac.ESTIMATORS[tac.DEFAULT_ESTIMATOR]
    assert estimator.smooth and estimator.cut == 1.0


def test_box_smoothing_keeps_levels_and_scales_with_the_latent_size():
    assert [tac.smoothing_size(h) for h in (16, 32, 64, 96, 128)] == [3, 3, 5, 5, 7]
    flat = torch.full((8, 8), 0.7)
    assert torch.allclose(tac.box_smooth(flat, 3), flat)   # edges replicated, no dark rim
    spike = torch.zeros(8, 8)
    spike[3, 3] = 9.0
    smoothed = tac.box_smooth(spike, 3)
    assert float(smoothed.max()) == pytest.approx(1.0)      # the spike spread over its box
    assert float(smoothed.sum()) == pytest.approx(9.0)
    assert torch.equal(tac.box_smooth(spike, 1), spike)


def _contrast(difference: torch.Tensor) -> tac.Contrast:
    old = torch.zeros(2, 4, *difference.shape)
    return tac.Contrast(samples=old, old=old, new=old + difference, alphas=torch.ones(2),
                        prediction_type="epsilon", final=old[:1])


def test_a_background_change_with_a_sharp_peak_is_global():
    # Everything changes a little (0.3 in prediction units) and one redrawn object a lot: the
    # peak rule sees only the object, the median pixel's contrast sees the background.
    background = torch.full((16, 16), 0.3)
    background[6:8, 6:8] = 4.0
    assert not tac.is_global(tac.noise_contrast_score(_contrast(background)))
    assert tac.median_contrast(_contrast(background)) == pytest.approx(0.3)
    assert tac.contrast_is_global(_contrast(background))
    # An object edit: a strong local change over a near-still background stays local.
    local = torch.full((16, 16), 0.05)
    local[2:9, 2:9] = 1.0
    assert not tac.contrast_is_global(_contrast(local))
    # A change over most of the latent near its peak is global by the peak rule alone.
    assert tac.contrast_is_global(_contrast(torch.full((16, 16), 0.1)))


def test_otsu_and_opening():
    values = torch.cat([torch.full((90,), 0.1), torch.full((10,), 0.9)])
    threshold = tac.otsu_threshold(values)
    assert 0.1 < threshold < 0.9
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:6, 2:6] = True
    mask[8, 8] = True                                  # a speck
    opened = tac.opening(mask)
    assert torch.equal(opened[2:6, 2:6], torch.ones(4, 4, dtype=torch.bool)) and not opened[8, 8]


def test_the_opening_scales_with_the_latent_size():
    assert [tac.opening_size(h) for h in (16, 32, 64, 96, 128)] == [1, 1, 3, 3, 5]
    # A 2x2 object of a 16x16 latent (the shapes model) survives the probe's mask.
    difference = torch.zeros(16, 16)
    difference[6:8, 9:11] = 1.0
    mask = tac.binarize(tac.accumulate([difference, 0.5 * difference]))
    assert torch.equal(mask, difference > 0)


# ---------------------------------------------------------------------------------- errors

def _unchanged(session, before):
    assert session.cache is before[0] and session.cache_nbytes() == before[1]


def test_edit_before_generate(pipe):
    with pytest.raises(FiseditError, match="generate"):
        EditSession(pipe).edit("a blue circle")


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask=torch.zeros(128, 128, dtype=torch.bool)), "latent is 16x16"),
    (dict(height=64, width=64), "recorded at 128x128"),
    (dict(num_inference_steps=STEPS + 1), f"with {STEPS} steps"),
    (dict(probe_steps=STEPS), f"probe_steps {STEPS} is out of range"),
    (dict(probe_steps=0, mask_estimator="probe"),
     r"mask_estimator='probe' measures its mask on the dense probe steps, and this edit has "
     rf"none \(probe_steps=0 of num_inference_steps={STEPS}\); give probe_steps >= 1"),
    (dict(mask_estimator="otsu"), "mask_estimator must be one of"),
    (dict(mask=_corner_mask(), mask_mode="union"), "mask_mode"),
    (dict(mask=_corner_mask(), mask_mode=None),
     "mask_mode must be one of 'replace', 'intersect', got None"),
    (dict(latents=torch.zeros(1)), "edit cannot take latents: an edit keeps the generation's "
                                   "noise"),
    (dict(callback=lambda step, timestep, latents: None, callback_steps=1),
     r"edit cannot take callback, callback_steps: EditSession runs the pipeline's step "
     r"callback itself.*diffusers' deprecated per-step callback"),
    (dict(prompt="a blue circle"), "edit cannot take prompt: an edit's prompt is its first "
                                   "argument, new_prompt"),
])
def test_bad_edit_arguments(session, kwargs, match):
    before = (session.cache, session.cache_nbytes())
    with pytest.raises(FiseditError, match=match):
        session.edit("a blue circle", **dict(dict(probe_steps=PROBE), **kwargs))
    _unchanged(session, before)


def test_unsupported_scheduler(session, pipe):
    from diffusers import PNDMScheduler

    before = (session.cache, session.cache_nbytes())
    original = pipe.scheduler
    pipe.scheduler = PNDMScheduler.from_config(original.config)
    try:
        with pytest.raises(FiseditError, match="DDIMScheduler.*EulerDiscreteScheduler.*PNDM"):
            session.edit("a blue circle", mask=_corner_mask())
    finally:
        pipe.scheduler = original
    _unchanged(session, before)
    assert "forward" not in pipe.unet.__dict__


def test_a_schedule_that_repeats_timesteps_is_refused_before_any_step(session, pipe,
                                                                     monkeypatch):
    """DPM-Solver's Karras sigmas on a cosine schedule give 998, 998, 998, ... at 7 steps;
    diffusers then fails after recording every step."""
    from diffusers import DPMSolverMultistepScheduler

    original = pipe.scheduler
    try:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            original.config, beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
        s = EditSession(pipe, engine=session.engine)
        calls = []
        monkeypatch.setattr(s.engine, "record", lambda *args, **kwargs: calls.append(args))
        with pytest.raises(FiseditError, match=r"DPMSolverMultistepScheduler repeats its first "
                                               r"timestep for num_inference_steps=7 \(998, 998, "
                                               r"998, 997, \.\.\.\).*use another step count"):
            s.generate("a red circle", num_inference_steps=7)
        assert not calls and s.original is None and s.cache is None
        monkeypatch.undo()
        s.generate("a red circle", num_inference_steps=3, output_type="latent")   # 998, 997, 0
        # DPM++ 2M Karras on SD's own schedule: at 50 steps it ends 2, 1, 1, 0, which diffusers
        # counts through (only a repeated first timestep misleads it): accepted.
        karras = DPMSolverMultistepScheduler.from_config(original.config, use_karras_sigmas=True)
        karras.set_timesteps(50)
        assert karras.timesteps[-3:].tolist() == [1, 1, 0]
        _check_first_timestep_once(karras, 50)
    finally:
        pipe.scheduler = original


def test_dynamic_thresholding_is_refused_and_a_per_pixel_clamp_kept(session, pipe):
    """Thresholding clamps by a quantile of the whole image unless sample_max_value <= 1."""
    from diffusers import DDIMScheduler

    before = (session.cache, session.cache_nbytes())
    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config, thresholding=True,
                                                   sample_max_value=5.0)
        with pytest.raises(FiseditError, match="thresholding=True and sample_max_value=5.0 "
                                               "clamps each image by a quantile"):
            EditSession(pipe, engine=session.engine).generate("a red circle")
        _unchanged(session, before)
        pipe.scheduler = DDIMScheduler.from_config(original.config, thresholding=True,
                                                   sample_max_value=1.0)
        s = EditSession(pipe, engine=session.engine)
        s.generate("a red circle", num_inference_steps=2, output_type="latent")
        result = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
        assert _outside_equal(result, s.original.latents[-1])
    finally:
        pipe.scheduler = original


def test_a_scheduler_config_holding_an_array_is_compared_by_value(session, pipe):
    """A numpy trained_betas: the same array edits, one changed in place is refused."""
    from diffusers import DDIMScheduler

    original = pipe.scheduler
    try:
        betas = np.linspace(1e-4, 2e-2, 1000)
        pipe.scheduler = DDIMScheduler.from_config(original.config, trained_betas=betas)
        s = EditSession(pipe, engine=session.engine)
        s.generate("a red circle", num_inference_steps=2, output_type="latent")
        result = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
        assert _outside_equal(result, s.original.latents[-1])
        pipe.scheduler.config.trained_betas[0] = 0.5
        with pytest.raises(FiseditError, match=r"scheduler's config changed since the "
                                               r"generation \(trained_betas\)"):
            s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    finally:
        pipe.scheduler = original


def test_unsupported_pipeline(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    with pytest.raises(FiseditError, match="StableDiffusionPipeline.*Img2Img"):
        EditSession(img2img)


def _controlnet_pipeline(pipe):
    """``pipe`` with a tiny ControlNet made from its U-Net, and a control image."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        controlnet = ControlNetModel.from_unet(
            pipe.unet, conditioning_embedding_out_channels=(4, 4, 8, 8)).eval()
    control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    return control, torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def test_controlnet_pipeline_keeps_the_background(pipe):
    """The ControlNet runs densely on every step's latents; its residuals count inside the
    region only, so the background stays the recording's with the same or a new control."""
    control, image = _controlnet_pipeline(pipe)
    session = EditSession(control)
    session.generate("a red circle", seed=0, num_inference_steps=4, output_type="np",
                     image=image)
    for new_image in (image, image.flip(-1)):
        result = session.edit("a blue circle", mask=_corner_mask(), probe_steps=1,
                              output_type="np", image=new_image)
        assert _outside_equal(result, session.original.latents[-1])
        assert not torch.equal(result.latents, session.original.latents[-1])


def test_the_estimators_contrast_holds_the_controlnets_residuals(pipe):
    """The one-call estimators contrast a prompt's predictions with the recorded outputs,
    which a ControlNet's residuals shaped: their call takes the recorded residuals too, so the
    original prompt contrasts with nothing (without them, the control itself would read as a
    change over the whole image, and a local edit would be planned dense)."""
    control, image = _controlnet_pipeline(pipe)
    with torch.no_grad():      # ControlNet's zero convs made to act, as a trained one's do
        for conv in [*control.controlnet.controlnet_down_blocks,
                     control.controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    session = EditSession(control)
    session.generate("a red circle", seed=0, num_inference_steps=4, output_type="latent",
                     image=image)
    original = session.original
    steps = tac.contrast_steps(original.num_steps)
    batch = contrast_batch(original, original.unet_inputs[0], steps, guided=True)
    recorded = torch.cat([original.unet_outputs[s][1:] for s in steps])
    without = {k: v for k, v in batch.items() if "residual" not in k}
    with torch.no_grad():
        assert torch.allclose(session.engine.dense(**batch, return_dict=False), recorded,
                              atol=1e-5)
        assert not torch.allclose(session.engine.dense(**without, return_dict=False),
                                  recorded, atol=1e-2)     # the control acts


def test_a_controlnet_schedule_change_is_not_taken_for_no_change(pipe):
    """control_guidance_end acts only on later steps, so step 0's U-Net call is the recorded
    one although the edit changes the image: it is planned (all of it, since the estimators
    cannot see such a change), not skipped as an edit that changes nothing. The generation's
    arguments, one of them now given at its default, still change nothing."""
    control, image = _controlnet_pipeline(pipe)
    session = EditSession(control)
    session.generate("a red circle", seed=0, num_inference_steps=4, output_type="latent",
                     image=image)
    original = session.original.latents[-1]
    same = session.edit("a red circle", output_type="latent", image=image,
                        control_guidance_end=1.0)
    assert not same.mask.any() and torch.equal(same.latents, original)
    changed = session.edit("a red circle", output_type="latent", image=image,
                           control_guidance_end=0.5)
    assert changed.mask.all() and changed.report["global_change"]
    assert not torch.equal(changed.latents, original)
    # The control image left out is the generation's (as its negative prompt would be).
    kept = session.edit("a red circle", output_type="latent")
    assert not kept.mask.any() and torch.equal(kept.latents, original)


@pytest.mark.parametrize("arguments, match", [
    # diffusers compares the window with its bounds, which a NaN passes as if it were 0 or 1.
    (dict(control_guidance_end=float("nan")), "control_guidance_end must be a finite number"),
    (dict(control_guidance_start=[float("nan")]), "control_guidance_start must be a finite"),
    (dict(control_guidance_end=1.5), "control_guidance_end 1.5 is out of range"),
    (dict(controlnet_conditioning_scale=float("inf")), "controlnet_conditioning_scale must be"),
    (dict(guess_mode="no"), "guess_mode must be True or False, got str 'no'"),
    (dict(image=None), "image=None: a ControlNet pipeline needs its control image"),
])
def test_controlnet_values_are_checked_before_the_pipeline_runs(pipe, monkeypatch, arguments,
                                                                match):
    control, image = _controlnet_pipeline(pipe)
    session = EditSession(control)
    monkeypatch.setattr(session, "_run", _must_not_run)
    with pytest.raises(FiseditError, match=match):
        session.generate("a red circle", seed=0, num_inference_steps=2,
                         **{"image": image, **arguments})
    assert session.original is None and session.cache is None


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_other_schedulers_background(session, pipe, scheduler):
    import diffusers

    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        session.generate("a red circle", seed=2, num_inference_steps=4, output_type="latent")
        result = session.edit("a blue circle", mask=_corner_mask(), probe_steps=1,
                              output_type="latent")
        assert _outside_equal(result, session.original.latents[-1])
        assert not torch.equal(result.latents, session.original.latents[-1])
        # A latent-only original has no decoded pixels to composite a "pil" edit against.
        with pytest.raises(FiseditError, match=r"as 'pil'.*output_type='latent'.*"
                                               r"composite_background=False"):
            session.edit("a blue circle", mask=_corner_mask(), probe_steps=1)
    finally:
        pipe.scheduler = original


@pytest.fixture(scope="module")
def sdxl_pipe():
    pipe = zoo.pipeline("sdxl-tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_background(sdxl_pipe):
    s = EditSession(sdxl_pipe)
    s.generate("a red circle", seed=0, num_inference_steps=3, output_type="latent")
    result = s.edit("a blue circle", mask=_corner_mask(), probe_steps=1, output_type="latent")
    assert _outside_equal(result, s.original.latents[-1])
    assert np.isfinite(result.latents.numpy()).all()


def test_an_edit_keeps_the_generations_further_arguments_unless_given(sdxl_pipe):
    """prompt_2 and the size conditions left out of an edit are the generation's: the same
    prompt changes nothing, and a changed one is an edit of the generation's conditioning."""
    s = EditSession(sdxl_pipe)
    further = dict(prompt_2="a square", original_size=(256, 256), target_size=(128, 128))
    s.generate("a red circle", seed=0, num_inference_steps=2, output_type="latent", **further)
    same = s.edit("a red circle", output_type="latent")
    assert not same.report["global_change"]
    assert torch.equal(same.latents, s.original.latents[-1])
    # A user mask over the same edit recomputes nothing either (it would only round
    # differently from the recording).
    masked = s.edit("a red circle", mask=_corner_mask(), output_type="latent")
    assert torch.equal(masked.latents, s.original.latents[-1]) and not masked.mask.any()
    # Given, it replaces the generation's (None: the pipeline's default, prompt_2 = prompt).
    changed = s.edit("a red circle", mask=_corner_mask(), prompt_2=None, output_type="latent")
    assert _outside_equal(changed, s.original.latents[-1])
    assert (changed.latents - s.original.latents[-1]).abs().max() > 0.1


def test_size_conditions_given_at_their_defaults_change_nothing(sdxl_pipe):
    """SDXL's original_size and target_size left out are the image size: an edit that gives
    them at that size asks for what the generation had."""
    s = EditSession(sdxl_pipe)
    s.generate("a red circle", seed=0, num_inference_steps=2, output_type="latent")
    size = (s.original.height, s.original.width)
    same = s.edit("a red circle", original_size=size, target_size=(float(size[0]), size[1]),
                  output_type="latent")
    assert same.report["unseen_change"] is None and not same.mask.any()
    assert torch.equal(same.latents, s.original.latents[-1])
    # As are a clip_skip of 0 (no layer skipped) and the negative crop's default.
    same = s.edit("a red circle", clip_skip=0, negative_crops_coords_top_left=(0, 0),
                  output_type="latent")
    assert same.report["unchanged"] and torch.equal(same.latents, s.original.latents[-1])


def test_second_prompts_given_as_the_pipeline_defaults_them_change_nothing(sdxl_pipe):
    """SDXL's prompt_2 (negative_prompt_2) left out is the prompt (negative prompt): an edit
    that gives it so asks for what the generation had, and changes nothing (it was planned
    global, blaming a ControlNet the pipeline does not have)."""
    s = EditSession(sdxl_pipe)
    s.generate("a red circle", seed=0, num_inference_steps=2, output_type="latent",
               negative_prompt="blurry")
    for given in (dict(prompt_2="a red circle"), dict(negative_prompt_2="blurry"),
                  dict(prompt_2="", negative_prompt_2="")):
        same = s.edit("a red circle", output_type="latent", **given)
        assert same.report["unchanged"] and same.report["unseen_change"] is None, given
        assert not same.mask.any() and torch.equal(same.latents, s.original.latents[-1])


def test_a_prompt_2_equal_to_the_prompt_follows_the_edits_prompt(sdxl_pipe, monkeypatch):
    s = EditSession(sdxl_pipe)
    s.generate("a red circle", seed=0, num_inference_steps=2, output_type="latent",
               prompt_2="a red circle", negative_prompt="blurry", negative_prompt_2="blurry")
    seen = {}
    run = s._run

    def spy(trajectory, *args):
        seen.update(args[-1])
        return run(trajectory, *args)

    monkeypatch.setattr(s, "_run", spy)
    s.edit("a blue circle", mask=_corner_mask(), negative_prompt="dark", output_type="latent")
    assert seen["prompt_2"] == "a blue circle" and seen["negative_prompt_2"] == "dark"


@pytest.mark.parametrize("arguments, match", [
    (dict(prompt_2=["a", "b"]), "prompt_2 must be one str, got list"),
    (dict(negative_prompt_2=5), "negative_prompt_2 must be one str, got int"),
    (dict(original_size=[64, 64]), r"original_size must be a tuple of two numbers.*\[64, 64\]"),
    (dict(crops_coords_top_left=(0, 0, 0)), "crops_coords_top_left must be a tuple of two"),
    (dict(target_size=(float("nan"), 64)), "target_size must be a finite number, got nan"),
    (dict(negative_original_size=(0, 64)), "negative_original_size 0.0 is out of range"),
    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left -1.0 is out of range"),
    (dict(clip_skip=2), "clip_skip 2 is out of range"),
    # diffusers uses the negative size conditions only together, else drops them silently.
    (dict(negative_original_size=(64, 64)), "negative_original_size without "
     "negative_target_size would be ignored.*pass negative_target_size too"),
    (dict(negative_target_size=(64, 64), negative_crops_coords_top_left=(8, 8)),
     "negative_target_size without negative_original_size would be ignored"),
    (dict(negative_crops_coords_top_left=(8, 8)), r"negative_crops_coords_top_left=\(8, 8\) "
     "would be ignored.*only when both negative_original_size and negative_target_size"),
    (dict(denoising_end=0.5), "not a custom or shortened one.*drop denoising_end"),
])
def test_sdxl_conditions_are_checked_before_the_pipeline_runs(arguments, match, monkeypatch):
    pipe = zoo.pipeline("sdxl-tiny")
    s = EditSession(pipe)
    monkeypatch.setattr(s, "_run", _must_not_run)
    with pytest.raises(FiseditError, match=match):
        s.generate("a red circle", seed=0, num_inference_steps=2, guidance_scale=5.0,
                   **arguments)
    assert s.original is None and s.cache is None


@pytest.mark.parametrize("mask_mode", ["replace", "intersect"])
def test_an_empty_user_mask_warns_and_returns_the_recording(session, pipe, mask_mode):
    s = EditSession(pipe, engine=session.engine)
    s.generate("a red circle", seed=3, num_inference_steps=2, output_type="latent")
    with pytest.warns(UserWarning, match="the edit mask marks no latent pixel"):
        result = s.edit("a blue circle", mask=torch.zeros(16, 16, dtype=torch.bool),
                        mask_mode=mask_mode, output_type="latent")
    assert not result.plan.levels[0].active.any()
    assert torch.equal(result.latents, s.original.latents[-1])


def test_pipeline_arguments_at_their_defaults_are_taken(session, pipe):
    """timesteps=None, eta=0 and guidance_rescale=0 are the pipeline's defaults: allowed, and
    the same generation as without them (under DDIM, the scheduler that reads eta)."""
    from diffusers import DDIMScheduler

    original = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        s = EditSession(pipe, engine=session.engine)
        plain = s.generate("a red circle", seed=3, num_inference_steps=2, output_type="latent")
        spelled = s.generate("a red circle", seed=3, num_inference_steps=2,
                             output_type="latent", timesteps=None, sigmas=None, eta=0.0,
                             guidance_rescale=0)
        assert torch.equal(plain, spelled)
        result = s.edit("a blue circle", mask=_corner_mask(), eta=0, output_type="latent")
        assert _outside_equal(result, s.original.latents[-1])
        # None is no number: diffusers compares these with 0.0 and would fail after a step.
        for name in ("eta", "guidance_rescale"):
            with pytest.raises(FiseditError, match=f"{name} must be a number, got None"):
                s.edit("a blue circle", mask=_corner_mask(), output_type="latent",
                       **{name: None})
        with pytest.raises(FiseditError, match="eta=0.5 adds fresh noise to the whole image at "
                                               "every DDIM step"):
            s.edit("a blue circle", mask=_corner_mask(), eta=0.5, output_type="latent")
    finally:
        pipe.scheduler = original


def test_a_result_changed_by_its_caller_does_not_change_the_session(session, pipe):
    """The result's latents and images are the caller's own, before and after accept."""
    s = EditSession(pipe, engine=session.engine)
    s.generate("a red circle", seed=3, num_inference_steps=2, output_type="latent")
    result = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    kept = result.latents.clone()
    result.latents.mul_(2)                       # before accept: the trajectory is not it
    s.accept(result)
    assert torch.equal(s.original.latents[-1], kept)
    result.latents.mul_(2)                       # after accept: nor is the new original
    assert torch.equal(s.original.latents[-1], kept)


def test_continuous_edits(session):
    """Runs last: it regenerates and accepts on the shared session."""
    s = session
    s.generate("a red circle", seed=1, num_inference_steps=STEPS, output_type="np")
    first = s.edit("a blue circle", mask=_corner_mask(), probe_steps=3, output_type="np")
    s.accept(first)
    assert torch.equal(s.original.latents[-1], first.latents)
    assert np.array_equal(s.original.images, first.images)
    assert s.cache_nbytes() == s.cache.nbytes() > 0
    second_mask = torch.zeros(16, 16, dtype=torch.bool)
    second_mask[12:15, 12:15] = True
    # Probing fewer steps than the accepted edit crosses its blend step: still exact.
    second = s.edit("a blue circle and a green square", mask=second_mask, probe_steps=1,
                    output_type="np")
    assert _outside_equal(second, first.latents)
    outside = _outside_pixels(second)       # composited against the accepted edit's images
    assert np.array_equal(second.images[:, outside], first.images[:, outside])
    with pytest.raises(FiseditError, match="current generation"):
        s.accept(first)  # stale: made before the accept


def test_edit_command(pipe_folder, tmp_path, capsys):
    import argparse
    import json

    from PIL import Image

    from fisedit_compiler.edit_flow.commands import add_demo_command, add_edit_command

    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_edit_command(subparsers)
    add_demo_command(subparsers)
    mask = np.zeros((128, 128), dtype=np.uint8)
    mask[100:120, 100:120] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = parser.parse_args([
        "edit", "--pipeline", str(pipe_folder), "--prompt", "a red circle", "--edit",
        "a blue circle", "--mask", str(tmp_path / "mask.png"), "--steps", "3",
        "--probe-steps", "1", "--out", str(tmp_path / "out")])
    assert args.run(args) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {"original.png", "edit.png", "mask.png", "overlay.png", "report.json"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["mask_source"] == "user" and 0 < report["mask_area_fraction"] < 0.1
    assert report["timings_s"]["dense_regeneration_s"] > 0
    assert report["background_composited"] is True
    assert report["image_difference_outside_mask"]["max"] == 0.0
    # The overlay tints the region (the mask grown by the dilation), past mask.png's mask:
    # outside the tint, the edit is the original.
    written = {name: np.asarray(Image.open(tmp_path / "out" / name).convert("RGB"))
               for name in ("mask.png", "overlay.png", "edit.png", "original.png")}
    tinted = (written["overlay.png"] != written["edit.png"]).any(-1)
    marked = written["mask.png"][..., 0] > 0
    assert (tinted >= marked).all() and tinted.sum() > marked.sum()
    assert (written["edit.png"][~tinted] == written["original.png"][~tinted]).all()
    printed = capsys.readouterr()
    assert "edit_s" in printed.out and "background_composited" in printed.out
    assert f"wrote original.png, edit.png, mask.png, overlay.png, report.json to " \
           f"{tmp_path / 'out'}" in printed.out
    assert "generate" in printed.err and "edit" in printed.err     # per-step progress bars


def test_demo_command_edits_the_trained_shapes_model(tmp_path, capsys):
    """The default demo: the shipped shapes model, its colour edit, an automatic mask; the edit
    must land (the checker accepts the edited caption) and stay sparse."""
    import json

    from PIL import Image

    from fisedit_compiler import shapes
    from fisedit_compiler.cli import build_parser
    from fisedit_compiler.edit_flow.commands import DEMO_BOX
    from fisedit_compiler.shapes import checker

    out = tmp_path / "demo"
    args = build_parser().parse_args(["demo", "--device", "cpu", "--out", str(out)])
    assert args.run(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "shapes" and report["mask_source"] == "auto"
    assert report["prompt"] == shapes.DEMO_PROMPT and report["edit"] == shapes.DEMO_EDIT
    assert report["num_inference_steps"] == 20 and report["probe_steps"] == 0   # no probe phase
    assert report["mask_estimator"] == "noise-contrast" and report["global_change"] is False
    assert 0 < report["mask_area_fraction"] < 0.2
    # A real sparse edit, not dense: the noise contrast's mask covers the large circle, half
    # of the 16x16 latent's 4x4 tiles.
    assert report["active_area_fraction"] <= 0.5
    assert report["macs"]["edit_unet_macs"] < 0.8 * report["macs"]["dense_unet_macs"]
    assert report["timings_s"]["warm_edit_s"] > 0
    assert report["background_composited"] is True
    assert report["image_difference_outside_mask"]["max"] == 0.0   # the exact background
    names = {p.name for p in out.iterdir()}
    assert names == {"original.png", "edit.png", "mask.png", "overlay.png", "report.json"}
    original = np.asarray(Image.open(out / "original.png").convert("RGB"))
    edited = np.asarray(Image.open(out / "edit.png").convert("RGB"))
    assert original.shape == edited.shape == (64, 64, 3)   # the model's native size
    assert checker.check(original, shapes.DEMO_PROMPT)["scene"]
    assert checker.check(edited, shapes.DEMO_EDIT)["scene"]
    printed = capsys.readouterr().out
    assert "random weights" not in printed and DEMO_BOX not in printed


def test_demo_command_random_weight_model_edits_its_default_box(tmp_path, capsys):
    import json

    from fisedit_compiler.cli import build_parser
    from fisedit_compiler.edit_flow.commands import DEMO_BOX, RANDOM_PROMPT

    args = build_parser().parse_args(["demo", "--model", "sd15-tiny", "--steps", "2",
                                      "--probe-steps", "1", "--out", str(tmp_path / "demo")])
    assert args.run(args) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["model"] == "sd15-tiny" and report["prompt"] == RANDOM_PROMPT
    assert report["mask_source"] == "user" and 0 < report["mask_area_fraction"] < 0.1
    assert report["active_area_fraction"] < 0.5            # a real sparse edit, not dense
    # Each figure says what it is; the speedup names the time it divides by.
    timings = report["timings_s"]
    assert report["speedup_basis"] == "dense_regeneration_s / warm_edit_s"
    assert report["speedup_vs_dense_regeneration"] == pytest.approx(
        timings["dense_regeneration_s"] / timings["warm_edit_s"])
    assert set(report["figures"]) >= {"edit_s", "warm_edit_s", "dense_regeneration_s"}
    printed = capsys.readouterr()
    assert DEMO_BOX in printed.out and "speedup_basis" in printed.out
    assert "dense regeneration (baseline)" in printed.err            # per-step progress bars
    both = build_parser().parse_args(["demo", "--mask", "m.png", "--mask-box", DEMO_BOX])
    with pytest.raises(FiseditError, match="either --mask or --mask-box"):
        both.run(both)


# Issue 18: bad input refused before any step runs; identities; the dilated mask is what changes.

@pytest.mark.parametrize("call, match", [
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), probe_steps=PROBE, guidance=3.0),
     "unknown keyword.*guidance"),
    (lambda s: s.generate("a red circle", num_inference_steps=STEPS, seeed=1),
     "unknown keyword.*seeed"),
    (lambda s: s.generate(["a red circle", "a cat"]), "one EditSession per prompt"),
    (lambda s: s.edit(["a blue circle"], mask=_corner_mask()), "new_prompt must be one str"),
    (lambda s: s.generate("a red circle", guidance_scale=float("nan")), "finite"),
    (lambda s: s.edit("a blue circle", probe_steps=PROBE, guidance_scale=float("nan")),
     "finite"),
    (lambda s: s.edit("a blue circle", mask_dilation=1.5), "mask_dilation must be an int"),
    (lambda s: s.edit("a blue circle", probe_steps=np.float64(2)), "probe_steps must be an int"),
    (lambda s: s.generate("a red circle", seed=-1), "seed -1 is out of range"),
    (lambda s: s.generate("a red circle", height=100.0), "height must be an int"),
    # 8x the default 128 px side at most: 10**6 failed to allocate, 8192 ran for minutes.
    (lambda s: s.generate("a red circle", width=10**6),
     r"width 1000000 is out of range: it must satisfy 8 <= width <= 1024"),
    (lambda s: s.edit("a blue circle", probe_steps=PROBE,
                      cross_attention_kwargs={"scale": 0.5}), "cross_attention_kwargs"),
    (lambda s: s.edit("a blue circle", probe_steps=PROBE, composite_background="no"),
     "composite_background"),
    (lambda s: EditSession(s.pipe, {"dilation": 2}), r"SparseConfig\(\*\*config\)"),
    (lambda s: EditSession(s.pipe, cache_budget_bytes="1GB"), "cache_budget_bytes must be"),
    (lambda s: EditSession(s.pipe, engine="x"), "engine must be a SparseEngine.*got str"),
])
def test_bad_session_arguments_are_refused_before_any_step(session, call, match):
    before = (session.cache, session.cache_nbytes(), session.original)
    with pytest.raises(FiseditError, match=match):
        call(session)
    assert (session.cache, session.cache_nbytes(), session.original) == before


def test_a_generation_that_overflows_is_refused_and_changes_nothing(session):
    before = (session.cache, session.original, session.seed)
    with pytest.raises(FiseditError, match=r"latents are not finite.*guidance_scale was 1e\+30"):
        session.generate("a red circle", seed=0, num_inference_steps=STEPS,
                         guidance_scale=1e30, output_type="np")
    assert (session.cache, session.original, session.seed) == before


def test_a_zero_snr_schedule_with_an_epsilon_model_is_named_when_it_overflows(pipe):
    """diffusers' zero-SNR schedule gives the first trailing timestep no signal, which an
    epsilon-predicting model's estimate divides by (an infinite estimate, which DDIM's
    thresholding makes NaN): the message names that, not guidance alone."""
    from diffusers import DDIMScheduler

    zero_snr = copy.copy(pipe)
    zero_snr.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing", rescale_betas_zero_snr=True,
        prediction_type="epsilon", thresholding=True, sample_max_value=1.0, clip_sample=True)
    with pytest.raises(FiseditError, match="not finite.*rescale_betas_zero_snr=True.*"
                                           "v-prediction model"):
        EditSession(zero_snr).generate("a red circle", seed=0, num_inference_steps=3,
                                       guidance_scale=1.0, output_type="latent")


def test_empty_cross_attention_kwargs_ask_for_nothing(session):
    # Taken as None by the checks, and by the U-Net call router too (it refused them mid-run).
    edit = dict(mask=_corner_mask(), output_type="latent")
    plain = session.edit("a blue circle", **edit)
    given = session.edit("a blue circle", cross_attention_kwargs={}, **edit)
    assert torch.equal(given.latents, plain.latents)
    # Nor are they a change the estimators cannot see: the same prompt still changes nothing.
    same = session.edit(session.original.prompt, cross_attention_kwargs={},
                        output_type="latent")
    assert same.report["unseen_change"] is None and not same.mask.any()
    assert torch.equal(same.latents, session.original.latents[-1])


def test_a_changed_scheduler_config_is_refused(session, pipe):
    original = pipe.scheduler
    pipe.scheduler = type(original).from_config(original.config, prediction_type="v_prediction")
    try:
        with pytest.raises(FiseditError, match="config changed.*prediction_type"):
            session.edit("a blue circle", mask=_corner_mask(), probe_steps=PROBE)
    finally:
        pipe.scheduler = original
    # A noise schedule set on the instance, the config untouched, is another scheduler too.
    pipe.scheduler = type(original).from_config(original.config)
    pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod ** 1.01
    try:
        with pytest.raises(FiseditError, match=r"noise schedule \(alphas_cumprod\) changed"):
            session.edit("a blue circle", mask=_corner_mask(), probe_steps=PROBE)
    finally:
        pipe.scheduler = original
    # The same config in a new scheduler object is the recorded scheduler.
    pipe.scheduler = type(original).from_config(original.config)
    try:
        session.edit("a blue circle", mask=_corner_mask(), probe_steps=0, output_type="latent")
    finally:
        pipe.scheduler = original


def test_seed_none_draws_a_seed_and_results_belong_to_their_session(session, pipe):
    fresh = EditSession(pipe)
    fresh.generate("a red circle", seed=None, num_inference_steps=STEPS, output_type="np")
    assert isinstance(fresh.seed, int)
    seed_0 = torch.randn(fresh.original.noise.shape, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(fresh.original.noise, seed_0)                  # not seed 0's noise
    result = session.edit("a blue circle", mask=_corner_mask(), probe_steps=0,
                          output_type="latent")
    with pytest.raises(FiseditError, match="made by another EditSession"):
        fresh.accept(result)
    # A session without a generation names the same problem (generating there would not help).
    with pytest.raises(FiseditError, match="made by another EditSession"):
        EditSession(pipe).accept(result)


def test_final_latents_keep_the_original_outside_the_region_and_accept_stays_consistent(pipe):
    """A mask off the tile grid: the plan computes whole tiles, which reach past the region
    (the mask grown by the dilation). The final latents keep the original's there, as the
    images do, so an accepted edit's latents and images agree outside the region, and the next
    edit with an empty mask gives the accepted latents back bit for bit."""
    session = EditSession(pipe)
    session.generate("a red circle", seed=0, num_inference_steps=STEPS, output_type="latent")
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[6:8, 6:8] = True           # grown by the dilation: rows 5..8, four tiles of 4
    result = session.edit("a blue circle", mask=mask, output_type="latent")
    ring = result.plan.levels[0].active & ~result.region
    assert ring.any()                           # the tiles reach past the region
    original = session.original.latents[-1]
    assert torch.equal(result.latents[..., ~result.region], original[..., ~result.region])
    assert not torch.equal(result.latents[..., result.region], original[..., result.region])
    session.accept(result)
    with pytest.warns(UserWarning, match="marks no latent pixel"):
        again = session.edit("a green circle", mask=torch.zeros(16, 16, dtype=torch.bool),
                             output_type="latent")
    assert torch.equal(again.latents, result.latents)


def test_dilate_and_erode_take_one_mask_and_an_odd_square():
    """What the refusals of mask_dilation point users to: an even size returned a 17x17 mask
    for a 16x16 one, a size of 0 or a batched mask a raw torch error."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:6, 4:6] = True
    assert tac.dilate(mask, 3).shape == (16, 16) and int(tac.dilate(mask, 3).sum()) == 16
    assert torch.equal(tac.erode(tac.dilate(mask, 3), 3), mask)
    for call in (tac.dilate, tac.erode):
        name = call.__name__
        with pytest.raises(FiseditError, match=f"{name}'s size must be odd.*got 4; pass 5"):
            call(mask, 4)
        with pytest.raises(FiseditError, match=f"{name}'s size 0 is out of range"):
            call(mask, 0)
        with pytest.raises(FiseditError, match=rf"{name} takes one 2-D mask \[H, W\] with "
                                               r"pixels, got \[1, 16, 16\]"):
            call(mask[None], 3)
        with pytest.raises(FiseditError, match=rf"{name} takes one 2-D mask .* got \[0, 0\]"):
            call(torch.zeros(0, 0, dtype=torch.bool), 3)
        # A float or NaN mask was cut at 0.5 (NaN: nothing) without a word.
        for not_bool in (mask.float() * 0.7, torch.full((16, 16), float("nan")), mask.byte()):
            with pytest.raises(FiseditError, match=rf"{name} takes a bool mask, got "
                                                   r"torch\.\w+; convert it with mask > 0\.5"):
                call(not_bool, 3)
        # A square past twice the side reaches what that one does, at its cost.
        assert torch.equal(call(mask, 10**9 + 1), call(mask, 31))


def test_box_smooth_and_binarize_refuse_what_they_would_get_wrong():
    """An even box returned a 9x9 score for an 8x8 one; a size below 1 skipped the smoothing;
    a negative dilation or a NaN cut was taken as none or as an empty mask; NaN scores failed
    in torch.histc."""
    score = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    assert tac.box_smooth(score, 3).shape == (8, 8)
    assert torch.equal(tac.box_smooth(score, 1), score)
    for size, match in ((2, "box_smooth's size must be odd.*got 2; pass 3"),
                        (-3, "box_smooth's size -3 is out of range"),
                        (3.5, "box_smooth's size must be an int")):
        with pytest.raises(FiseditError, match=match):
            tac.box_smooth(score, size)
    for arguments, match in ((dict(dilation=-1), "binarize's dilation -1 is out of range"),
                             (dict(cut=float("nan")), "binarize's cut must be a finite number"),
                             (dict(cut=-0.5), "binarize's cut -0.5 is out of range")):
        with pytest.raises(FiseditError, match=match):
            tac.binarize(score, **arguments)
    nan_score = score.clone()
    nan_score[0, 0] = float("nan")
    for call in (tac.binarize, tac.otsu_threshold):
        with pytest.raises(FiseditError, match="scores are not all finite"):
            call(nan_score)
    with pytest.raises(FiseditError, match="otsu_threshold takes a tensor of scores with values"):
        tac.otsu_threshold(torch.zeros(0))
    for bins in (0, 1, 2.5):
        with pytest.raises(FiseditError, match="otsu_threshold's bins"):
            tac.otsu_threshold(score, bins=bins)


def test_a_dense_plan_changes_nothing_outside_the_dilated_mask(session):
    """A mask large enough for the plan to go dense: the edit computes every pixel, but what
    may change is the user's mask grown by the dilation, and the images keep the rest."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[0:9, 0:9] = True
    result = session.edit("a yellow square", mask=mask, probe_steps=PROBE, output_type="np")
    assert result.plan.levels[0].dense
    assert torch.equal(result.region, tac.dilate(mask, 3))       # SparseConfig.dilation 1
    outside = _outside_pixels(result)
    assert outside.any()
    assert np.array_equal(result.images[:, outside], session.original.images[:, outside])
    assert result.report["composite_area_fraction"] == pytest.approx(100 / 256)


def test_a_huge_dilation_reaches_what_the_whole_mask_side_does_at_once():
    """mask_dilation / SparseConfig.dilation of 10**9 ("everything reachable") is the square
    of twice the mask's side, not a max-pool of 2 * 10**9 + 1 (which took seconds and, from
    2**30, overflowed)."""
    mask = torch.zeros(16, 24, dtype=torch.bool)
    mask[3, 22] = True
    assert torch.equal(tac.dilate(mask, 2 * 10**9 + 1), tac.dilate(mask, 47))
    assert tac.dilate(mask, 2 * 10**9 + 1).all()
    assert tac.dilate(mask, 5).sum() == 5 * 4          # cut at the right edge: 4 columns


def test_sessions_share_an_engine_of_the_same_unet(session, pipe):
    shared = EditSession(pipe, engine=session.engine)
    assert shared.engine is session.engine
    with pytest.raises(FiseditError, match="either config= or engine="):
        EditSession(pipe, fc.SparseConfig(), engine=session.engine)
    other_unet = fc.SparseEngine(zoo.unet("sd15-tiny"))
    with pytest.raises(FiseditError, match="another U-Net"):
        EditSession(pipe, engine=other_unet)


# Bad input to generate and edit: refused before the pipeline runs (no U-Net call), the session
# unchanged; arguments that would be ignored are refused too.

def _must_not_run(*args, **kwargs):
    raise AssertionError("the pipeline ran before the bad input was refused")


_NOISE = (1, 4, 16, 16)      # the tiny pipeline's latent noise at 128x128


def _noise_with(value: float, count: int) -> torch.Tensor:
    """Valid noise but for its first ``count`` values, set to ``value``."""
    noise = torch.randn(_NOISE, generator=torch.Generator().manual_seed(0))
    noise.view(-1)[:count] = value
    return noise


@pytest.mark.parametrize("call, match", [
    # generate: the step count, custom schedules, the pipeline's output form.
    (lambda s: s.generate("a red circle", num_inference_steps=1001),
     r"num_inference_steps=1001 is more than the scheduler's num_train_timesteps=1000.*"
     r"at most 1000 steps"),
    (lambda s: s.generate("a red circle", return_dict=False),
     "generate cannot take return_dict: EditSession reads the pipeline's output itself"),
    (lambda s: s.generate("a red circle", prompt_embeds=torch.zeros(1, 4, 8)),
     "generate cannot take prompt_embeds: EditSession encodes the prompts itself"),
    (lambda s: s.generate("a red circle", num_images_per_prompt=2),
     "generate cannot take num_images_per_prompt: a session records one image per prompt"),
    (lambda s: s.generate("a red circle", timesteps=[999, 500]),
     r"scheduler's own whole schedule.*drop timesteps"),
    # generate: where the noise comes from.
    (lambda s: s.generate("a red circle", latents=np.zeros(_NOISE, np.float32)),
     r"latents must be a torch.Tensor.*torch.from_numpy.*got ndarray"),
    (lambda s: s.generate("a red circle", latents=[[0.0]]),
     "latents must be a torch.Tensor of shape.*got list"),
    (lambda s: s.generate("a red circle", latents=torch.zeros(_NOISE, device="meta")),
     "meta device, which holds no values"),
    (lambda s: s.generate("a red circle", latents=torch.zeros(_NOISE, dtype=torch.long)),
     "latents must be a floating-point tensor"),
    (lambda s: s.generate("a red circle", latents=_noise_with(float("nan"), 3)),
     r"latents holds 3 NaN or infinite value\(s\) of 1024.*pass finite noise, e.g. "
     r"torch.randn\(\(1, 4, 16, 16\)\)"),
    (lambda s: s.generate("a red circle", latents=_noise_with(float("-inf"), 1024)),
     "latents holds 1024 NaN or infinite value"),
    # generate and edit: guidance.
    (lambda s: s.generate("a red circle", guidance_scale=-3.0),
     "guidance_scale -3.0 is negative: diffusers applies classifier-free guidance only above "
     "1.*or 0 to 1 for no guidance"),
    (lambda s: s.generate("a red circle", guidance_scale=1.0, negative_prompt="blurry"),
     "negative_prompt acts only through classifier-free guidance, which diffusers runs only "
     "for guidance_scale > 1, and guidance_scale is 1.0: it would be ignored; pass "
     "guidance_scale > 1"),
    (lambda s: s.generate("a red circle", guidance_scale=0.5, negative_prompt=""),
     "negative_prompt acts only through classifier-free guidance"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), guidance_scale=-1),
     "guidance_scale -1.0 is negative"),
    # Outside the region the pipeline combines the recorded U-Net outputs with the scale.
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), guidance_scale=5.0),
     r"the generation used guidance_scale=7.5 and the edit asks for 5.0; edits keep the "
     r"recorded guidance scale.*leave guidance_scale out, or call generate again"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), guidance_scale=1.0),
     "edits keep the recorded guidance scale"),
    (lambda s: s.generate("a red circle", generator="cpu"),
     r"generator must be one torch.Generator.*got str; for a seed, pass seed="),
    (lambda s: s.generate("a red circle", generator=0), "generator must be one torch.Generator"),
    (lambda s: s.generate("a red circle", seed=2**64),
     "seed 18446744073709551616 is out of range"),
    (lambda s: s.generate("a red circle", seed=7, generator=torch.Generator().manual_seed(1)),
     "seed=7 and generator= both choose the initial noise"),
    (lambda s: s.generate("a red circle", seed=False, generator=torch.Generator()),
     "seed=False and generator= both choose the initial noise"),
    (lambda s: s.generate("a red circle", seed=None, latents=torch.zeros(_NOISE)),
     "seed=None and latents= both"),
    (lambda s: s.generate("a red circle", latents=torch.zeros(_NOISE),
                          generator=torch.Generator()), "latents= and generator= both"),
    # edit: pipeline keywords the session sets or a custom schedule.
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), return_dict=False),
     "edit cannot take return_dict"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), seed=3, generator=None),
     r"edit cannot take generator, seed: an edit keeps the generation's noise.*generate "
     r"again with seed="),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), callback_on_step_end=print),
     "edit cannot take callback_on_step_end: EditSession runs the pipeline's step callback"),
    (lambda s: s.edit("a blue circle", timesteps=[999, 800, 600, 400, 200, 100]),
     "scheduler's own whole schedule.*drop timesteps"),
    (lambda s: s.edit("a blue circle", sigmas=[1.0, 0.5]), "drop sigmas and pass"),
    # Arguments whose non-default values act on the whole image at every step.
    (lambda s: s.generate("a red circle", guidance_rescale=0.7),
     r"guidance_rescale=0.7 rescales each guided prediction by the standard deviation of the "
     r"whole image.*leave guidance_rescale out \(or 0\)"),
    # (DDIM's refusal of eta: test_pipeline_arguments_at_their_defaults_are_taken.)
    (lambda s: s.edit("a blue circle", eta=0.5), r"eta=0.5 would be ignored: diffusers passes "
     r"eta only to schedulers whose step takes it \(DDIM's\), and this pipeline's "
     r"DPMSolverMultistepScheduler does not; leave eta out"),
    (lambda s: s.edit("a blue circle", eta="0"), "eta must be a number, got str"),
    # SDXL's ensemble-of-experts cut: the edit would run part of the recorded steps.
    (lambda s: s.generate("a red circle", denoising_end=0.5),
     "not a custom or shortened one.*drop denoising_end"),
    (lambda s: s.edit("a blue circle", denoising_end=0.5), "drop denoising_end"),
    # Pipeline keywords diffusers takes unchecked.
    (lambda s: s.generate("a red circle", clip_skip=100),
     "clip_skip 100 is out of range: it must satisfy 0 <= clip_skip <= 1"),
    (lambda s: s.edit("a blue circle", clip_skip="2"), "clip_skip must be an int, got str"),
    (lambda s: s.generate("a red circle", ip_adapter_image=torch.zeros(3, 8, 8)),
     r"ip_adapter_image needs an IP-Adapter, and none is loaded; load one"),
    # edit: the recorded step count and size, checked as ints first.
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), num_inference_steps=str(STEPS)),
     "num_inference_steps must be an int, got str"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), num_inference_steps=True),
     "num_inference_steps must be an int, got the bool"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), num_inference_steps=float(STEPS)),
     "num_inference_steps must be an int, got float"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), height=128.0),
     "height must be an int"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), width="128"), "width must be an int"),
    # edit: arguments that would be ignored.
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), mask_dilation=1),
     r"mask_dilation=1 grows the estimated mask.*dilate\(mask, 3\)"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), mask_estimator="x0"),
     "mask_estimator='x0' has nothing to do.*mask_mode='intersect'"),
    (lambda s: s.edit("a blue circle", mask_mode="intersect"),
     "mask_mode='intersect' says how a user mask combines with the estimated one, and no user "
     "mask is given; add mask="),
    (lambda s: s.edit("a blue circle", cross_attention_control=True),
     r"runs none: probe_steps=0 \(the estimator's default\); pass probe_steps >= 1"),
    (lambda s: s.edit("a blue circle", mask=_corner_mask(), probe_steps=0,
                      cross_attention_control=True), "runs none: probe_steps=0;"),
])
def test_bad_input_is_refused_before_the_pipeline_runs(session, monkeypatch, call, match):
    before = (session.cache, session.cache_nbytes(), session.original, session.seed)
    monkeypatch.setattr(session, "_run", _must_not_run)
    with pytest.raises(FiseditError, match=match):
        call(session)
    assert (session.cache, session.cache_nbytes(), session.original, session.seed) == before


def test_valid_noise_arguments_after_refusals(session, pipe):
    """The largest seed is taken (and kept); latents and a generator give the noise alone."""
    fresh = EditSession(pipe, engine=session.engine)
    args = dict(num_inference_steps=2, output_type="latent")
    with pytest.raises(FiseditError, match="generator must be one torch.Generator"):
        fresh.generate("a red circle", generator="cpu", **args)
    assert fresh.original is None and fresh.seed is None
    fresh.generate("a red circle", seed=2**64 - 1, **args)
    assert fresh.seed == 2**64 - 1
    noise = torch.randn(_NOISE, generator=torch.Generator().manual_seed(3))
    fresh.generate("a red circle", latents=noise.clone(), **args)
    assert fresh.seed is None and torch.equal(fresh.original.noise, noise)
    fresh.generate("a red circle", generator=torch.Generator().manual_seed(3), **args)
    assert fresh.seed is None and torch.equal(fresh.original.noise, noise)


def test_edits_take_the_generations_negative_prompt(session, pipe):
    fresh = EditSession(pipe, engine=session.engine)
    fresh.generate("a red circle", num_inference_steps=2, output_type="latent",
                   negative_prompt="blurry")
    args = dict(mask=_corner_mask(), output_type="latent")
    inherited = fresh.edit("a red circle", **args)
    assert inherited._trajectory.negative_prompt == "blurry"
    explicit = fresh.edit("a red circle", negative_prompt="blurry", **args)
    assert torch.equal(inherited.latents, explicit.latents)
    # "" edits without a negative prompt: the unconditional branch changes inside the mask.
    empty = fresh.edit("a red circle", negative_prompt="", **args)
    assert empty._trajectory.negative_prompt == ""
    assert not torch.equal(empty.latents, inherited.latents)
    assert _outside_equal(empty, fresh.original.latents[-1])


def _write_counted(weight):
    with torch.no_grad():
        weight.mul_(1.0)


def _write_through_data(weight):
    weight.data.add_(0.01)


@pytest.mark.parametrize("write, message", [
    (_write_counted, "weights were written in place"),      # fuse_lora, fine-tuning
    (_write_through_data, r"weights were written .* through param\.data"),    # an EMA copy_to
])
def test_changed_weights_are_refused_before_any_unet_call(pipe_folder, monkeypatch, write,
                                                         message):
    """An in-place weight change after the generation, with or without a version count: the
    edit is refused with the engine's message before the estimator's or the probe's U-Net
    calls, and accepting an earlier edit before anything is recorded again."""
    pipe = zoo.pipeline(None, path=pipe_folder)     # its own: the weights change in place
    pipe.set_progress_bar_config(disable=True)
    s = EditSession(pipe)
    s.generate("a red circle", num_inference_steps=2, output_type="latent")
    before = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    write(pipe.unet.conv_in.weight)
    with monkeypatch.context() as patch:
        patch.setattr(s, "_run", _must_not_run)
        for estimator in ("probe", tac.DEFAULT_ESTIMATOR):
            with pytest.raises(FiseditError, match=message + ".*EditSession.generate"):
                s.edit("a blue circle", mask_estimator=estimator, output_type="latent")
    # Accepting an edit made with the old weights would record it with the new ones.
    kept = (s.cache, s.original)
    with monkeypatch.context() as patch:
        patch.setattr(s.engine, "record", _must_not_run)
        with pytest.raises(FiseditError, match=message):
            s.accept(before)
    assert (s.cache, s.original) == kept
    s.generate("a red circle", num_inference_steps=2, output_type="latent")   # recorded again
    result = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    assert _outside_equal(result, s.original.latents[-1])


def test_an_edit_reads_the_weights_values_once(session, monkeypatch):
    """EditSession compares the U-Net in full, weights' values included, before its run, and
    nothing of the caller's runs before the first sparse step: that step does not read the
    values again (7.99 ms for SDXL), and the cache's mark does not outlive the run."""
    reads = []
    counted = session.engine._state.fingerprint
    monkeypatch.setattr(session.engine._state, "fingerprint",
                        lambda: reads.append(1) or counted())
    new_prompt = session.original.prompt + " and a hat"     # whatever the module accepted
    for estimator in ("probe", tac.DEFAULT_ESTIMATOR):
        reads.clear()
        session.edit(new_prompt, mask_estimator=estimator, output_type="np")
        assert len(reads) == 1 and not session.cache.weight_values_checked
    # Arguments refused for themselves are refused before the weights are read.
    reads.clear()
    for bad in ({"mask_mode": "union"}, {"composite_background": "no"},
                {"mask": torch.ones(3, 3, dtype=torch.bool)}, {"mask_estimator": "foo"},
                {"num_inference_steps": session.original.num_steps + 1}):
        with pytest.raises(FiseditError):
            session.edit(new_prompt, output_type="np", **bad)
    assert not reads
    # A run that fails before its first sparse step leaves no mark either.
    with monkeypatch.context() as patch:
        patch.setattr(session.engine, "edit", _must_not_run)
        with pytest.raises(AssertionError):
            session.edit(new_prompt, mask=_corner_mask(), output_type="np")
    assert not session.cache.weight_values_checked
    # An engine edit pass of its own, the mark unset, reads them at its first step.
    reads.clear()
    inputs = session.original.unet_inputs[0]
    plan = session.engine.plan(_corner_mask())
    session.engine.edit(session.cache, 0, plan=plan, **inputs)
    assert len(reads) == 1


def test_a_generate_that_fails_while_preparing_leaves_the_session_as_it_was(other_session,
                                                                            monkeypatch):
    """engine.prepare (CUDA-graph captures, compiles) runs after the pipeline: out of memory
    there must not leave a half-installed generation."""
    s = other_session
    s.generate("a red circle", num_inference_steps=2, output_type="latent")
    before = _state(s)
    reference = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(s.engine, "prepare", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            s.generate("a green square", seed=3, num_inference_steps=2, output_type="latent")
    assert _state(s) == before
    again = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    assert torch.equal(again.latents, reference.latents)


# The U-Net the session runs: pipe.unet must stay the session's, with its class's forward.

def _state(s):
    """What a refused call must leave as it was."""
    return (s.cache, s.cache_nbytes(), s.original, s.seed, s._generation, s.prepare_report)


def _refused_everywhere(s, result, match, monkeypatch):
    """generate, edit and accept of ``s`` are refused with ``match`` before any work, and
    leave the session as it was."""
    before = _state(s)
    with monkeypatch.context() as patch:
        patch.setattr(s, "_run", _must_not_run)
        patch.setattr(s.engine, "record", _must_not_run)
        patch.setattr(s.engine, "dense", _must_not_run)
        for call in (lambda: s.generate("a red circle", num_inference_steps=2),
                     lambda: s.edit("a blue circle", mask=_corner_mask(), output_type="latent"),
                     lambda: s.accept(result)):
            with pytest.raises(FiseditError, match=match):
                call()
    assert _state(s) == before


def test_a_torch_compiled_unet_is_refused_with_the_way_to_the_plain_one(pipe):
    """torch.compile's wrapper has a forward of its own: the message is about the wrapper,
    not about an instance-level forward whose removal would not help."""
    original = pipe.unet
    pipe.unet = torch.compile(original, backend="fisedit")
    try:
        with pytest.raises(FiseditError, match=r"wrapped by torch.compile.*pipe.unet = "
                                               r"pipe.unet._orig_mod.*fc.recording / fc.editing"):
            EditSession(pipe)
    finally:
        pipe.unet = original


def _install_forward(kind: str, pipe):
    """An instance-level forward on ``pipe.unet`` (a wrapper of the caller's, or an accelerate
    hook as enable_model_cpu_offload installs); returns its remover."""
    unet = pipe.unet
    if kind == "accelerate":
        from accelerate.hooks import ModelHook, add_hook_to_module

        add_hook_to_module(unet, ModelHook())

        def remove():       # the fix the message names
            pipe.remove_all_hooks()
            assert "forward" in unet.__dict__        # the class's, left bound by accelerate
            del unet.forward

        return remove
    own = type(unet).forward.__get__(unet)
    unet.forward = lambda *args, **kwargs: own(*args, **kwargs)
    return lambda: unet.__dict__.pop("forward")


@pytest.mark.parametrize("kind", ["wrapper", "accelerate"])
def test_an_instance_forward_is_refused_and_left_in_place(session, pipe, kind, monkeypatch):
    s = EditSession(pipe, engine=session.engine)
    s.generate("a red circle", num_inference_steps=2, output_type="latent")
    reference = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    remove = _install_forward(kind, pipe)
    try:
        forward = pipe.unet.forward
        match = (r"pipe.unet has an instance-level forward.*enable_model_cpu_offload.*"
                 r"del pipe.unet.forward \(for accelerate's hooks first "
                 r"pipe.remove_all_hooks\(\)")
        with pytest.raises(FiseditError, match=match):
            EditSession(pipe)
        _refused_everywhere(s, reference, "instance-level forward", monkeypatch)
        assert pipe.unet.forward is forward           # the caller's, still there
    finally:
        remove()
    # Without it, the session gives what it gave before the refusals.
    again = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    assert torch.equal(again.latents, reference.latents)
    s.accept(again)


def test_routing_restores_whatever_forward_was_there(session, pipe):
    unet = pipe.unet
    with session._routed_unet(lambda inputs: None):
        assert "forward" in unet.__dict__                    # the router
    assert "forward" not in unet.__dict__
    own = unet.forward = lambda *args, **kwargs: None
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with session._routed_unet(lambda inputs: None):
                assert unet.forward is not own
                raise RuntimeError("inside")
        assert unet.forward is own
    finally:
        del unet.forward


def test_a_replaced_unet_is_refused_before_any_work(session, pipe, monkeypatch):
    s = EditSession(pipe, engine=session.engine)
    s.generate("a red circle", num_inference_steps=2, output_type="latent")
    reference = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    kept = pipe.unet
    pipe.unet = zoo.unet("sd15-tiny", seed=1)        # e.g. a fine-tuned U-Net swapped in
    try:
        _refused_everywhere(s, reference, r"pipe.unet was replaced since this session was "
                                          r"made.*restore it \(pipe.unet = session.engine.unet\) "
                                          r"or make a new EditSession\(pipe\)", monkeypatch)
    finally:
        pipe.unet = kept
    again = s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    assert torch.equal(again.latents, reference.latents)


# Guidance: every scale <= 1 is none, and then nothing negative can act.

def test_without_guidance_negative_arguments_are_refused(session, pipe, monkeypatch):
    from fisedit_compiler.edit_flow.session import _check_negative_arguments

    s = EditSession(pipe, engine=session.engine)
    args = dict(num_inference_steps=2, output_type="latent")
    s.generate("a red circle", guidance_scale=0.0, **args)
    zero = s.original.latents[-1]
    s.generate("a red circle", guidance_scale=1.0, **args)
    assert torch.equal(s.original.latents[-1], zero)     # 0 and 1 are both "no guidance"
    edit = dict(mask=_corner_mask(), output_type="latent")
    reference = s.edit("a blue circle", **edit)
    before = _state(s)
    with monkeypatch.context() as patch:
        patch.setattr(s, "_run", _must_not_run)
        for negative in ("blurry", ""):
            with pytest.raises(FiseditError, match="negative_prompt acts only through "
                                                   "classifier-free guidance.*is 1.0"):
                s.edit("a blue circle", negative_prompt=negative, **edit)
            with pytest.raises(FiseditError, match="is 0.5: it would be ignored"):
                s.edit("a blue circle", negative_prompt=negative, guidance_scale=0.5, **edit)
    assert _state(s) == before
    assert torch.equal(s.edit("a blue circle", **edit).latents, reference.latents)
    # Every negative_* pipeline argument (SDXL's negative_prompt_2, negative_original_size...).
    sd, sdxl = (SimpleNamespace(config=SimpleNamespace(**config))
                for config in ({}, {"force_zeros_for_empty_prompt": True}))
    with pytest.raises(FiseditError, match="negative_original_size, negative_prompt_2 acts"):
        _check_negative_arguments(1.0, None, {"negative_prompt_2": "x", "prompt_2": "y",
                                              "negative_original_size": (64, 64)}, sd)
    _check_negative_arguments(1.0, None, {"negative_prompt_2": None}, sd)
    _check_negative_arguments(7.5, "blurry", {"negative_prompt_2": "x"}, sdxl)
    _check_negative_arguments(7.5, None, {"negative_prompt_2": "x"}, sd)
    # SDXL zeroes the unconditional text when there is no negative prompt, dropping these.
    with pytest.raises(FiseditError, match="negative_prompt_2 without a negative_prompt would "
                                           "be ignored.*pass a negative_prompt with it"):
        _check_negative_arguments(7.5, None, {"negative_prompt_2": "x"}, sdxl)
    _check_negative_arguments(7.5, None, {"negative_original_size": (64, 64),
                                          "negative_target_size": (64, 64)}, sdxl)


# Edits the estimators cannot measure: nothing changed, or only what their contrast cannot see.

@pytest.mark.parametrize("estimator", list(tac.ESTIMATORS))
def test_an_edit_that_encodes_like_the_original_changes_nothing(session, pipe, estimator,
                                                                monkeypatch):
    s = EditSession(pipe, engine=session.engine)
    s.generate("a red circle", num_inference_steps=STEPS, output_type="np")
    calls = []
    dense = s._dense
    monkeypatch.setattr(s, "_dense", lambda *a, **k: (calls.append(1), dense(*a, **k))[1])
    result = s.edit("a red circle", mask_estimator=estimator, output_type="np")
    assert not result.mask.any() and result.plan.levels[0].fraction == 0
    assert torch.equal(result.latents, s.original.latents[-1])
    assert np.array_equal(result.images, s.original.images)
    report = result.report
    assert report["mask_area_fraction"] == 0 and not report["global_change"]
    assert report["mask_unet_evaluations"] == 0
    assert len(calls) == report["probe_steps"]          # the probe's steps, no estimate


def test_prompts_that_differ_past_the_tokenizer_limit_change_nothing(session, pipe):
    s = EditSession(pipe, engine=session.engine)
    shared = "a red circle" + " on a white table" * 15
    count = len(pipe.tokenizer(shared + " and a cat").input_ids)
    assert count > pipe.tokenizer.model_max_length
    # diffusers says it cut the prompt only in its log, which a page's user never sees.
    with pytest.warns(UserWarning, match=f"prompt is {count} tokens, and the text encoder "
                                         "reads the first 77.*an edit of it changes nothing"):
        s.generate(shared + " and a cat", num_inference_steps=2, output_type="latent")
    with pytest.warns(UserWarning, match="new_prompt is .* tokens"):
        result = s.edit(shared + " and a dog", output_type="latent")
    assert not result.mask.any() and result.report["mask_unet_evaluations"] == 0
    assert torch.equal(result.latents, s.original.latents[-1])


def test_a_change_the_contrast_cannot_see_is_planned_dense(session, pipe):
    """The same prompt with another negative prompt: the one-call estimators' contrast
    (conditional predictions) would be rounding noise, but the change acts on the whole
    image."""
    s = EditSession(pipe, engine=session.engine)
    s.generate("a red circle", num_inference_steps=2, output_type="latent",
               negative_prompt="ugly")
    result = s.edit("a red circle", output_type="latent", negative_prompt="blurry")
    report = result.report
    assert report["global_change"] and result.mask.all()
    assert result.plan.levels[0].fraction == 1.0 and report["mask_unet_evaluations"] == 0
    assert not torch.equal(result.latents, s.original.latents[-1])
    assert plan_note(report).endswith("planned dense: no sparse speedup")
    # A user mask still confines it, with the exact background, and the note says so.
    both = s.edit("a red circle", mask=_corner_mask(), mask_mode="intersect",
                  output_type="latent", negative_prompt="blurry")
    assert torch.equal(both.mask, _corner_mask())
    assert _outside_equal(both, s.original.latents[-1])
    assert not torch.equal(both.latents, s.original.latents[-1])
    assert both.report["global_change"] and both.plan.levels[0].fraction < 1.0
    assert plan_note(both.report).endswith(
        "the intersecting user mask confines the edit to the mask")


# The rules on the mask: one home (session.check_mask_choice) for the session and the CLI.

def test_the_cli_and_the_session_agree_on_the_mask_rules(session, pipe, tmp_path, monkeypatch):
    from fisedit_compiler.cli import build_parser
    from fisedit_compiler.edit_flow import commands

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    s = EditSession(pipe, engine=session.engine)
    s.generate("a red circle", num_inference_steps=2, output_type="latent")
    monkeypatch.setattr(s, "_run", reached)
    configs = (zoo.PIPELINE_CONFIGS["sd15-tiny"][1], zoo.CONFIGS["sd15-tiny"][1],
               zoo.PIPELINE_CONFIGS["sd15-tiny"][3])
    checked = 0
    for estimator in (None, "probe", "x0"):
        for probe_steps in (None, 0, 1):
            for masked in (False, True):
                for mode in (None, "replace", "intersect"):
                    argv = ["edit", "--pipeline", "p", "--prompt", "a", "--edit", "b",
                            "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "o")]
                    argv += ["--mask-estimator", estimator] if estimator else []
                    argv += ["--probe-steps", str(probe_steps)] if probe_steps is not None else []
                    argv += ["--mask-box", "0,0,0.5,0.5"] if masked else []
                    # The session's "replace" is its default: only the CLI can tell a given one
                    # from none, and refuses it without a user mask (test_cli); here it is none.
                    if mode and (masked or mode != "replace"):
                        argv += ["--mask-mode", mode]
                    try:
                        commands._check_args(build_parser().parse_args(argv), *configs)
                        cli = None
                    except FiseditError as error:
                        cli = str(error)
                    try:
                        s.edit("a blue circle", mask=_corner_mask() if masked else None,
                               probe_steps=probe_steps, mask_estimator=estimator,
                               mask_mode=mode or "replace", output_type="latent")
                    except Reached:
                        python = None
                    except FiseditError as error:
                        python = str(error)
                    case = (estimator, probe_steps, masked, mode, cli, python)
                    assert (cli is None) == (python is None), case
                    checked += cli is not None
    assert checked >= 10          # the grid holds refusals of every rule


def test_a_non_square_sample_size_gives_the_default_image_size():
    """A U-Net whose config.sample_size is a (height, width) pair (diffusers' pipelines take
    both forms): the session's default image follows it, and an edit runs at that size."""
    pipe = zoo.pipeline("sd15-tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.register_to_config(sample_size=(8, 12))
    session = EditSession(pipe)
    images = session.generate("a red circle", seed=0, num_inference_steps=2, output_type="np")
    assert images.shape == (1, 64, 96, 3)
    mask = torch.zeros(8, 12, dtype=torch.bool)
    mask[2:4, 8:11] = True
    result = session.edit("a blue circle", mask=mask, output_type="np")
    assert result.images.shape == (1, 64, 96, 3)
    assert _outside_equal(result, session.original.latents[-1])


@pytest.mark.parametrize("estimator", ["probe", tac.DEFAULT_ESTIMATOR])
def test_an_ip_adapter_edit_estimates_its_mask(estimator):
    """An IP-Adapter's image embeddings reach the U-Net as a list in added_cond_kwargs: the
    estimators' contrast batch repeats and joins its rows as it does a tensor's (they raised
    on the list before)."""
    from test_families import sd15_ip_adapter

    pipe = zoo.pipeline("sd15-tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.unet = sd15_ip_adapter()[0]
    embeds = [torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(5))]  # [neg; pos]
    s = EditSession(pipe)
    s.generate("a red circle", num_inference_steps=3, output_type="latent",
               ip_adapter_image_embeds=embeds)
    result = s.edit("a blue circle", mask_estimator=estimator, output_type="latent")
    assert result.report["mask_estimator"] == estimator
    assert _outside_equal(result, s.original.latents[-1])


def _flagging_checker(images, device, dtype):
    """A safety checker that flags every image and blacks it out, as diffusers' does."""
    return torch.zeros_like(images), [True] * images.shape[0]


def test_a_flagged_edit_or_original_is_reported_and_not_composited(pipe, monkeypatch):
    """The safety checker's blacked-out images are not composited (a black square pasted
    into the original, or the edit's patch on a black image): the edit returns its own
    decode, says so in its report and warns."""
    s = EditSession(pipe)
    s.generate("a red circle", num_inference_steps=2, output_type="np")
    with monkeypatch.context() as patch:
        patch.setattr(pipe, "run_safety_checker", _flagging_checker)
        with pytest.warns(UserWarning, match="safety checker flagged the edit"):
            flagged = s.edit("a blue circle", mask=_corner_mask(), output_type="np")
    assert flagged.report["nsfw_content_detected"] is True
    assert flagged.report["background_composited"] is False
    assert not flagged.images.any()                         # the checker's black, as it is
    plain = s.edit("a blue circle", mask=_corner_mask(), output_type="np")
    s.accept(flagged)                   # the black images become the original: still flagged
    with pytest.warns(UserWarning, match="safety checker flagged the original"):
        after = s.edit("a green circle", mask=_corner_mask(), output_type="np")
    assert after.report["original_nsfw_content_detected"] is True
    assert after.report["background_composited"] is False and after.images.any()
    s.generate("a red circle", num_inference_steps=2, output_type="np")
    assert plain.report["nsfw_content_detected"] is False and \
        plain.report["background_composited"] is True
    with monkeypatch.context() as patch:
        patch.setattr(pipe, "run_safety_checker", _flagging_checker)
        with pytest.warns(UserWarning, match="flagged the generated image"):
            s.generate("a red circle", num_inference_steps=2, output_type="np")
    with pytest.warns(UserWarning, match="safety checker flagged the original"):
        edit = s.edit("a blue circle", mask=_corner_mask(), output_type="np")
    assert edit.report["background_composited"] is False and edit.images.any()


def test_a_replaced_vae_is_refused_where_the_edit_composites(pipe_folder):
    """The background is the generation's decode: another VAE would decode the region
    differently from it. Latent output, or the raw decode, needs no old decode."""
    pipe = zoo.pipeline(None, path=pipe_folder)     # its own: its VAE changes
    pipe.set_progress_bar_config(disable=True)
    s = EditSession(pipe)
    s.generate("a red circle", num_inference_steps=2, output_type="np")
    vae = pipe.vae
    pipe.vae = copy.deepcopy(vae)
    try:
        with pytest.raises(FiseditError, match="pipe.vae was replaced, or its weights or config"):
            s.edit("a blue circle", mask=_corner_mask(), output_type="np")
        s.edit("a blue circle", mask=_corner_mask(), output_type="np",
               composite_background=False)
    finally:
        pipe.vae = vae
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.0)
    with pytest.raises(FiseditError, match="pipe.vae was replaced, or its weights or config"):
        s.edit("a blue circle", mask=_corner_mask(), output_type="np")
    # The pipeline decodes with the VAE's scaling_factor: a new one decodes another image.
    s.generate("a red circle", num_inference_steps=2, output_type="np")
    scaling = vae.config.scaling_factor
    vae.register_to_config(scaling_factor=scaling / 2)
    try:
        with pytest.raises(FiseditError, match=r"config \(scaling_factor, shift_factor"):
            s.edit("a blue circle", mask=_corner_mask(), output_type="np")
    finally:
        vae.register_to_config(scaling_factor=scaling)
    assert s.edit("a blue circle", mask=_corner_mask(), output_type="np").report[
        "background_composited"]
    # A write that moves no version counter (an EMA model's param.data.copy_): the weights'
    # values are read, by the same reader as the edit before.
    bias = vae.decoder.conv_out.bias
    saved = bias.detach().clone()
    bias.data.add_(1.0)
    try:
        with pytest.raises(FiseditError, match="pipe.vae was replaced, or its weights or config"):
            s.edit("a blue circle", mask=_corner_mask(), output_type="np")
    finally:
        bias.data.copy_(saved)
    assert s.edit("a blue circle", mask=_corner_mask(), output_type="np").report[
        "background_composited"]


def test_an_sdxl_vae_cast_up_for_each_decode_is_the_same_decoder():
    """SDXL's pipeline casts an fp16 VAE to fp32 for each decode and back (force_upcast):
    new storages for the same weights, not another decoder, so edit after edit composites."""
    pipe = zoo.pipeline("sdxl-tiny")
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(torch.float16)
    assert pipe.vae.config.force_upcast
    s = EditSession(pipe)
    s.generate("a red circle", num_inference_steps=2, output_type="np")
    mask = torch.zeros(s.original.noise.shape[-2:], dtype=torch.bool)
    mask[:3, :3] = True
    for prompt in ("a blue circle", "a green circle"):
        assert s.edit(prompt, mask=mask, output_type="np").report["background_composited"]


def test_pipeline_arguments_are_the_sessions_own_copies(pipe):
    """A ControlNet's image changed in place after generate must not reach the recording's
    arguments, which edits compare theirs with (it made an unchanged edit global)."""
    control, image = _controlnet_pipeline(pipe)
    s = EditSession(control)
    s.generate("a red circle", num_inference_steps=2, output_type="latent", image=image)
    given = image.clone()
    image.mul_(0.5)
    result = s.edit("a red circle", output_type="latent", image=given)
    assert result.report["unchanged"]


@pytest.mark.parametrize("interrupted_call", ["generate", "edit"])
def test_an_interrupted_run_is_refused_and_leaves_the_session_as_it_was(
        session, pipe, monkeypatch, interrupted_call):
    """diffusers' interrupt flag skips the rest of a run's U-Net calls and still decodes: a
    session holding such a run would hold part of a generation as if whole."""
    s = EditSession(pipe, engine=session.engine)
    s.generate("a red circle", seed=3, num_inference_steps=3, output_type="latent")
    original, cache = s.original, s.cache
    route = s._routed_unet

    def interrupting_route(handler):
        def handler_then_interrupt(inputs):
            output = handler(inputs)
            pipe._interrupt = True
            return output
        return route(handler_then_interrupt)

    monkeypatch.setattr(s, "_routed_unet", interrupting_route)
    with pytest.raises(FiseditError, match="U-Net for 1 of its 3 steps.*session is unchanged"):
        if interrupted_call == "generate":
            s.generate("a green circle", seed=4, num_inference_steps=3, output_type="latent")
        else:
            s.edit("a blue circle", mask=_corner_mask(), output_type="latent")
    assert s.original is original and s.cache is cache


@pytest.mark.parametrize("edit_arguments", [dict(mask_estimator="probe", probe_steps=2),
                                            dict(mask=True, probe_steps=3)])
def test_an_edit_that_is_the_generation_runs_no_unet_call(session, monkeypatch, edit_arguments):
    """The probe's dense steps (and the sparse ones) of an edit whose U-Net inputs and
    arguments are the generation's would compute the recorded calls again: none runs."""
    if edit_arguments.get("mask") is True:
        edit_arguments = dict(edit_arguments, mask=_corner_mask())
    monkeypatch.setattr(session, "_dense", _must_not_run)
    monkeypatch.setattr(session.engine, "edit", _must_not_run)
    result = session.edit(session.original.prompt, output_type="latent", **edit_arguments)
    report = result.report
    assert report["unchanged"] and report["probe_steps"] == report["sparse_steps"] == 0
    assert report["macs"]["edit_unet_macs"] == 0
    assert torch.equal(result.latents, session.original.latents[-1])
