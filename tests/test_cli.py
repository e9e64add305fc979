"""The command line: ``dump`` end to end, and its errors (exit code 2, one line, no traceback)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fisedit_compiler import inspect as fc_inspect
from fisedit_compiler import shapes, zoo
from fisedit_compiler.cli import _check_out_file, main
from fisedit_compiler.edit_flow import commands
from fisedit_compiler.errors import FiseditError

REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    """Run ``python -m fisedit_compiler.cli ARGS`` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "fisedit_compiler.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


def test_dump_json():
    done = cli("dump", "--model", "sd15-tiny", "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["model"], report["stage"], report["frontend"]) == (
        "sd15-tiny", "canonical", "export")
    assert report["summary"]["ops"]["conv2d"] == 33
    assert report["summary"]["attention"] == {"self": 4, "cross": 4}
    assert report["inputs"]["sample"]["shape"] == [2, 4, 16, 16]


def test_unknown_model_names_valid_ones():
    done = cli("dump", "--model", "sd3")
    assert done.returncode == 2
    assert "fisedit-compiler dump: error: unknown model name 'sd3'" in done.stderr
    assert all(name in done.stderr for name in zoo.MODEL_NAMES)
    assert "Traceback" not in done.stderr


def test_missing_pipeline_folder(tmp_path, capsys):
    # In-process (main's exit code and stderr are what the script returns and prints), since
    # each subprocess pays seconds of imports.
    missing = tmp_path / "nowhere"
    assert main(["dump", "--pipeline", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"error: {missing} is not a folder" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [[], ["dump"], ["dump", "--model", "a", "--pipeline", "b"],
                                  ["dump", "--model", "sd15-tiny", "--format", "png"]])
def test_usage_errors(argv, capsys):
    assert main(argv) == 2
    assert "usage: fisedit-compiler" in capsys.readouterr().err


def test_help(capsys):
    assert main(["dump", "--help"]) == 0
    assert "--pipeline DIR" in capsys.readouterr().out


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipelines") / "sd15-tiny"
    zoo.pipeline("sd15-tiny", path=path)
    return path


def test_dump_pipeline(saved_pipeline, tmp_path):
    out = tmp_path / "dump.json"
    assert main(["dump", "--pipeline", str(saved_pipeline), "--format", "json",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == str(saved_pipeline)
    assert report["summary"]["ops"]["conv2d"] == 33


def test_dump_pipeline_reads_only_the_unet(saved_pipeline, tmp_path, capsys):
    """The VAE and text encoder are not needed to inspect the U-Net (gigabytes for SDXL): a
    folder missing them dumps; one whose U-Net folder is empty is named so."""
    folder = tmp_path / "no-vae"
    shutil.copytree(saved_pipeline, folder, ignore=shutil.ignore_patterns("vae", "text_encoder"))
    assert main(["dump", "--pipeline", str(folder), "--out", str(tmp_path / "dump.txt")]) == 0
    shutil.rmtree(folder / "unet")
    (folder / "unet").mkdir()
    assert main(["dump", "--pipeline", str(folder)]) == 2
    assert ("lists components whose files are missing or damaged: unet (no folder, or an "
            "empty one)"
            in capsys.readouterr().err)


def test_pipeline_without_unet(saved_pipeline, tmp_path, capsys):
    folder = tmp_path / "no-unet"
    shutil.copytree(saved_pipeline, folder, ignore=shutil.ignore_patterns("unet"))
    index = json.loads((folder / "model_index.json").read_text())
    del index["unet"]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["dump", "--pipeline", str(folder)]) == 2
    assert "has no unet" in capsys.readouterr().err


def test_folder_without_model_index(tmp_path, capsys):
    assert main(["dump", "--pipeline", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err


@pytest.mark.slow
def test_dump_sdxl_json(tmp_path):
    out = tmp_path / "sdxl.json"
    done = cli("dump", "--model", "sdxl", "--format", "json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["attention"] == {"self": 70, "cross": 70}
    assert [level["size"] for level in summary["levels"].values()] == [
        [128, 128], [64, 64], [32, 32]]
    assert summary["unknown_ops"] == {}


# Issue 18: every argument of edit and demo is checked before a pipeline is loaded (minutes
# at SD size), and unloadable pipeline folders are exit code 2, not a traceback.

@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command loads or builds a pipeline."""
    def loaded(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the arguments were checked")

    monkeypatch.setattr(zoo, "load_pipeline", loaded)
    monkeypatch.setattr(zoo, "pipeline", loaded)


def _red_square_png(path, size=128):
    from PIL import Image

    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[8:24, 8:24] = (255, 0, 0)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("extra, message", [
    (["--mask", "missing.png"], "cannot read the mask missing.png"),
    (["--mask", "{empty}"], "marks no pixel"),
    (["--mask", "{red}", "--mask-box", "0,0,1,1"], "either --mask or --mask-box"),
    (["--mask-box", "0,0,2,1"], "--mask-box needs"),
    (["--mask-box", "nan,0,1,1"], "--mask-box needs"),
    (["--mask-box", ""], "--mask-box is empty; give --mask-box a value, or leave --mask-box "
                         "out for the automatic mask"),
    (["--mask", " ", "--mask-mode", "intersect"], "--mask is empty"),
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["--guidance-scale", "-1"], "--guidance-scale -1.0 is negative"),
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--steps", "2000"], "--steps=2000 is more than the scheduler's num_train_timesteps=1000"),
    (["--steps", "4", "--probe-steps", "4"], "--probe-steps 4 is out of range"),
    (["--seed", "-3"], "--seed -3 is out of range"),
    (["--size", "0"], "--size 0 is out of range"),
    (["--device", "nonsense"], "--device 'nonsense' cannot be used"),
    # Bad input refused before loading, not after (a raw traceback, or the whole generation).
    (["--seed", "18446744073709551616"],
     "--seed 18446744073709551616 is out of range: it must satisfy 0 <= --seed <= "
     "18446744073709551615"),
    (["--device", "meta"], "--device 'meta' holds tensor shapes but no data"),
    (["--mask-box", "0,0,0.5,0.5", "--mask-mode", "intersect", "--mask-estimator", "probe",
      "--probe-steps", "0"], "--mask-estimator probe measures its mask on the dense probe steps"),
    (["--mask-estimator", "probe", "--steps", "1"],
     "this edit has none (--probe-steps 0 of --steps 1); give --probe-steps 1 or more (with "
     "--steps 2 or more), another --mask-estimator, or a user mask (--mask PNG or --mask-box "
     "x0,y0,x1,y1) with --mask-mode replace"),
    (["--mask-mode", "intersect"], "--mask-mode intersect says how a user mask combines with "
                                   "the estimated one, and no user mask is given; add --mask "
                                   "PNG or --mask-box x0,y0,x1,y1, or leave --mask-mode out"),
    (["--mask-box", "0,0,0.5,0.5", "--mask-estimator", "probe"],
     "--mask-estimator probe has nothing to do: the user mask (--mask-box 0,0,0.5,0.5) with "
     "--mask-mode replace"),
    (["--mask-mode", "replace"], "no user mask is given; add --mask PNG or --mask-box"),
    (["--size", "102"], "--size 102 is not a multiple of"),
    (["--out", "{red}"], "is a file, not a folder"),
    (["--out", "{taken}"], "holds a folder named report.json, where the command writes a file "
                           "of that name; move it, or pass another --out"),
    (["--out", ""], "--out is empty; pass the folder for the outputs"),
    # Not writable even for root (os.access would say yes there).
    (["--out", "/proc/fisedit-out"], "--out /proc/fisedit-out cannot be created or written"),
])
@pytest.mark.parametrize("command", ["edit", "demo"])
def test_edit_and_demo_check_arguments_before_loading(command, extra, message, tmp_path,
                                                      capsys, no_loading):
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "empty.png")
    red = str(_red_square_png(tmp_path / "red.png"))
    (tmp_path / "taken" / "report.json").mkdir(parents=True)
    extra = [arg.format(empty=tmp_path / "empty.png", red=red, taken=tmp_path / "taken")
             for arg in extra]
    _save_vae_config(tmp_path, levels=4)      # what --size is checked against for edit
    (tmp_path / "scheduler").mkdir()          # ... and --steps
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}))
    base = (["edit", "--pipeline", str(tmp_path), "--prompt", "a", "--edit", "b"]
            if command == "edit" else ["demo"])
    assert main(base + ["--out", str(tmp_path / "out")] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--prompt", "--edit"])
def test_the_shapes_demo_refuses_a_caption_outside_its_grammar_before_loading(
        flag, tmp_path, capsys, no_loading):
    """The shapes model's byte-level tokenizer takes any text, so a misspelt colour would
    run and draw shapes unrelated to it."""
    typo = shapes.DEMO_EDIT.replace("yellow", "yelow")
    assert main(["demo", flag, typo, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{flag} is not a caption the 'shapes' model knows" in err
    assert "colours red, yellow, green" in err and "Traceback" not in err
    # A comma makes other tokens than the model learnt; case and spacing do not.
    assert main(["demo", flag, shapes.DEMO_EDIT.replace(" and", ", and"), "--out",
                 str(tmp_path / "out")]) == 2
    assert "where the model learnt" in capsys.readouterr().err
    shapes.check_caption(flag, "  " + shapes.DEMO_EDIT.upper().replace(" ", "  "))


def _save_vae_config(folder, levels: int) -> None:
    """A saved pipeline's vae/config.json as far as --size needs it: its VAE factor is
    2 ** (levels - 1)."""
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(json.dumps(
        {"_class_name": "AutoencoderKL", "block_out_channels": [16] * levels}))


@pytest.mark.parametrize("argv, size, factor", [
    (["demo", "--model", "sd15-tiny"], 100, 8),    # zoo pipelines: 8x VAE, as in SD
    (["demo"], 66, 4),                             # the shapes model's VAE downsamples 4x
    (["demo"], 68, 4),     # whole latent pixels there, but the pipelines take multiples of 8
    (["edit", "--pipeline", "{folder}", "--prompt", "a", "--edit", "b"], 100, 8),
])
def test_size_must_be_a_multiple_of_the_vae_factor_and_8_before_loading(argv, size, factor,
                                                                        tmp_path, capsys,
                                                                        no_loading):
    _save_vae_config(tmp_path, levels={8: 4, 4: 3}[factor])
    argv = [arg.format(folder=tmp_path) for arg in argv]
    assert main(argv + ["--size", str(size), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    lower = size - size % 8
    assert (f"--size {size} is not a multiple of 8 (whole latent pixels of {factor}x{factor} "
            "pixels" in err and f"e.g. --size {lower} or --size {lower + 8}" in err)


def test_mask_mode_with_the_random_weight_demo_box_is_accepted(tmp_path, monkeypatch):
    """The random-weight demo edits its default box, a user mask: --mask-mode applies."""
    class Loaded(Exception):
        pass

    def loaded(name):
        raise Loaded    # the arguments passed their checks

    monkeypatch.setattr(zoo, "pipeline", loaded)
    with pytest.raises(Loaded):
        main(["demo", "--model", "sd15-tiny", "--mask-mode", "intersect", "--out",
              str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_random_weight_demo_names_its_own_box_not_the_user(tmp_path, capsys, no_loading):
    """No --mask or --mask-box given: the message that refuses an estimator beside the box
    says the box is the demo's, not one the user passed."""
    assert main(["demo", "--model", "sd15-tiny", "--mask-estimator", "x0", "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert ("--mask-estimator x0 has nothing to do: the user mask (the demo's own --mask-box "
            "0.4,0.4,0.6,0.6, which it edits where a random-weight model gives the automatic "
            "mask nothing to localise)") in err
    assert "--mask-mode intersect" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--model", "nosuch"], "unknown pipeline name 'nosuch'"),
    (["edit", "--pipeline", "{missing}", "--prompt", "a", "--edit", "b"], "is not a folder"),
])
def test_a_command_failing_on_its_pipeline_creates_no_output_folder(argv, message, tmp_path,
                                                                     capsys):
    out = tmp_path / "out" / "nested"
    argv = [arg.format(missing=tmp_path / "missing") for arg in argv]
    assert main(argv + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out, message", [
    ("{tmp}/missing/x.json", "is not an existing folder (dump creates no folders)"),
    ("{tmp}", "is a folder; pass a file path such as"),
    ("", "--out is empty; pass a file path such as graph.txt"),
    # Not writable even for root (os.access would say yes there).
    ("/proc/fisedit-dump.json", "cannot be written: /proc is not writable"),
])
def test_dump_checks_its_out_file_before_the_capture(out, message, tmp_path, capsys,
                                                     monkeypatch):
    from fisedit_compiler import inspect

    def captured(*args, **kwargs):
        raise AssertionError("captured before --out was checked")

    monkeypatch.setattr(inspect, "dump", captured)
    out = out.format(tmp=tmp_path)
    assert main(["dump", "--model", "sd15-tiny", "--out", out, "--format", "json"]) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out}" in err and message in err
    assert not (tmp_path / "missing").exists()


def test_dump_checks_the_mask_size_before_building_the_unet(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(zoo, "unet", lambda *args, **kwargs: pytest.fail("built"))
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(tmp_path / "m10.png")
    assert main(["dump", "--model", "sd15-tiny", "--stage", "sparse", "--mask",
                 str(tmp_path / "m10.png")]) == 2
    assert "is 10x10 pixels; it must be the image size or the latent size 16x16" in \
        capsys.readouterr().err


def test_a_device_error_quotes_one_sentence_of_torch(monkeypatch):
    """Torch appends its table of dispatch backends to some device errors (MPS on Linux)."""
    from fisedit_compiler.edit_flow.commands import torch_device

    def absent(*args, **kwargs):
        raise RuntimeError("Could not run 'aten::empty' with arguments from the 'MPS' backend. "
                           "This could be because ...\nbackends: [CPU, Meta, ...]")

    monkeypatch.setattr(torch, "empty", absent)
    with pytest.raises(FiseditError, match=r"--device 'cpu' cannot be used here \(Could not run "
                                           r"'aten::empty' with arguments from the 'MPS' "
                                           r"backend\); leave --device out"):
        torch_device("cpu")


def test_dump_writes_over_an_existing_file_in_a_folder_that_takes_no_new_ones(
        tmp_path, capsys, monkeypatch):
    """An existing --out file is tried by opening it, not by making a file beside it."""
    import tempfile

    from fisedit_compiler import inspect

    out = tmp_path / "graph.json"
    out.write_text("old")

    def no_new_files(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_new_files)
    monkeypatch.setattr(inspect, "dump", lambda *args, **kwargs: "{}\n")
    assert main(["dump", "--model", "sd15-tiny", "--format", "json", "--out", str(out)]) == 0
    assert out.read_text() == "{}\n"


def test_dump_names_its_batch_option(capsys, monkeypatch):
    from fisedit_compiler import inspect

    monkeypatch.setattr(inspect, "dump", lambda *args, **kwargs: pytest.fail("captured"))
    assert main(["dump", "--model", "sd15-tiny", "--batch", "0"]) == 2
    assert "--batch 0 is out of range" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_device_cuda_without_cuda_is_refused_before_loading(tmp_path, capsys, no_loading):
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device 'cuda' cannot be used here" in capsys.readouterr().err


def test_an_rgb_mask_png_marks_its_coloured_pixels(tmp_path):
    from fisedit_compiler.execution.plan import load_mask_png

    mask = load_mask_png(str(_red_square_png(tmp_path / "red.png")), (16, 16))
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[1:3, 1:3] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("change, message", [
    (lambda index: index.pop("_class_name"), "has no _class_name"),
    (lambda index: index.update(_class_name="MyCustomPipeline"),
     "MyCustomPipeline, which is not a diffusers pipeline"),
    (lambda index: index.update(scheduler=["my_scheduler", "MyScheduler"]),
     "component scheduler is my_scheduler.MyScheduler"),
])
def test_unloadable_pipeline_folders_are_exit_2(saved_pipeline, tmp_path, capsys, change,
                                                message):
    folder = tmp_path / "custom"
    shutil.copytree(saved_pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    change(index)
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["dump", "--pipeline", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_dump_out_says_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "dump.txt"
    assert main(["dump", "--model", "sd15-tiny", "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and out.stat().st_size > 0


def test_help_texts_cite_nothing_missing_and_show_no_markup(capsys):
    for command in ("dump", "edit", "demo", "bench"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "``" not in text and "DESIGN" not in text, command


# The user mask is made at latent size, and its size checked, before a pipeline is loaded: the
# sizes come from the saved configs (or the zoo's), and the message names the image size.

def _save_unet_config(folder, sample_size: int) -> None:
    (folder / "unet").mkdir(exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "sample_size": sample_size}))


def _mask_png(path, size: int, box: slice):
    from PIL import Image

    pixels = np.zeros((size, size), dtype=np.uint8)
    pixels[box, box] = 255
    Image.fromarray(pixels).save(path)
    return str(path)


_EDIT = ["edit", "--pipeline", "{folder}", "--prompt", "a", "--edit", "b"]


@pytest.mark.parametrize("argv, images", [
    (["demo"], "64x64 pixels here (the pipeline's default size), so draw the mask at 64x64"),
    (["demo", "--model", "sd15-tiny"], "128x128 pixels here (--size 128)"),
    (_EDIT, "128x128 pixels here (the pipeline's default size)"),
    (_EDIT + ["--size", "64"], "64x64 pixels here (--size 64), so draw the mask at 64x64"),
])
def test_a_mask_of_the_wrong_size_is_refused_before_loading(argv, images, tmp_path, capsys,
                                                            no_loading):
    _save_vae_config(tmp_path, levels=4)
    _save_unet_config(tmp_path, sample_size=16)
    mask = _mask_png(tmp_path / "m10.png", 10, slice(2, 5))
    argv = [arg.format(folder=tmp_path) for arg in argv]
    assert main(argv + ["--mask", mask, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"the mask {mask} is 10x10 pixels; it must be the image size" in err
    assert f"the images are {images}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_user_mask_is_made_before_loading(tmp_path, no_loading):
    from fisedit_compiler.cli import build_parser

    _save_vae_config(tmp_path, levels=4)
    _save_unet_config(tmp_path, sample_size=16)
    argv = ["edit", "--pipeline", str(tmp_path), "--prompt", "a", "--edit", "b", "--out",
            str(tmp_path / "out"), "--mask", _mask_png(tmp_path / "m.png", 128, slice(16, 32))]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[2:4, 2:4] = True                             # 8 pixels per latent pixel
    args = build_parser().parse_args(argv)
    vae, unet = (commands.read_saved_config(tmp_path, name) for name in ("vae", "unet"))
    commands._check_args(args, vae, unet, None)
    assert torch.equal(args.user_mask, expected)
    # A box too, at the latent size of --size.
    args = build_parser().parse_args(argv[:-2] + ["--mask-box", "0,0,0.5,0.5", "--size", "64"])
    commands._check_args(args, vae, unet, None)
    assert args.user_mask.shape == (8, 8) and int(args.user_mask.sum()) == 16
    # Where the saved configs do not tell the size, the mask is made after loading.
    args = build_parser().parse_args(argv)
    commands._check_args(args, vae, None, None)
    assert args.user_mask is None and args.mask_pixels.shape == (128, 128)


def test_a_saved_pipeline_of_another_kind_is_refused_before_loading(saved_pipeline, tmp_path,
                                                                    no_loading, capsys):
    """An img2img pipeline saved in the folder: refused from its model index, not after
    loading every component (minutes at SD size)."""
    folder = tmp_path / "img2img"
    shutil.copytree(saved_pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["edit", "--pipeline", str(folder), "--prompt", "a", "--edit", "b",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "got StableDiffusionImg2ImgPipeline in" in err and "text-to-image pipeline" in err


def test_a_mask_at_another_multiple_of_the_latent_is_refused(tmp_path, capsys, no_loading):
    """The shapes demo's images are 64 px (latent 16, 4 px per latent pixel): a 128 px mask
    was drawn for other images, so it is refused rather than pooled down to fit."""
    big = _red_square_png(tmp_path / "big.png", size=128)
    assert main(["demo", "--mask", str(big), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is 128x128 pixels; it must be the image size 64x64 or the latent size 16x16" in err
    assert "draw the mask at 64x64" in err


@pytest.mark.parametrize("command", ["dump", "demo"])
def test_sizes_past_any_use_are_refused_before_building(command, tmp_path, capsys, no_loading):
    """An extra digit in --size or --batch would build the model and run until memory runs
    out; refused first, with the largest value taken."""
    # (64001 is no multiple of 8 either: the bound comes first, since a multiple suggested
    # past it would be refused in turn.)
    argv = (["dump", "--model", "sd15-tiny", "--batch", "1000000000"] if command == "dump"
            else ["demo", "--size", "64001", "--out", str(tmp_path / "out")])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert ("--batch 1000000000 is out of range" in err if command == "dump" else
            "--size 64001 is more than 8x the pipeline's default 64 px" in err
            and "pass at most --size 512" in err)


@pytest.mark.parametrize("argv", [
    ["edit", "--pipeline", "{folder}", "--prompt", "a red circle", "--edit", "a red circle"],
    ["demo", "--edit", shapes.DEMO_PROMPT]])
def test_an_edit_prompt_equal_to_the_prompt_is_refused_before_loading(argv, tmp_path, capsys,
                                                                       no_loading):
    """EditSession would generate, then find nothing to edit (and the report claimed a
    speedup for it)."""
    argv = [arg.format(folder=tmp_path) for arg in argv]
    assert main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--edit is --prompt (" in err and "the edit would change nothing" in err


def test_outputs_are_written_all_or_none(tmp_path):
    """A failure while writing (a full disk) leaves the folder as it was: no mix of new files
    and an earlier run's, no temporary files."""
    (tmp_path / "a.txt").write_text("old")

    def failing(path):
        raise OSError(28, "No space left on device")

    with pytest.raises(FiseditError, match="--out .*could not be written \\(No space left on "
                                           "device\\); nothing was written there"):
        commands.write_outputs("--out", tmp_path, {
            "a.txt": lambda path: Path(path).write_text("new"), "b.txt": failing})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"
    # A folder made for the outputs goes again when they fail.
    with pytest.raises(FiseditError, match="nothing was written there"):
        commands.write_outputs("--out", tmp_path / "made" / "here", {"b.txt": failing})
    assert not (tmp_path / "made").exists()
    commands.write_outputs("--out", tmp_path / "new", {
        "a.txt": lambda path: Path(path).write_text("new")})
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["a.txt"]
    # The mode of any new file, not the temporary file's owner-only 0o600.
    umask = os.umask(0o022)
    try:
        commands.write_outputs("--out", tmp_path / "shared", {
            "a.txt": lambda path: Path(path).write_text("new")})
    finally:
        os.umask(umask)
    assert (tmp_path / "shared" / "a.txt").stat().st_mode & 0o777 == 0o644


def test_a_failed_dump_keeps_the_earlier_file_whole(tmp_path, capsys, monkeypatch):
    """dump --out writes through a temporary file: a full disk left a cut-off file in place
    of the earlier dump."""
    out = tmp_path / "graph.txt"
    out.write_text("an earlier dump")
    monkeypatch.setattr(fc_inspect, "dump", lambda *args, **kwargs: "a new dump")

    write_text = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        write_text(self, text[:3], *args, **kwargs)         # as far as the disk took it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(["dump", "--model", "sd15-tiny", "--out", str(out)]) == 2
    monkeypatch.undo()
    assert "graph.txt could not be written (No space left on device)" in \
        capsys.readouterr().err
    assert out.read_text() == "an earlier dump" and os.listdir(tmp_path) == ["graph.txt"]


def test_dump_writes_through_a_link_or_device_and_keeps_a_files_mode(tmp_path, monkeypatch):
    """Only a regular file is replaced through a temporary file: a link is written through
    (replacing it would leave its target old), a device such as /dev/null is written to; a
    replaced file keeps its mode (a private dump stays private)."""
    monkeypatch.setattr(fc_inspect, "dump", lambda *args, **kwargs: "a new dump")
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert main(["dump", "--model", "sd15-tiny", "--out", str(link)]) == 0
    assert link.is_symlink() and target.read_text() == "a new dump"
    # (Asked, not run: were it replaced, the host's /dev/null would be a file.)
    assert _check_out_file(os.devnull) is False and _check_out_file(str(target)) is True
    target.chmod(0o600)
    assert main(["dump", "--model", "sd15-tiny", "--out", str(target)]) == 0
    assert target.stat().st_mode & 0o777 == 0o600 and target.read_text() == "a new dump"


def test_a_saved_scheduler_the_session_cannot_drive_is_refused_before_loading(
        saved_pipeline, tmp_path, capsys, monkeypatch):
    """SD 1.5 is saved with PNDM: refused from its saved config, with the option that runs it
    (a CLI user cannot set pipe.scheduler); with --scheduler it loads with that one."""
    folder = tmp_path / "pndm"
    shutil.copytree(saved_pipeline, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["_class_name"] = "PNDMScheduler"
    config_file.write_text(json.dumps(config))
    argv = ["edit", "--pipeline", str(folder), "--prompt", "a", "--edit", "b", "--out",
            str(tmp_path / "out")]
    with monkeypatch.context() as patch:
        patch.setattr(zoo, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
        assert main(argv) == 2
        assert main(["app", "--pipeline", str(folder), "--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert err.count("is saved with PNDMScheduler, which EditSession does not drive") == 2
    assert "pass --scheduler DPMSolverMultistepScheduler" in err
    pipe = commands.load_with_scheduler(folder, "DDIMScheduler")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.num_train_timesteps == config["num_train_timesteps"]
    assert main(["app", "--model", "shapes", "--scheduler", "DDIMScheduler", "--port",
                 str(_free_port())]) == 2
    assert "--scheduler replaces a saved pipeline's scheduler" in capsys.readouterr().err


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]



@pytest.mark.parametrize("entry, listed", [
    ("X", "'X', not \\[library, class\\]"), (["diffusers", None], "not \\[library, class\\]"),
    (["diffusers", "UNet2DConditionModel", "x"], "not \\[library, class\\]"),
    ([None, None], "lists none"),
])
def test_dump_pipeline_names_a_malformed_unet_entry(saved_pipeline, tmp_path, capsys, entry,
                                                    listed):
    folder = tmp_path / "odd"
    shutil.copytree(saved_pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["dump", "--pipeline", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "has no unet" in err and re.search(listed, err) and "Traceback" not in err
