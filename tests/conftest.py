"""Shared test setup.

* ``--run-slow`` (or ``FISEDIT_RUN_SLOW=1``) opts in to tests marked ``slow`` (full-size models);
  without it they are skipped.
* Tests marked ``gpu`` are skipped when no CUDA device is available.
* ``traced``: tiny zoo graphs, captured once per session and shared by every test module,
  because one capture takes seconds (the Dynamo frontend up to ~10 s).
* Without CUDA, Triton kernels run in interpreter mode: ``TRITON_INTERPRET=1`` is set here,
  before anything imports triton (it is read at import).
* Every test starts from seeded random generators (torch, Python's ``random``), and hypothesis
  draws the same examples on every run (profile ``deterministic``), so a run's outcome does
  not depend on the draw: a tolerance that one draw in a thousand breaks is found by
  exploring on purpose (``FISEDIT_HYPOTHESIS_PROFILE=explore``: fresh examples each run), not
  by a gate that fails at random.
"""

from __future__ import annotations

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from dataclasses import dataclass

import pytest
import torch.fx as fx
from hypothesis import settings

from fisedit_compiler import zoo
from fisedit_compiler.compiler import pipeline


settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("FISEDIT_HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True)
def seeded_generators():
    """Each test's unseeded draws (``torch.randn`` of test data, ``random``) start from seed 0."""
    torch.manual_seed(0)
    random.seed(0)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="run tests marked slow (full-size models); FISEDIT_RUN_SLOW=1 too")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("FISEDIT_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="full-size model; opt in with --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip_gpu)


@dataclass(frozen=True)
class Traced:
    """A zoo U-Net, the example inputs it was traced on, and the traced graph (do not mutate)."""

    unet: torch.nn.Module
    inputs: dict
    gm: fx.GraphModule


@pytest.fixture(scope="session")
def traced():
    """``traced(name, frontend="export", stage="canonical") -> Traced``, cached per session.

    Each model is built once (seed 0) with one set of inputs (batch 2, seed 0), so graphs of
    the same model from different frontends or stages see the same weights and inputs.
    """
    models: dict[str, tuple] = {}
    graphs: dict[tuple, Traced] = {}

    def get(name: str, frontend: str = "export", stage: str = "canonical") -> Traced:
        if name not in models:
            unet = zoo.unet(name)
            models[name] = (unet, zoo.example_inputs(unet, batch=2, seed=0))
        key = (name, frontend, stage)
        if key not in graphs:
            unet, inputs = models[name]
            graphs[key] = Traced(unet, inputs, pipeline.trace(unet, inputs, frontend, stage))
        return graphs[key]

    return get
