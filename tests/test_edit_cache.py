"""EditCache: the device memory budget, offloaded steps, prefetch, and edits that read them."""

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo


@pytest.fixture(scope="module")
def setup():
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    steps = [zoo.example_inputs(unet, batch=2, seed=step, timestep=900 - 100 * step)
             for step in range(3)]
    reference = engine.new_cache(3)
    for step, inputs in enumerate(steps):
        engine.record(reference, step, **inputs)
    return engine, steps, reference


def test_steps_over_the_budget_are_offloaded(setup):
    engine, steps, reference = setup
    per_step = reference.nbytes() // 3
    cache = engine.new_cache(3, device_budget_bytes=int(per_step * 1.5))
    for step, inputs in enumerate(steps):
        engine.record(cache, step, **inputs)
    assert cache.offloaded == {1, 2}                    # the first step fits, later ones not
    assert cache.device_nbytes() == per_step and cache.host_nbytes() == 2 * per_step
    assert cache.nbytes() == reference.nbytes()
    assert "2 offloaded" in repr(cache)


def test_edits_of_offloaded_steps_equal_edits_of_kept_ones(setup):
    engine, steps, reference = setup
    cache = engine.new_cache(3, device_budget_bytes=0)   # every step offloaded
    for step, inputs in enumerate(steps):
        engine.record(cache, step, **inputs)
    assert cache.offloaded == {0, 1, 2} and cache.device_nbytes() == 0
    plan = engine.plan(bench.blob_mask((16, 16), 0.1))
    for step, inputs in enumerate(steps):
        edited = bench.edited_inputs(inputs, plan.raw)
        kept = engine.edit(reference, step, plan=plan, **edited)
        assert torch.equal(engine.edit(cache, step, plan=plan, **edited), kept)


def _step_0_recorded(setup, num_steps: int, **budget):
    """A cache of ``num_steps`` steps with step 0 recorded, and the key of its output."""
    engine, steps, _ = setup
    cache = engine.new_cache(num_steps, **budget)
    engine.record(cache, 0, **steps[0])
    return cache, engine.program(steps[0]).output_key


def test_replace_keeps_a_step_where_it_is(setup):
    engine, steps, _ = setup
    cache, key = _step_0_recorded(setup, 3, device_budget_bytes=0)
    value = torch.randn_like(cache.steps[0][key])
    cache.replace(0, key, value)
    assert torch.equal(cache.steps[0][key], value) and 0 in cache.offloaded
    engine.record(cache, 0, **steps[0])                  # re-recording replaces the step
    assert not torch.equal(cache.steps[0][key], value)


def test_replace_writes_a_step_recorded_under_inference_mode(setup):
    """A step recorded under ``torch.inference_mode`` holds inference tensors, which refuse
    writes outside that mode: ``replace`` still takes a value there, and edits read it."""
    engine, steps, _ = setup
    cache = engine.new_cache(1)
    with torch.inference_mode():
        engine.record(cache, 0, **steps[0])
    key = engine.program(steps[0]).output_key
    value = torch.randn_like(cache.steps[0][key])
    cache.replace(0, key, value)
    assert torch.equal(cache.steps[0][key], value)
    empty = engine.plan(torch.zeros(16, 16, dtype=torch.bool))
    assert torch.equal(engine.edit(cache, 0, plan=empty, **steps[0]), value)


def test_a_shared_step_is_its_source_step_in_one_buffer(setup):
    """``share_step``: the step edits as its source does (values and timestep), the buffer is
    held once, and an edit pass over shared steps is the benchmark's (``bench.pass_cache``)."""
    engine, steps, reference = setup
    cache = bench.pass_cache(engine, steps[1], 3)
    assert cache.steps[2] is cache.steps[0] and cache.nbytes() == reference.nbytes() // 3
    plan = engine.plan(bench.blob_mask((16, 16), 0.1))
    edited = bench.edited_inputs(steps[1], plan.raw)
    expected = engine.edit(reference, 1, plan=plan, **edited)
    edit = bench.edit_pass(engine, cache, plan, edited)
    assert all(torch.equal(edit(), expected) for _ in range(3))
    assert cache.last_edit[1] == 2, "the three calls were one pass"
    with pytest.raises(fc.FiseditError, match="timestep"):
        engine.edit(cache, 0, plan=plan, **dict(edited, timestep=steps[0]["timestep"]))
    with pytest.raises(fc.FiseditError, match="step 5 has not been recorded"):
        engine.new_cache(6).share_step(1, 5)


