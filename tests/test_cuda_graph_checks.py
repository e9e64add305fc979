"""engine.cuda_graph's checks on what a captured step is given, on the CPU: ``CapturedSteps``
with a stand-in for the captured graph (its replay runs the step again on the static
buffers). The graphs themselves are tested on the GPU in test_cuda_graph.py."""

from types import SimpleNamespace

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.engine import cuda_graph
from fisedit_compiler.engine.edit_cache import StoreLayout


@pytest.fixture
def captured(monkeypatch):
    def fake_capture(steps, template):
        output = steps._run(template)
        graph = SimpleNamespace(replay=lambda: output.copy_(steps._run(template)))
        return cuda_graph._Graph(graph, template if template.bucket is not None else None,
                                 output, steps)

    unet = zoo.unet("sd15-tiny")          # diffusers imported before torch.cuda is patched
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(cuda_graph.CapturedSteps, "_capture", fake_capture)
    monkeypatch.setattr(engine, "_uses_graphs", lambda device: True)
    cache = engine.new_cache(2)
    for step in range(2):
        engine.record(cache, step, **inputs)
    plan = engine.plan(bench.blob_mask((16, 16), 0.1), bucketed=True)
    edited = bench.edited_inputs(inputs, plan.raw)
    engine.edit(cache, 0, plan, **edited)
    return engine.captured_steps(**inputs), plan, flatten_inputs(edited), cache


def test_a_capture_takes_inputs_and_recorded_values_together(captured):
    steps, plan, flat, cache = captured
    with pytest.raises(fc.FiseditError, match="inputs and its recorded values together"):
        steps.capture(plan, flat)
    with pytest.raises(fc.FiseditError, match="inputs and its recorded values together"):
        steps.capture(plan, store=cache.steps[1])
    assert steps.capture(plan, flat, cache.steps[1]) is steps.capture(plan)


def test_a_step_of_another_layout_is_refused_and_an_equal_one_taken(captured):
    steps, plan, flat, cache = captured
    other = StoreLayout({"x": torch.zeros(25)})
    with pytest.raises(fc.FiseditError, match="another layout or device"):
        steps.stand_for(other.pack({"x": torch.zeros(25)}))
    # Another cache of the same program: an equal layout in another object.
    step = cache.steps[1]
    copy = StoreLayout.__new__(StoreLayout)
    copy.__dict__.update(step.layout.__dict__, slots=list(step.layout.slots))
    steps.stand_for(type(step)(step.buffer.clone(), copy))
    assert copy in steps._layouts_seen
    assert torch.equal(steps.store.buffer, step.buffer)     # the interpreter copies it all
