"""The shapes model: renderer, caption grammar, edit pairs, checker, pipeline builder, training
script (smoke run with checkpoint and resume) and the edit-quality benchmark on a random tiny
pipeline; these run without trained weights. The last section checks the trained weights the
package ships (fisedit_compiler/shapes/weights): installed as package data, loaded offline on
CPU, and recognisable to the checker."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import shapes
from fisedit_compiler.errors import FiseditError
from fisedit_compiler.shapes import checker, model, render, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and the CI machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scene(*objects, background="white"):
    return render.Scene(tuple(render.SceneObject(*o) for o in objects), background)


# ------------------------------------------------------------------------------------ renderer

@pytest.mark.parametrize("shape", render.SHAPES)
def test_shape_at_its_place_and_colour(shape):
    scene = _scene((shape, "blue", "large", "top left"), (shape, "red", "small", "bottom right"),
                   background="gray")
    image = render.to_uint8(render.render([scene]))[0]
    assert tuple(image[0, -1]) == render.RGB["gray"]            # top right corner: background
    for obj in scene.objects:
        cx, cy = (int(v * 64) for v in obj.centre)
        assert tuple(image[cy, cx]) == render.RGB[obj.colour]   # the centre: the object
        mask = (image == np.array(render.RGB[obj.colour])).all(-1)
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() + 0.5 - obj.centre[0] * 64) < 1.0
        assert abs(ys.mean() + 0.5 - obj.centre[1] * 64) < 1.0
        row, col = render.cell_of(obj.position)
        assert ys.min() >= row * 64 / 3 - 1 and ys.max() <= (row + 1) * 64 / 3 + 1
        assert xs.min() >= col * 64 / 3 - 1 and xs.max() <= (col + 1) * 64 / 3 + 1
    sizes = [(image == np.array(render.RGB[o.colour])).all(-1).sum() for o in scene.objects]
    assert sizes[0] > 2 * sizes[1]                               # large vs small


def test_windowed_rendering_equals_full_image():
    batch = render.random_batch(np.random.default_rng(0), 64)
    packed = render.pack_batch(batch)
    for slot in range(render.MAX_OBJECTS):
        shape, geometry = packed["shape"][:, slot], packed["geometry"][:, slot]
        for size in (64, 32):
            assert torch.equal(render.object_coverage(shape, geometry, size),
                               render.coverage(shape, geometry, size))


def test_random_batch_matches_scene_objects():
    batch = render.random_batch(np.random.default_rng(1), 32)
    scenes = render.scenes_from_batch(batch)
    assert render.batch_captions(batch) == [s.caption() for s in scenes]
    assert torch.equal(render.render(render.pack_batch(batch)), render.render(scenes))


def test_caption_grammar_round_trip():
    rng = np.random.default_rng(2)
    for scene in render.random_scenes(rng, 200):
        text = scene.caption()
        assert render.parse_caption(text) == scene.without_jitter()
        assert set(text.split()) <= set(render.grammar_words())
    for bad in ("a red cat on a sofa", "a large red circle at the top on a pink background",
                "a huge red circle at the top on a white background"):
        with pytest.raises(ValueError):
            render.parse_caption(bad)


def test_scene_rules():
    with pytest.raises(ValueError, match="share a position"):
        _scene(("circle", "red", "small", "top"), ("star", "blue", "small", "top"))
    with pytest.raises(ValueError, match="share a colour"):
        _scene(("circle", "red", "small", "top"), ("star", "red", "small", "left"))


def test_changed_region_is_the_pixel_difference():
    for pair in render.benchmark_pairs(10):
        images = render.render([pair.original, pair.edited])
        differs = (images[0] - images[1]).abs().amax(0) > 0.5 / 255
        assert torch.equal(render.changed_region(pair, dilation=0), differs)
        dilated = render.changed_region(pair, dilation=1)
        assert (dilated | ~differs).all() and dilated.sum() > differs.sum()
        latent = render.latent_region(pair)
        assert latent.shape == (16, 16)
        assert torch.equal(latent, torch.nn.functional.max_pool2d(
            dilated[None, None].float(), 4)[0, 0] > 0)


@pytest.mark.parametrize("kind", render.EDIT_KINDS)
def test_every_edit_kind_makes_a_valid_pair(kind):
    for seed in range(8):
        pair = render.make_edit_pair(seed, kind)
        before, after = pair.original, pair.edited
        assert pair.prompt != pair.edit_prompt
        assert render.parse_caption(pair.edit_prompt) == after.without_jitter()
        region = render.changed_region(pair)
        assert 0 < region.float().mean() < 1
        n = len(before.objects)
        if kind == "add":
            assert len(after.objects) == n + 1 and after.objects[:n] == before.objects
        elif kind == "remove":
            assert len(after.objects) == n - 1
            assert before.objects[pair.index] not in after.objects
        elif kind == "background":
            assert after.objects == before.objects and after.background != before.background
            assert region.float().mean() > 0.5
        else:
            changed = [i for i in range(n) if before.objects[i] != after.objects[i]]
            assert changed == [pair.index]
            attr = "colour" if kind == "colour" else "position"
            old, new = before.objects[pair.index], after.objects[pair.index]
            assert getattr(old, attr) != getattr(new, attr)
            assert old.jitter == new.jitter and old.shape == new.shape


def test_benchmark_pairs_are_fixed_and_balanced():
    pairs = render.benchmark_pairs(20)
    assert [p.kind for p in pairs[:5]] == list(render.EDIT_KINDS)
    assert [p.edit_prompt for p in pairs] == [p.edit_prompt for p in render.benchmark_pairs(20)]
    assert render.benchmark_pairs(6, start=7) == pairs[7:13]     # a split run, the same pairs


# ------------------------------------------------------------------------------------- checker

def test_checker_passes_rendered_truth():
    scenes = render.random_scenes(np.random.default_rng(3), 40)
    results = checker.check_many(render.render(scenes), scenes)
    acc = checker.accuracy(results)
    assert all(acc[k] == 1.0 for k in (*checker.ATTRIBUTES, *checker.SCENE_CHECKS))
    # captions work as well as scenes, and uint8 HWC arrays as well as tensors
    image = render.to_uint8(render.render(scenes[:1]))[0]
    assert checker.check(image, scenes[0].caption())["scene"]


def test_checker_fails_noise_and_wrong_captions():
    scenes = render.random_scenes(np.random.default_rng(4), 40)
    noise = checker.accuracy(checker.check_many(torch.rand(40, 3, 64, 64), scenes))
    assert noise["scene"] == 0 and noise["colour"] < 0.2 and noise["position"] < 0.1
    images = render.render(scenes)
    shifted = checker.accuracy(checker.check_many(images, scenes[1:] + scenes[:1]))
    assert shifted["scene"] < 0.1
    # one attribute changed at a time is caught
    scene = _scene(("triangle", "green", "large", "center"))
    image = render.render([scene])[0]
    for wrong, attr in ((("triangle", "blue", "large", "center"), "colour"),
                        (("triangle", "green", "large", "left"), "position"),
                        (("square", "green", "large", "center"), "shape"),
                        (("triangle", "green", "small", "center"), "size")):
        result = checker.check(image, _scene(wrong))
        assert not result["objects"][0][attr] and not result["scene"]
    assert not checker.check(image, _scene(("triangle", "green", "large", "center"),
                                           background="black"))["background"]


# ----------------------------------------------------------------------------- model builder

def test_tokenizer_is_word_level():
    tok = model.tokenizer()
    for word in render.grammar_words():
        assert len(tok(word, add_special_tokens=False).input_ids) == 1
    captions = [s.caption() for s in render.random_scenes(np.random.default_rng(5), 20)] + [""]
    expected = tok(captions, padding="max_length", max_length=tok.model_max_length,
                   truncation=True).input_ids
    assert model.WordEncoder(tok)(captions).tolist() == expected
    assert tok.model_max_length == model.MAX_LENGTH
    assert max(len(tok(s.caption()).input_ids) for s in render.random_scenes(
        np.random.default_rng(6), 200)) <= model.MAX_LENGTH


def test_full_configs_build_within_size():
    tok = model.tokenizer()
    sizes = {"vae": model.num_parameters(model.build_vae()),
             "unet": model.num_parameters(model.build_unet()),
             "text": model.num_parameters(model.build_text_encoder(tok))}
    assert 2e6 < sizes["unet"] < 10e6
    assert sum(sizes.values()) * 2 < 30 * 2**20      # fp16 bytes
    vae = model.build_vae()
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert latents.shape == (1, 4, 16, 16)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes-tiny")
    model.build_pipeline(tiny=True, seed=0).save_pretrained(folder)
    return folder


def test_tiny_pipeline_saves_loads_and_generates(tiny_folder):
    pipe = fc.zoo.pipeline(None, path=tiny_folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.set_progress_bar_config(disable=True)
    caption = "a large red circle at the center on a white background"
    images = pipe(caption, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert fc.zoo.pipeline("shapes", path=tiny_folder).unet.config.sample_size == 16


def test_zoo_shapes_without_weights_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(shapes, "WEIGHTS", tmp_path / "weights")
    with pytest.raises(FiseditError, match="fisedit_compiler.shapes.train"):
        fc.zoo.pipeline("shapes")
    with pytest.raises(FiseditError, match="unknown pipeline name 'shape'.*shapes"):
        fc.zoo.pipeline("shape")


def test_zoo_shapes_copies_weights_into_an_empty_folder(monkeypatch, tiny_folder, tmp_path):
    monkeypatch.setattr(shapes, "WEIGHTS", tiny_folder)
    pipe = fc.zoo.pipeline("shapes", path=tmp_path / "copy")
    assert (tmp_path / "copy" / "model_index.json").is_file()
    assert pipe.vae.config.block_out_channels == list(model.TINY_VAE["block_out_channels"])


# ---------------------------------------------------------------------------------- training

def test_training_smoke_checkpoint_and_resume(tmp_path):
    out, work = tmp_path / "pipe", tmp_path / "work"
    common = ["--out", str(out), "--work", str(work), "--tiny", "--size", "32", "--batch", "4",
              "--vae-batch", "4", "--vae-steps", "2", "--unet-steps", "3", "--device", "cpu",
              "--eval-captions", "2", "--eval-steps", "2", "--eval-guidance", "3"]
    assert train.main(common + ["--stop-after-steps", "3"]) == train.EXIT_PAUSED
    assert (work / "checkpoint.pt").is_file() and not out.exists()
    state = torch.load(work / "checkpoint.pt", weights_only=False)["state"]
    assert state["stage"] == "unet" and state["vae_step"] == 2 and state["unet_step"] == 1
    with pytest.raises(SystemExit, match="--resume"):
        train.main(common)                               # refuses to overwrite the checkpoint
    assert train.main(common + ["--resume", "--archive", str(tmp_path / "w.tar.gz")]) == 0
    state = torch.load(work / "checkpoint.pt", weights_only=False)["state"]
    assert state["stage"] == "done" and state["unet_step"] == 3
    assert state["scaling_factor"] > 0
    pipe = fc.zoo.load_pipeline(out)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.scaling_factor == pytest.approx(
        state["scaling_factor"])
    assert json.loads((out / "unet" / "config.json").read_text())["sample_size"] == 8
    assert (work / "metrics.json").is_file() and (tmp_path / "w.tar.gz").is_file()


# ---------------------------------------------------------------------------------- benchmark

def test_tune_mask_scores_cached_contrasts(tmp_path):
    """benchmarks/tune_mask.py --evaluate on a hand-made cache: a clean object change is found
    exactly, a background change is called global, and "shipped" is the chosen variant."""
    spec = importlib.util.spec_from_file_location("tune_mask",
                                                  ROOT / "benchmarks" / "tune_mask.py")
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    old = torch.zeros(2, 4, 16, 16)
    truth = torch.zeros(16, 16, dtype=torch.bool)
    truth[4:10, 4:10] = True
    change = torch.full((16, 16), 0.01)
    change[4:10, 4:10] = 1.0
    records = {600: ("colour", old + change, truth),
               601: ("background", old + 0.5, torch.ones(16, 16, dtype=torch.bool))}
    for index, (kind, new, region) in records.items():
        torch.save({"index": index, "kind": kind, "truth": region, "new": new, "old": old},
                   tmp_path / f"pair-{index:04d}.pt")
    out = tmp_path / "tune.json"
    assert tune.main(["--evaluate", "--start", "600", "--pairs", "2", "--cache", str(tmp_path),
                      "--variants", "mean/sum/box/otsu*1.0", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["shipped"] == results["mean/sum/box/otsu*1.0"]
    assert results["shipped"]["object_iou"] == 1.0
    assert results["shipped"]["background_global"] == 1.0
    assert results["shipped"]["objects_global"] == 0.0


def test_edit_quality_on_a_random_tiny_pipeline(tmp_path):
    spec = importlib.util.spec_from_file_location("edit_quality",
                                                  ROOT / "benchmarks" / "edit_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "eq"
    variants = "probe@2,noise-contrast@0,noise-contrast+cross-attention@1"
    assert bench.main(["--random-tiny", "--pairs", "2", "--steps", "4", "--variants", variants,
                       "--device", "cpu", "--out", str(out), "--examples", "2"]) == 0
    report = json.loads((out / "edit_quality.json").read_text())
    summary = report["summary"]
    assert summary["pairs"] == 2 and [p["kind"] for p in report["pairs"]] == ["add", "remove"]
    for variant in variants.split(","):
        assert summary[variant]["latent_max_diff_outside"] == 0.0    # the exact background
        assert summary[variant]["pixel_max_diff_outside"] == 0.0     # composited
        assert 0.0 <= summary[variant]["mask_iou"] <= 1.0
        assert summary[variant]["edit_s"] > 0
    # The probe's evaluations are its dense steps; the noise contrast's one batched call holds
    # the conditional rows of two steps (one CFG step's batch); with attention maps, twice that.
    assert [summary[v]["mask_unet_evaluations"] for v in variants.split(",")] == [2, 1, 2]
    assert set(summary["by_kind"]) == {"add", "remove"}
    assert (out / "examples.png").is_file()

    merged = tmp_path / "merged"
    assert bench.main(["--merge", str(out / "edit_quality.json"), "--out", str(merged)]) == 0
    again = json.loads((merged / "edit_quality.json").read_text())["summary"]
    assert again["noise-contrast@0"] == summary["noise-contrast@0"]


def test_edit_quality_workers_share_the_pairs_and_merge(tmp_path):
    spec = importlib.util.spec_from_file_location("edit_quality",
                                                  ROOT / "benchmarks" / "edit_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench._without_options(["--workers", "2", "--pairs=3", "--steps", "2", "--out",
                                   "x", "--random-tiny"]) == ["--steps", "2", "--random-tiny"]
    out = tmp_path / "eq"
    assert bench.main(["--random-tiny", "--pairs", "3", "--start", "1", "--steps", "2",
                       "--variants", "noise-contrast@0", "--device", "cpu", "--workers", "2",
                       "--examples", "1", "--out", str(out)]) == 0
    report = json.loads((out / "edit_quality.json").read_text())
    assert [p["index"] for p in report["pairs"]] == [1, 2, 3]
    assert report["summary"]["setup"]["complete"] is True
    starts = [json.loads((out / f"part-{k}" / "edit_quality.json").read_text())["summary"]
              ["setup"]["start"] for k in (0, 1)]
    assert starts == [1, 3] and (out / "examples.png").is_file()


# ------------------------------------------------------------------------- the shipped weights

def test_package_data_covers_every_weight_file():
    """pyproject's package-data globs must take every file of the weights folder into a wheel
    (setuptools globs: ``*`` stays within one folder)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["fisedit_compiler"]
    package = ROOT / "fisedit_compiler"
    shipped = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    files = {p for p in shapes.WEIGHTS.rglob("*") if p.is_file()
             and "__pycache__" not in p.parts}
    assert (shapes.WEIGHTS / "model_index.json") in files
    assert files <= shipped, sorted(str(p.relative_to(package)) for p in files - shipped)
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    assert size_mb < 30


def test_shipped_shapes_pipeline_draws_its_captions():
    """The trained model offline on CPU: a few evaluation captions (the training script's fixed
    set) at the demo's settings; the checker must accept most of them (the GPU evaluation of
    100 captions scored 0.88 of scenes fully right)."""
    pipe = fc.zoo.pipeline("shapes")
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    pipe.set_progress_bar_config(disable=True)
    scenes = train.eval_scenes(8)
    images = train.generate(pipe, [s.caption() for s in scenes], steps=20, guidance=5.0,
                            seed=train.EVAL_SEED)
    assert images.shape == (8, 64, 64, 3)
    accuracy = checker.accuracy(checker.check_many(images, scenes))
    assert accuracy["colour"] >= 0.9 and accuracy["position"] >= 0.9
    assert accuracy["scene"] >= 0.6

