"""The command line: ``dump`` end to end, and its errors (exit code 2, one line, no traceback)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fisedit_compiler import zoo
from fisedit_compiler.cli import main

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