def test_a_negative_budget_is_refused(setup):
    engine, _, _ = setup
    with pytest.raises(fc.FiseditError, match="device_budget_bytes"):
        engine.new_cache(3, device_budget_bytes=-1)


@pytest.mark.gpu
def test_offloaded_steps_are_pinned_and_prefetched_on_cuda():
    unet = zoo.unet("sd15-tiny", device="cuda")
    engine = fc.compile(unet)
    steps = [zoo.example_inputs(unet, batch=2, seed=s, timestep=900 - 100 * s) for s in range(2)]
    kept, offloaded = engine.new_cache(2), engine.new_cache(2, device_budget_bytes=0)
    for step, inputs in enumerate(steps):
        engine.record(kept, step, **inputs)
        engine.record(offloaded, step, **inputs)
    key = engine.program(steps[0]).output_key
    assert offloaded.steps[1][key].is_pinned()
    plan = engine.plan(bench.blob_mask((16, 16), 0.1))
    for step, inputs in enumerate(steps):                # step 0's edit prefetches step 1
        edited = bench.edited_inputs(inputs, plan.raw)
        assert torch.equal(engine.edit(offloaded, step, plan=plan, **edited),
                           engine.edit(kept, step, plan=plan, **edited))


def test_a_step_is_packed_into_one_buffer_keeping_values_and_strides():
    from fisedit_compiler.engine.edit_cache import StepStore, StoreLayout

    base = torch.randn(2, 8, 5, 3)
    store = {"contiguous": torch.randn(3, 7),
             "channels_last": base.to(memory_format=torch.channels_last),
             "transposed_slice": base[:, ::2].transpose(1, 3),      # does not fill its span
             "half": torch.randn(5).half(), "scalar": torch.tensor(3.0),
             "norm": {"mean": torch.randn(2, 4), "tile_sum": torch.randn(2, 4, 9)}}
    packed = StoreLayout(store).pack(store)
    views = [packed["contiguous"], packed["channels_last"], packed["transposed_slice"],
             packed["half"], packed["scalar"], packed["norm"]["mean"], packed["norm"]["tile_sum"]]
    originals = [store["contiguous"], store["channels_last"], store["transposed_slice"],
                 store["half"], store["scalar"], store["norm"]["mean"], store["norm"]["tile_sum"]]
    for view, original in zip(views, originals):
        assert torch.equal(view, original) and view.dtype == original.dtype
        assert view.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()
        assert view.data_ptr() % 64 == 0
    assert packed["channels_last"].stride() == store["channels_last"].stride()
    copy = StepStore(packed.buffer.clone(), packed.layout)   # every value at new places
    assert torch.equal(copy["norm"]["tile_sum"], store["norm"]["tile_sum"])
    assert copy["half"].data_ptr() != packed["half"].data_ptr()


def test_values_read_in_place_are_laid_out_after_the_rest():
    """Keys read at a CUDA graph's recorded shift go last, so the rest, which its static store
    copies, is one run from the buffer's start (``span_without``); values and strides stay."""
    from fisedit_compiler.engine.edit_cache import StoreLayout

    store = {"conv_input": torch.randn(2, 8, 5, 3), "stats": {"mean": torch.randn(2, 4)},
             "key": torch.randn(2, 9, 40).half(), "small": torch.randn(3)}
    in_place = {"conv_input", "key"}
    layout = StoreLayout(store, channels_last={"conv_input"}, in_place=in_place)
    packed = layout.pack(store)
    copied = layout.span_without(in_place)
    for path in (("stats", "mean"), ("small",)):
        view = packed[path[0]] if len(path) == 1 else packed[path[0]][path[1]]
        assert view.data_ptr() + view.numel() * view.element_size() <= \
            packed.buffer.data_ptr() + copied
    for key in in_place:
        assert packed[key].data_ptr() >= packed.buffer.data_ptr() + copied
        assert torch.equal(packed[key], store[key])
    assert torch.equal(packed["stats"]["mean"], store["stats"]["mean"])
    assert packed["conv_input"].is_contiguous(memory_format=torch.channels_last)
    assert copied < layout.span_without(()) <= layout.nbytes
    assert layout.span_without(set(store)) == 0 < copied < layout.nbytes
    assert layout.matches(store)        # the order of the values is the store's still


