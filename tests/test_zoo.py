"""The model zoo: tiny U-Nets run, inputs are deterministic, pipelines generate offline and round-trip."""

import json
import re
import os
import shutil

import numpy as np
import pytest
import torch

from fisedit_compiler import zoo
from fisedit_compiler.errors import FiseditError

TINY_UNETS = [n for n in zoo.MODEL_NAMES if n.endswith("-tiny")]
TINY_SIZE = 128  # the tiny U-Nets' 16x16 latents through the 8x VAE


def _images(pipe, prompt="a red cat on a sofa", seed=0, size=TINY_SIZE, steps=2):
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=steps, height=size, width=size, output_type="np",
               generator=torch.Generator().manual_seed(seed))
    return out.images


@pytest.fixture
def run_slow(request):
    # tests/conftest.py may register --run-slow; FISEDIT_RUN_SLOW=1 works without it.
    if not (request.config.getoption("--run-slow", default=False)
            or os.environ.get("FISEDIT_RUN_SLOW") == "1"):
        pytest.skip("full-size model; opt in with --run-slow (or FISEDIT_RUN_SLOW=1)")


# ------------------------------------------------------------------------------------- U-Nets

@pytest.mark.parametrize("name", TINY_UNETS)
def test_tiny_unet_runs(name):
    model = zoo.unet(name)
    inputs = zoo.example_inputs(model, batch=2, seed=0)
    with torch.no_grad():
        (out,) = model(**inputs)
    assert out.shape == inputs["sample"].shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny", "ddpm-tiny"])
def test_example_inputs_deterministic(name):
    model = zoo.unet(name)
    a, b = zoo.example_inputs(model, seed=3), zoo.example_inputs(model, seed=3)
    c = zoo.example_inputs(model, seed=4)
    flat = lambda d: {k: v for k, v in d.items() if k != "added_cond_kwargs"} | d.get(
        "added_cond_kwargs", {})
    fa, fb, fc = flat(a), flat(b), flat(c)
    assert fa.keys() == fb.keys()
    for k, v in fa.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, fb[k]), k
    assert not torch.equal(fa["sample"], fc["sample"])


