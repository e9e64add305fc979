"""engine.cuda_graph's checks on what a captured step is given, on the CPU: ``CapturedSteps``
with a stand-in for the captured graph (its replay runs the step again on the static
buffers). The graphs themselves are tested on the GPU in test_cuda_graph.py."""

from types import SimpleNamespace

import pytest
import torch
import torch.fx as fx

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.engine import cuda_graph
from fisedit_compiler.engine.edit_cache import StepStore, StoreLayout


def fake_capture(steps, template):
    """A stand-in for a captured graph: its replay runs the step again on the static buffers."""
    output = steps._run(template)
    graph = SimpleNamespace(replay=lambda: output.copy_(steps._run(template)))
    return cuda_graph._Graph(graph, template if template.bucket is not None else None,
                             output, steps)


@pytest.fixture
def captured(monkeypatch):
    unet = zoo.unet("sd15-tiny")          # diffusers imported before torch.cuda is patched
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(cuda_graph.CapturedSteps, "_capture", fake_capture)
    monkeypatch.setattr(engine, "_uses_graphs", lambda device: True)
    cache = engine.new_cache(2)
    for step in range(2):
        engine.record(cache, step, **zoo.example_inputs(unet, batch=2, seed=step))
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


def read_at_shift(recorded, *, recorded_shift):
    """A kernel's read of a recorded value, as lower_kernels passes the shift."""
    from fisedit_compiler.execution.kernels.recorded_shift import read_shifted

    return read_shifted(recorded, recorded_shift)


@pytest.mark.parametrize("in_place, shifted, big_read_otherwise", [
    (("big", "extra"), ("big", "extra"), False),
    (("extra",), ("big", "extra"), True),
    (("big", "extra"), None, False)],
    ids=["read-in-place", "shifted-but-copied", "shifted-keys-untold"])
def test_the_static_store_copies_no_step_and_reads_each_at_its_shift(
        monkeypatch, in_place, shifted, big_read_otherwise):
    """Off the interpreter (where no shift holds between device buffers), the static store's
    in-place values are views of the first step loaded and its own buffer holds only the
    copied values; each step, even one at an address no aligned shift reaches, is read where
    it lives (or from an aligned copy), and no step is written. Where a key read at the shift
    is also read otherwise, and so copied (``lower_kernels`` leaves it out of the in-place
    keys but names it among those read at the shift, ``SHIFTED_KEYS``), the store is a whole
    copy, as the shift then measures from it; so too where a graph does not name the keys it
    reads at the shift. A step graph that reads two values at the shift (``read_shifted``,
    interpreted on the CPU) and a copied one, under the stand-in graph above."""
    from fisedit_compiler.execution import sparse_ops
    from fisedit_compiler.execution.plan import MaskPlan
    from fisedit_compiler.graph_keys import CACHE_INPUT, IN_PLACE_KEYS, PLAN_INPUT, SHIFTED_KEYS

    graph = fx.Graph()
    x, _, cache = (graph.placeholder(name) for name in ("x", PLAN_INPUT, CACHE_INPUT))
    shift = graph.call_function(sparse_ops.cache_shift, (cache,))
    total = x
    for key in ("big", "extra"):
        read = graph.call_function(sparse_ops.cache_read, (cache, key))
        total = graph.call_function(torch.add, (total, graph.call_function(
            read_at_shift, (read,), {"recorded_shift": shift})))
        if key == "big" and big_read_otherwise:
            total = graph.call_function(torch.add, (total, read))
    small = graph.call_function(sparse_ops.cache_read, (cache, "small"))
    graph.output(graph.call_function(torch.add, (total, small)))
    edit = fx.GraphModule(torch.nn.Module(), graph)
    edit.meta[IN_PLACE_KEYS] = frozenset(in_place)
    if shifted is not None:
        edit.meta[SHIFTED_KEYS] = frozenset(shifted)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    monkeypatch.setattr(cuda_graph.CapturedSteps, "_capture", fake_capture)
    monkeypatch.setattr(cuda_graph, "INTERPRET", False)
    layout = StoreLayout({"big": torch.zeros(64), "extra": torch.zeros(64),
                          "small": torch.zeros(1)}, in_place=in_place)
    recorded = [layout.pack({"big": torch.arange(64.0) * (step + 1),
                             "extra": torch.arange(64.0).flip(0) * (step + 3),
                             "small": torch.full((1,), 100.0 * step)}) for step in range(2)]
    before = [store.buffer.clone() for store in recorded]
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1:3, 2:4] = True
    plan = MaskPlan(mask, [(8, 8), (4, 4)], [2, 1], 0, (1.0, 0.0))
    steps = cuda_graph.CapturedSteps(edit)
    inputs = {"x": torch.ones(64)}

    def replay(store):
        graph = steps.capture(plan, inputs, store)
        graph.replay()
        return graph.output.clone()

    def expected(store):
        return 1 + store["big"] * (1 + big_read_otherwise) + store["extra"] + store["small"]

    for store in recorded + [recorded[0]]:
        assert torch.equal(replay(store), expected(store))
    if shifted is not None and not big_read_otherwise:
        assert steps._base is recorded[0].buffer
        assert steps.store.buffer.numel() == steps._copied_bytes < layout.nbytes / 2
        assert steps.store["big"].data_ptr() == recorded[0]["big"].data_ptr()
    else:
        assert steps._base is steps.store.buffer and steps._base.numel() == layout.nbytes
    misaligned = torch.empty(layout.nbytes + 8, dtype=torch.uint8)[8:]
    misaligned.copy_(recorded[1].buffer)
    assert torch.equal(replay(StepStore(misaligned, layout)), expected(recorded[1]))
    assert steps._aligned is not None
    assert torch.equal(replay(recorded[0]), expected(recorded[0]))
    assert all(torch.equal(store.buffer, old) for store, old in zip(recorded, before))