def test_replace_refuses_a_value_of_another_shape(setup):
    engine, steps, _ = setup
    cache, key = _step_0_recorded(setup, 1)
    before = cache.steps[0][key].clone()
    with pytest.raises(fc.FiseditError, match="cannot replace"):
        cache.replace(0, key, torch.zeros(3))
    assert torch.equal(cache.steps[0][key], before)


def test_unknown_steps_and_keys_are_refused_naming_the_recorded_ones(setup):
    engine, steps, _ = setup
    cache, key = _step_0_recorded(setup, 3)
    value = cache.steps[0][key].clone()
    with pytest.raises(fc.FiseditError, match=r"step 2 has not been recorded \(recorded steps: "
                                              r"\[0\]\); record it with engine.record"):
        cache.store_on(2, value.device)
    with pytest.raises(fc.FiseditError, match=r"step 2 has not been recorded"):
        cache.replace(2, key, value)
    with pytest.raises(fc.FiseditError, match="step must be an int"):
        cache.store_on("0", value.device)
    with pytest.raises(fc.FiseditError, match=r"step 0 has no recorded value 'nope'; its keys "
                                              r"are .*in all: list\(cache.steps\[0\]\)"):
        cache.replace(0, "nope", value)
    assert torch.equal(cache.steps[0][key], value)


def test_replace_refuses_a_value_that_does_not_match_and_changes_nothing(setup):
    engine, steps, _ = setup
    cache, key = _step_0_recorded(setup, 1, device_budget_bytes=0)   # offloaded: on the host
    recorded = cache.steps[0][key]
    before = recorded.clone()
    for value, message in [(before.double(), "cannot replace.*recorded .* float32, got .* "
                                              "float64"),
                           (before.tolist(), "cannot replace.*got list"),
                           (torch.empty_like(before, device="meta"),
                            "recorded on cpu, got a value on meta; move it with")]:
        with pytest.raises(fc.FiseditError, match=message):
            cache.replace(0, key, value)
        assert torch.equal(cache.steps[0][key], before)
    value = torch.randn_like(before, requires_grad=True)
    cache.replace(0, key, value)
    assert torch.equal(cache.steps[0][key], value) and not cache.steps[0][key].requires_grad


def test_resize_refuses_to_drop_recorded_steps(setup):
    engine, steps, _ = setup
    cache = engine.new_cache(1)
    cache.resize(3)
    for step in range(2):
        engine.record(cache, step, **steps[step])
    with pytest.raises(fc.FiseditError, match=r"cannot resize this cache to 1 steps: it holds "
                                              r"recorded steps \[0, 1\].*at least 2"):
        cache.resize(1)
    assert cache.num_steps == 3
    cache.resize(2)                  # to the steps recorded, as a recording finishes
    assert cache.num_steps == 2 and sorted(cache.steps) == [0, 1]


def test_a_failed_put_leaves_the_cache_as_it_was(setup, monkeypatch):
    from fisedit_compiler.engine.edit_cache import StoreLayout

    engine, steps, _ = setup
    cache = engine.new_cache(1)
    engine.record(cache, 0, **steps[0])
    kept = cache.steps[0]

    def out_of_memory(store):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cache.layout, "pack", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.put(0, dict(kept))
    assert cache.steps[0] is kept and not cache.offloaded
    fresh = engine.new_cache(1)
    monkeypatch.setattr(StoreLayout, "pack",
                        lambda self, store: out_of_memory(store))
    with pytest.raises(RuntimeError, match="out of memory"):
        fresh.put(0, dict(kept))
    assert fresh.layout is None and fresh.device is None and not fresh.steps