def test_unet_weights_deterministic():
    a, b = zoo.unet("sd15-tiny", seed=1), zoo.unet("sd15-tiny", seed=1)
    c = zoo.unet("sd15-tiny", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("fn", [zoo.unet, zoo.config, zoo.pipeline])
def test_unknown_name(fn):
    with pytest.raises(FiseditError, match="unknown .*'sd3'.*sd15.*sdxl"):
        fn("sd3")


def test_example_inputs_rejects_non_unet():
    with pytest.raises(FiseditError, match="not a diffusers U-Net.*pipe.unet"):
        zoo.example_inputs(torch.nn.Linear(4, 4))


# ---------------------------------------------------------------------------------- pipelines

def test_tokenizer_is_byte_level_clip():
    tok = zoo.tokenizer()
    assert len(tok) == 514 and tok.model_max_length == 77
    ids = tok("Ünïcode prompt, 123!", padding="max_length", truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert tok.pad_token_id == tok.eos_token_id and tok.unk_token_id not in ids[1:ids.index(
        tok.eos_token_id)]


@pytest.fixture(scope="module")
def sd15_tiny():
    return zoo.pipeline("sd15-tiny")


@pytest.fixture(scope="module")
def sdxl_tiny():
    return zoo.pipeline("sdxl-tiny")


def test_sd15_tiny_generates(sd15_tiny):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = sd15_tiny
    assert type(pipe) is StableDiffusionPipeline
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    img = _images(pipe)
    assert img.shape == (1, TINY_SIZE, TINY_SIZE, 3)
    assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1


def test_sdxl_tiny_generates(sdxl_tiny):
    from diffusers import StableDiffusionXLPipeline

    pipe = sdxl_tiny
    assert type(pipe) is StableDiffusionXLPipeline
    cfg = pipe.unet.config
    assert (pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
            == cfg.cross_attention_dim)
    assert (pipe.text_encoder_2.config.projection_dim
            == cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim)
    img = _images(pipe)
    assert img.shape == (1, TINY_SIZE, TINY_SIZE, 3) and np.isfinite(img).all()


def test_sd21_tiny_is_v_prediction():
    pipe = zoo.pipeline("sd21-tiny")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.text_encoder.config.hidden_act == "gelu"
    assert _images(pipe, steps=1).shape == (1, TINY_SIZE, TINY_SIZE, 3)


def test_pipeline_deterministic(sd15_tiny):
    again = zoo.pipeline("sd15-tiny", seed=0)
    np.testing.assert_array_equal(_images(sd15_tiny), _images(again))
    other = zoo.pipeline("sd15-tiny", seed=1)
    assert not torch.equal(next(other.unet.parameters()), next(sd15_tiny.unet.parameters()))


# Weights loaded from safetensors are memory-mapped at unaligned offsets, and CPU matmul kernels
# may take a different SIMD path for them, so a round trip can differ in the last float bit.
ROUND_TRIP_ATOL = 1e-5


@pytest.mark.parametrize("name", ["sd15-tiny", "sdxl-tiny"])
def test_save_and_load_round_trip(name, tmp_path, request):
    path = tmp_path / name
    built = zoo.pipeline(name, path=path)  # absent folder: build and save there
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == type(built).__name__
    loaded = zoo.pipeline(None, path=path)  # load-only
    assert type(loaded) is type(built)
    ref = _images(request.getfixturevalue(name.replace("-", "_")))
    np.testing.assert_allclose(_images(built), ref, atol=0, rtol=0)
    np.testing.assert_allclose(_images(loaded), ref, atol=ROUND_TRIP_ATOL, rtol=0)
    # the same name with an existing saved pipeline loads it instead of rebuilding
    again = zoo.load_pipeline(path)
    np.testing.assert_allclose(_images(again), ref, atol=ROUND_TRIP_ATOL, rtol=0)


def test_save_into_empty_folder_and_dtype(tmp_path):
    pipe = zoo.pipeline("sd15-tiny", path=tmp_path, dtype=torch.bfloat16)  # tmp_path exists, empty
    assert (tmp_path / "model_index.json").is_file()
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    loaded = zoo.load_pipeline(tmp_path, dtype=torch.float32)
    assert loaded.unet.dtype == torch.float32


# ---------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name", ["ddpm", "ddpm-tiny"])
def test_ddpm_has_no_pipeline(name):
    with pytest.raises(FiseditError, match=rf"zoo.unet\('{name}'\)"):
        zoo.pipeline(name)


def test_nonempty_folder_without_index(tmp_path):
    (tmp_path / "notes.txt").write_text("not a pipeline")
    with pytest.raises(FiseditError, match="not empty.*model_index.json"):
        zoo.pipeline("sd15-tiny", path=tmp_path)
    with pytest.raises(FiseditError, match="model_index.json"):
        zoo.load_pipeline(tmp_path)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(FiseditError, match="is a file"):
        zoo.pipeline("sd15-tiny", path=f)


def test_missing_components_named(tmp_path):
    zoo.pipeline("sd15-tiny", path=tmp_path)
    shutil.rmtree(tmp_path / "vae")
    (tmp_path / "tokenizer").rename(tmp_path / "tok")
    with pytest.raises(FiseditError, match=r"damaged: tokenizer \(no folder, or an empty one\), "
                                           r"vae \(no folder.*save_pretrained"):
        zoo.pipeline(None, path=tmp_path)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "sd15-tiny"
    zoo.pipeline("sd15-tiny", path=path)
    return path


@pytest.mark.parametrize("removed, named", [
    ("tokenizer/tokenizer.json", "tokenizer (no tokenizer.json or vocab.json)"),
    ("tokenizer/tokenizer_config.json", "tokenizer (no tokenizer_config.json)"),
    ("text_encoder/config.json", "text_encoder (no config.json)"),
    ("scheduler/scheduler_config.json", "scheduler (no scheduler_config.json)"),
    ("unet/config.json", "unet (no config.json)"),
])
def test_a_component_missing_a_file_it_loads_from_is_named(saved_tiny, tmp_path, removed,
                                                              named):
    """A folder without the files its class loads from would load as something else (a
    tokenizer without its vocabulary loads with two tokens) or fail inside transformers."""
    shutil.copytree(saved_tiny, tmp_path / "saved")
    (tmp_path / "saved" / removed).unlink()
    (tmp_path / "saved" / removed).with_name("notes.txt").write_text("not empty")
    with pytest.raises(FiseditError, match="missing or damaged: " + re.escape(named)):
        zoo.load_pipeline(tmp_path / "saved")


def test_a_component_config_that_is_no_json_object_is_named(saved_tiny, tmp_path):
    shutil.copytree(saved_tiny, tmp_path / "saved")
    (tmp_path / "saved" / "scheduler" / "scheduler_config.json").write_text("[1]")
    with pytest.raises(FiseditError, match=r"damaged: scheduler \(scheduler_config.json is not "
                                           r"a JSON object\)"):
        zoo.load_pipeline(tmp_path / "saved")


def test_a_tokenizer_without_a_prompt_length_and_mismatched_weights_are_refused(saved_tiny,
                                                                                tmp_path):
    folder = tmp_path / "saved"
    shutil.copytree(saved_tiny, folder)
    config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("model_max_length")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FiseditError, match="tokenizer saved at .* has no prompt length"):
        zoo.load_pipeline(folder)
    shutil.rmtree(folder)
    shutil.copytree(saved_tiny, folder)
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    config["hidden_size"] *= 2          # weights of other sizes than the config says
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FiseditError, match="cannot load the pipeline.*RuntimeError"):
        zoo.load_pipeline(folder)


