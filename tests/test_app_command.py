"""``fisedit-compiler app``: the command serves the page on 127.0.0.1, offline, on the CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from fisedit_compiler import cli

pytest.importorskip("gradio")


def test_a_bad_budget_is_refused_before_loading(capsys):
    assert cli.main(["app", "--memory-budget-mib", "0"]) == 2
    assert "--memory-budget-mib must be positive" in capsys.readouterr().err


def test_the_command_serves_the_page_on_localhost():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # As a user runs it: no analytics setting of ours; the command turns analytics off.
    env = {key: value for key, value in os.environ.items()
           if key != "GRADIO_ANALYTICS_ENABLED"}
    server = subprocess.Popen([sys.executable, "-m", "fisedit_compiler.cli", "app", "--port",
                               str(port), "--device", "cpu"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        config = None
        while config is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config",
                                            timeout=5) as response:
                    config = json.load(response)
            except OSError:
                time.sleep(1)
        assert config is not None, f"the app did not come up:\n{_output(server)}"
        assert config["analytics_enabled"] is False
        assert "fisedit-compiler" in json.dumps(config["components"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def _output(server) -> str:
    server.terminate()
    return server.communicate(timeout=30)[0]


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_a_bad_port_is_refused_before_loading(port, capsys, monkeypatch):
    from fisedit_compiler import zoo

    def loaded(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before --port was checked")

    monkeypatch.setattr(zoo, "pipeline", loaded)
    assert cli.main(["app", "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"--port {port} is out of range: it must satisfy 1 <= --port <= 65535" in err


def test_a_port_in_use_is_refused_before_loading(capsys, monkeypatch):
    from fisedit_compiler import zoo

    def no_loading(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before --port was checked")

    monkeypatch.setattr(zoo, "pipeline", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["app", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port} cannot be used on 127.0.0.1" in err and "another --port" in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "nosuch"], "unknown pipeline name 'nosuch'; choose one of"),
    (["--pipeline", "{missing}"], "is not a folder; pass the folder a pipeline was saved to"),
    (["--device", "nonsense"], "--device 'nonsense' cannot be used here"),
])
def test_the_model_and_device_are_checked_before_gradio_is_imported(argv, message, capsys,
                                                                    monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)     # importing it would now fail
    argv = [arg.format(missing=tmp_path / "missing") for arg in argv]
    assert cli.main(["app"] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "gradio" not in err