def test_nothing_to_build_or_load(tmp_path):
    with pytest.raises(FiseditError, match="needs a name"):
        zoo.pipeline(None)
    with pytest.raises(FiseditError, match="no saved pipeline to load"):
        zoo.pipeline(None, path=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_saved_pipeline_of_another_model(tmp_path):
    zoo.pipeline("sd15-tiny", path=tmp_path)
    with pytest.raises(FiseditError, match="not a StableDiffusionXLPipeline.*name=None"):
        zoo.pipeline("sdxl-tiny", path=tmp_path)
    with pytest.raises(FiseditError, match="attention_head_dim.*not zoo pipeline 'sd21-tiny'"):
        zoo.pipeline("sd21-tiny", path=tmp_path)


# ---------------------------------------------------------------------------------- full size

@pytest.mark.slow
@pytest.mark.parametrize("name,cls,te_hidden,vae_size,scaling,prediction", [
    ("sd15", "StableDiffusionPipeline", [768], 512, 0.18215, "epsilon"),
    ("sd21", "StableDiffusionPipeline", [1024], 768, 0.18215, "v_prediction"),
    ("sdxl", "StableDiffusionXLPipeline", [768, 1280], 1024, 0.13025, "epsilon"),
])
def test_full_size_pipeline(run_slow, name, cls, te_hidden, vae_size, scaling, prediction):
    pipe = zoo.pipeline(name)
    assert type(pipe).__name__ == cls
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if name == "sdxl" else [])
    assert [e.config.hidden_size for e in encoders] == te_hidden
    assert sum(te_hidden) == pipe.unet.config.cross_attention_dim
    assert tuple(pipe.vae.config.block_out_channels) == (128, 256, 512, 512)
    assert pipe.vae.config.sample_size == vae_size
    assert pipe.vae.config.scaling_factor == scaling
    assert pipe.scheduler.config.prediction_type == prediction
    if name == "sdxl":
        assert pipe.text_encoder_2.config.projection_dim == 1280
    img = _images(pipe, size=64, steps=1)
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


# Issue 18: the loaders check their arguments before building anything.

@pytest.mark.parametrize("call, message", [
    (lambda: zoo.unet("sd15-tiny", seed="0"), "seed must be an int"),
    (lambda: zoo.unet("sd15-tiny", dtype="float16"), "dtype must be a floating torch.dtype"),
    (lambda: zoo.unet(["sd15-tiny"]), "unknown model name"),
    (lambda: zoo.pipeline("sd15-tiny", seed=-1), "seed -1 is out of range"),
    (lambda: zoo.pipeline(("sd15-tiny",)), "unknown pipeline name"),
    (lambda: zoo.pipeline("sd15-tiny", dtype=torch.int8), "floating torch.dtype"),
])
def test_loaders_refuse_bad_arguments(call, message):
    with pytest.raises(FiseditError, match=message):
        call()


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch=0), "batch 0 is out of range"), (dict(height=2.5), "height must be an int"),
    (dict(timestep=float("nan")), "timestep must be a finite number"),
    (dict(seed=2 ** 64), r"seed 18446744073709551616 is out of range.*<= 18446744073709551615"),
])
def test_example_inputs_refuse_bad_arguments(kwargs, message):
    unet = zoo.unet("sd15-tiny")
    with pytest.raises(FiseditError, match=message):
        zoo.example_inputs(unet, **kwargs)


def test_example_inputs_of_a_learned_time_embedding_are_whole_timesteps_in_its_table():
    """A learned time embedding (an nn.Embedding of num_train_timesteps rows) looks timesteps
    up: the example inputs give integers inside the table, and the engine records them."""
    import diffusers

    import fisedit_compiler as fc

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), time_embedding_type="learned",
        num_train_timesteps=100).eval()
    inputs = zoo.example_inputs(unet, batch=2)
    assert inputs["timestep"].dtype == torch.long and inputs["timestep"].tolist() == [50, 50]
    with torch.no_grad():
        expected = unet(**inputs)[0]
    engine = fc.compile(unet)
    recorded = engine.record(engine.new_cache(1), 0, **inputs)
    assert torch.allclose(recorded, expected, atol=1e-5)
    assert zoo.example_inputs(unet, timestep=99)["timestep"].tolist() == [99, 99]
    for bad in (100, 2.5, -1):
        with pytest.raises(FiseditError, match=r"learned .* a table of 100 timesteps, so "
                                               r"timestep must be a whole number from 0 to 99"):
            zoo.example_inputs(unet, timestep=bad)


# Review: seeds, dtypes, devices, paths and saved folders are checked before any work.

def test_seed_at_the_top_of_the_range_builds_a_pipeline():
    """The components' seeds (seed + 1, seed + 2, ...) wrap into 64 bits instead of overflowing
    torch.manual_seed for a valid seed near 2**64 - 1."""
    top = 2 ** 64 - 1
    pipe = zoo.pipeline("sd15-tiny", seed=top)
    alone = zoo.unet("sd15-tiny", seed=top)
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def test_from_config_builds_a_conditional_unet():
    unet = zoo.from_config(zoo.config("sd15-tiny"), seed=2 ** 64 - 1)
    assert type(unet).__name__ == "UNet2DConditionModel" and not unet.training


@pytest.mark.parametrize("call, message", [
    (lambda: zoo.unet("sd15-tiny", seed=2 ** 64), r"seed 18446744073709551616 is out of range"),
    (lambda: zoo.pipeline("sd15-tiny", seed=2 ** 64), r"seed .* is out of range"),
    (lambda: zoo.from_config(zoo.config("sd15-tiny"), seed=-1), r"seed -1 is out of range"),
    (lambda: zoo.from_config(zoo.config("sd15-tiny"), seed="1"), r"seed must be an int"),
    (lambda: zoo.from_config([("layers_per_block", 1)]), r"cfg must be a dict.*zoo.config"),
    (lambda: zoo.from_config(zoo.config("ddpm-tiny")),
     r"cannot build a UNet2DConditionModel from cfg.*zoo.unet\(name\)"),
    (lambda: zoo.from_config(dict(zoo.config("sd15-tiny"), bogus=1)),
     r"unexpected keyword argument 'bogus'.*UNet2DConditionModel keyword arguments"),
    (lambda: zoo.unet("sd15-tiny", dtype=torch.float8_e4m3fn),
     r"floating torch.dtype .*torch.bfloat16.*got torch.float8_e4m3fn"),
    (lambda: zoo.pipeline("sd15-tiny", dtype=torch.float8_e5m2), r"got torch.float8_e5m2"),
    (lambda: zoo.load_pipeline("anywhere", dtype=torch.float8_e4m3fn), r"floating torch.dtype"),
    (lambda: zoo.unet("sd15-tiny", device="bogus"), r"device 'bogus' cannot be used here"),
    (lambda: zoo.unet("sd15-tiny", device="cuda:99"), r"device 'cuda:99' cannot be used here"),
    (lambda: zoo.unet("sd15-tiny", device=0), r"device must be a str .*'cuda:0'.*got int 0"),
    (lambda: zoo.pipeline("sd15-tiny", path=3), r"path must be a folder path.*got int 3"),
    (lambda: zoo.pipeline("sd15-tiny", path=b"out"), r"path must be a folder path.*bytes"),
    (lambda: zoo.pipeline("sd15-tiny", path=""), r"path is an empty string"),
    (lambda: zoo.pipeline("shapes", path=["weights"]), r"path must be a folder path.*list"),
    (lambda: zoo.pipeline("shapes", seed=5), r"seed=5 cannot apply to 'shapes'.*leave seed out"),
    (lambda: zoo.load_pipeline(None), r"path must be a folder path.*got NoneType None"),
    (lambda: zoo.load_pipeline(5), r"path must be a folder path.*got int 5"),
])
def test_loaders_refuse_bad_arguments_before_building(call, message):
    with pytest.raises(FiseditError, match=message):
        call()


@pytest.mark.parametrize("call", [
    lambda path: zoo.pipeline("sd15-tiny", path=path),
    lambda path: zoo.pipeline(None, path=path),
    lambda path: zoo.load_pipeline(path),
    lambda path: zoo.pipeline("shapes", path=path),
])
def test_model_index_that_is_not_an_object(tmp_path, call):
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(FiseditError, match=r"model_index.json holds a JSON list.*save_pretrained"):
        call(tmp_path)


def test_saved_pipeline_refuses_another_seed_and_a_damaged_unet_config(tmp_path):
    built = zoo.pipeline("sd15-tiny", path=tmp_path, seed=5)     # built from seed 5 and saved
    again = zoo.pipeline("sd15-tiny", path=tmp_path, seed=5)     # the same call loads it
    assert torch.equal(again.unet.conv_in.weight, built.unet.conv_in.weight)
    for name in ("sd15-tiny", None):                             # the saved weights would load
        with pytest.raises(FiseditError, match=r"seed=6 cannot apply: .* was built with "
                                               r"seed=5.*leave seed out"):
            zoo.pipeline(name, path=tmp_path, seed=6)
    (tmp_path / zoo.BUILD_RECORD).unlink()                       # saved by other means
    with pytest.raises(FiseditError, match=r"seed=5 cannot apply: .* holds a saved pipeline"):
        zoo.pipeline("sd15-tiny", path=tmp_path, seed=5)
    (tmp_path / "unet" / "config.json").write_text("[1]")
    with pytest.raises(FiseditError, match=r"unet/config.json holds a JSON list, not a U-Net"):
        zoo.pipeline("sd15-tiny", path=tmp_path)
