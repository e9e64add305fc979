"""engine.cuda_graph: one captured edit step per capacity bucket serves every mask (GPU).

The CPU side of the same promise (every sparse op at a capacity above its active count, a
template refilled with another plan's tables) is tested in test_plan.py and
test_sparse_ops.py; here the graphs themselves are replayed on the device.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.engine.edit_cache import StoreLayout
from fisedit_compiler.execution.plan import rectangle_mask

pytestmark = pytest.mark.gpu


def random_masks(size, count, seed):
    """Masks of new sizes and places: seeded rectangles of 1-20% and scattered squares."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for index in range(count):
        area = 0.01 + 0.19 * float(torch.rand((), generator=gen))
        if index % 3 == 2:
            masks.append(bench.scattered_mask(size, area, 4, seed=seed + index))
        else:
            masks.append(rectangle_mask(size, area, 1.5 if index % 2 else 1.0, gen))
    return masks


# fp32 on the GPU: the Triton kernels' dots run in TF32 (~5e-4 relative per product), the
# oracle in full fp32.
@pytest.mark.parametrize("name, dtype, tolerance", [("sd15-tiny", torch.float32, 2e-3),
                                                     ("sd15", torch.float16, 2e-2)])
def test_successive_new_masks_replay_prepared_graphs_and_meet_the_oracle(name, dtype, tolerance):
    unet = zoo.unet(name, dtype=dtype, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    eager = engine.with_config(fc.SparseConfig(cuda_graphs=False))   # exact plans, no graphs
    cache, eager_cache = engine.new_cache(), eager.new_cache()
    engine.record(cache, 0, **inputs)
    eager.record(eager_cache, 0, **inputs)
    prepared = engine.prepare(cache, 0, **inputs)
    steps = engine.captured_steps(**inputs)
    assert prepared["graphs_captured"] == len(steps.graphs) == len(
        engine.buckets(engine.program(inputs)))
    assert all(graph is not None for graph in steps.graphs.values()), "no capture failed"
    size = tuple(inputs["sample"].shape[-2:])
    buckets_seen = set()
    for mask in random_masks(size, 8, seed=3):
        plan = engine.plan(mask)
        edited = bench.edited_inputs(inputs, mask)
        actual = engine.edit(cache, 0, plan=plan, **edited)
        expected = fc.oracle.masked_dense(engine, plan, inputs, edited)
        assert bench.relative_error(actual, expected) <= tolerance
        same_kernels = eager.edit(eager_cache, 0, plan=eager.plan(mask), **edited)
        if not plan.full:
            assert bench.relative_error(actual, same_kernels) <= tolerance / 4
        outside = ~plan.levels[0].active
        assert torch.equal(actual[..., outside], cache.steps[0][engine.program(inputs)
                                                                  .output_key][..., outside])
        buckets_seen.add(None if plan.bucket is None else plan.bucket.index)
    assert len(steps.graphs) == prepared["graphs_captured"], "no capture on the edit path"
    assert len(buckets_seen) >= 3, "the masks cover several buckets"


COLD_SCRIPT = textwrap.dedent("""
    import torch, fisedit_compiler as fc
    from fisedit_compiler import bench, zoo
    unet = zoo.unet("sd15", dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    compiled = torch.compile(unet, mode="reduce-overhead")
    for _ in range(3):
        compiled(**inputs)
    engine = fc.compile(unet)
    cache = engine.new_cache()
    engine.record(cache, 0, **inputs)
    worst = 0.0
    for rows, cols in [((46, 57), (40, 53)), ((3, 30), (20, 41)), ((10, 13), (50, 64))]:
        mask = torch.zeros(64, 64, dtype=torch.bool)
        mask[rows[0]:rows[1], cols[0]:cols[1]] = True
        plan = engine.plan(mask)
        edited = bench.edited_inputs(inputs, mask)
        edited["encoder_hidden_states"] = edited["encoder_hidden_states"] + 0.1
        actual = engine.edit(cache, 0, plan=plan, **edited)
        worst = max(worst, bench.relative_error(
            actual, fc.oracle.masked_dense(engine, plan, inputs, edited)))
    print("WORST", worst)
""")


def test_edits_from_a_cold_tuning_cache_after_a_dense_compile(tmp_path):
    """Issue 19: a dense torch.compile with CUDA graphs in the process, an empty tuning cache,
    then edits whose buckets were never captured: each captures on the edit path, and every
    edit meets the oracle (a capture that fails would warn and run without its graph)."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), PYTHONWARNINGS="error::RuntimeWarning")
    done = subprocess.run([sys.executable, "-c", COLD_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    worst = float(done.stdout.split("WORST")[-1])
    assert worst <= 2e-2


AFTER_CAPTURE_SCRIPT = textwrap.dedent("""
    import torch, fisedit_compiler as fc
    from fisedit_compiler import zoo
    pipe = zoo.pipeline("sd15").to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    session = fc.EditSession(pipe)
    # prepare captures the buckets' graphs, then compiles the estimator's dense call under
    # torch.compile with CUDA graphs, whose recording clears cuBLAS's cached workspaces.
    session.generate("a dog on the sofa", seed=0, num_inference_steps=3, output_type="latent")
    mask = torch.zeros(64, 64, dtype=torch.bool)      # 5%: few-row GEMMs
    mask[20:34, 22:37] = True
    edits = [session.edit("a dog on the sofa wearing a hat", mask=mask,
                          output_type="latent").images for _ in range(2)]
    torch.cuda.synchronize()
    print("EQUAL", torch.equal(*edits))
""")


def test_captured_graphs_survive_a_later_torch_compile_cuda_graph():
    """Inductor's CUDA graphs clear cuBLAS's cached workspaces whenever they record: a dense
    graph compiled after a bucket's capture (EditSession's estimator call at generate, a
    probe step, a full-mask edit) freed the workspace the bucket's GEMMs wrote to, and the
    first edit after generate hit an illegal address (session 19: this script failed so with
    the captures' own workspaces patched out, and runs with them). Each capture now has its
    own, in its pool. In a subprocess: an illegal address ends the process's CUDA context."""
    done = subprocess.run([sys.executable, "-c", AFTER_CAPTURE_SCRIPT], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split("EQUAL")[-1].strip() == "True"


def test_weights_written_through_data_reach_the_dense_graph_at_a_pass_start():
    """A write through param.data moves no version counter; a full-mask edit (the compiled
    dense graph, which reads nothing recorded) reads the weights' values at its pass's first
    step (``content_fingerprint``), makes the derived copies again, and computes the U-Net as
    it is now."""
    unet = zoo.unet("sd15-tiny", dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    cache = engine.new_cache()
    engine.record(cache, 0, **inputs)
    full = engine.plan(torch.ones(16, 16, dtype=torch.bool))
    before = engine.edit(cache, 0, plan=full, **inputs)
    weight = unet.down_blocks[0].resnets[0].conv1.weight
    saved = weight.detach().clone()
    weight.data.mul_(1.5)
    try:
        after = engine.edit(cache, 0, plan=full, **inputs)      # step 0 again: a new pass
        assert bench.relative_error(after, before) > 1e-3
        assert bench.relative_error(after, unet(**inputs)[0]) <= 1e-2
    finally:
        weight.data.copy_(saved)


def test_in_place_weight_changes_reach_captured_graphs():
    """A LoRA-style in-place change of a conv weight (packed copy) and of an attention
    projection (grouped copy) after graphs were captured: the compiled dense graph, which
    reads the same copies, follows; recorded again, the next edit finds the weights' versions
    moved, makes the copies again (``refresh_weights``) before its replay, and edits as an
    engine compiled afresh does."""
    unet = zoo.unet("sd15-tiny", dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    mask = bench.blob_mask((16, 16), 0.1).cuda()
    edited = bench.edited_inputs(inputs, mask)

    def edit(engine):
        cache = engine.new_cache()
        engine.record(cache, 0, **inputs)
        return engine.edit(cache, 0, plan=engine.plan(mask), **edited)

    engine = fc.compile(unet)
    before = edit(engine)
    dense_before = engine.dense(**inputs)     # the dense graph reads the same copies
    with torch.no_grad():
        unet.down_blocks[0].resnets[0].conv1.weight.mul_(1.5)
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_v.weight.mul_(1.5)
    dense_after = engine.dense(**inputs)
    assert bench.relative_error(dense_after, dense_before) > 1e-3
    assert bench.relative_error(dense_after, unet(**inputs)[0]) <= 1e-2
    after = edit(engine)
    fresh = edit(fc.compile(unet))
    assert bench.relative_error(after, before) > 1e-3
    assert bench.relative_error(after, fresh) <= 1e-3


def test_pass_constants_load_once_per_pass_and_follow_prompts_and_weights():
    """The text K/V (pass constants) through the captured graphs: computed and loaded into the
    static buffers at a pass's first step, kept by its later steps, reloaded for a new prompt
    and after an in-place change of a text K projection; every step meets the oracle."""
    unet = zoo.unet("sd15-tiny", device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    mask = bench.blob_mask((16, 16), 0.1)
    program = engine.program(inputs)
    text_k = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight

    def edited(shift):
        return dict(bench.edited_inputs(inputs, mask),
                    encoder_hidden_states=inputs["encoder_hidden_states"] + shift)

    def edit_passes(passes):
        cache = engine.new_cache(3)
        for step in range(3):
            engine.record(cache, step, **inputs)
        plan = engine.plan(mask)
        for edited_inputs in passes:
            expected = fc.oracle.masked_dense(engine, plan, inputs, edited_inputs)
            for step in range(3):
                actual = engine.edit(cache, step, plan=plan, **edited_inputs)
                assert bench.relative_error(actual, expected) <= 2e-3

    second = edited(-0.5)
    edit_passes([edited(0.5), second])
    steps = engine.captured_steps(**inputs)
    assert steps.values is not None and "encoder_hidden_states" not in steps.read
    assert engine._pass_values[program.signature].computed == 2
    with torch.no_grad():
        text_k.mul_(1.5)
    try:
        edit_passes([second])       # the same text tensor, recorded again with new weights
    finally:
        with torch.no_grad():
            text_k.div_(1.5)
    # The recording dropped the kept values (a new PassValues); its one pass computed them.
    assert engine._pass_values[program.signature].computed == 1


@pytest.mark.parametrize("budget", [None, 0], ids=["on-device", "offloaded"])
def test_each_replay_reads_its_recorded_step_where_it_lives(budget):
    """The captured step reads the recorded step it replays in place (the kernels' recorded
    shift): the static store holds no copy of those values (they are views of the first step
    loaded), and the steps of a generation, recorded from different inputs and kept on the
    device or offloaded to the host (prefetched copies), give the eager engine's edits, in
    any order, without a write to the recording."""
    unet = zoo.unet("sd15-tiny", device="cuda")
    engine = fc.compile(unet)
    eager = engine.with_config(fc.SparseConfig(cuda_graphs=False))
    mask = bench.blob_mask((16, 16), 0.1)
    recorded = [zoo.example_inputs(unet, batch=2, seed=seed) for seed in range(3)]
    cache, eager_cache = engine.new_cache(3, device_budget_bytes=budget), eager.new_cache(3)
    for step, inputs in enumerate(recorded):
        engine.record(cache, step, **inputs)
        eager.record(eager_cache, step, **inputs)
    assert len(cache.offloaded) == (3 if budget == 0 else 0)
    plan, eager_plan = engine.plan(mask), eager.plan(mask)
    steps = engine.captured_steps(**recorded[0])
    before = [cache.steps[step].buffer.clone() for step in range(3)]
    for order, step in enumerate([0, 2, 1, 0]):
        edited = bench.edited_inputs(recorded[step], mask)
        actual = engine.edit(cache, step, plan=plan, **edited)
        expected = eager.edit(eager_cache, step, plan=eager_plan, **edited)
        assert bench.relative_error(actual, expected) <= 5e-4, (order, step)
        if order == 0:
            size = steps.store.layout.nbytes
            assert steps.in_place and steps.store.buffer.numel() == steps._copied_bytes < size / 2
            assert budget == 0 or steps._base is cache.steps[0].buffer
    assert all(torch.equal(cache.steps[step].buffer, before[step]) for step in range(3))
    if budget == 0:
        # The last edit read a copy of the offloaded step, freed when the edit returned: its
        # graph would replay on freed memory, so it is not handed out without a new step.
        with pytest.raises(fc.FiseditError, match="freed since"):
            steps.capture(plan)
    else:
        assert steps.capture(plan) is not None
    with pytest.raises(fc.FiseditError, match="inputs and its recorded values together"):
        steps.capture(plan, bench.edited_inputs(recorded[0], mask))
    other = StoreLayout({"x": torch.zeros(25, device="cuda")})
    with pytest.raises(fc.FiseditError, match="another layout or device"):
        steps.stand_for(other.pack({"x": torch.zeros(25, device="cuda")}))


def test_module_changes_are_refused_on_the_captured_paths_and_undone_edits_replay():
    """After graphs were captured (a bucket's step, the compiled dense graph, prepare), a
    module change the graphs cannot see (a Parameter replaced, forward chunking switched on)
    is refused by the edit's captured path, the dense path and prepare, before any replay; put
    back, the next edit replays the same graph to the same bits."""
    unet = zoo.unet("sd15-tiny", dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    mask = bench.blob_mask((16, 16), 0.1).cuda()
    edited = bench.edited_inputs(inputs, mask)
    engine = fc.compile(unet)
    cache = engine.new_cache()
    engine.record(cache, 0, **inputs)
    plan = engine.plan(mask)
    before = engine.edit(cache, 0, plan=plan, **edited).clone()
    engine.dense(**inputs)
    conv = unet.down_blocks[0].resnets[0].conv1
    original = conv.weight
    conv.weight = torch.nn.Parameter(original.detach().clone())
    for call in (lambda: engine.edit(cache, 0, plan=engine.plan(mask), **edited),
                 lambda: engine.dense(**inputs),
                 lambda: engine.prepare(cache, 0, **inputs)):
        with pytest.raises(fc.FiseditError, match="changed since it was compiled"):
            call()
    conv.weight = original
    blocks = [module for module in unet.modules() if hasattr(module, "set_chunk_feed_forward")]
    for block in blocks:            # feed-forward chunking, as enable_forward_chunking sets it
        block.set_chunk_feed_forward(1, dim=1)
    with pytest.raises(fc.FiseditError, match="changed since it was compiled"):
        engine.edit(cache, 0, plan=engine.plan(mask), **edited)
    for block in blocks:
        block.set_chunk_feed_forward(None, dim=0)
    after = engine.edit(cache, 0, plan=engine.plan(mask), **edited)
    assert torch.equal(after, before)


def recorded_tiny_engine():
    """An sd15-tiny engine on the GPU with step 0 recorded, and its captured steps."""
    unet = zoo.unet("sd15-tiny", device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet)
    cache = engine.new_cache()
    engine.record(cache, 0, **inputs)
    return engine, cache, inputs, engine.captured_steps(**inputs)


def test_exact_plan_graphs_go_with_their_plan_and_captures_pause_the_collector(monkeypatch):
    """Session 7: an exact plan's graph referred back to its plan, so plans lived until a
    cyclic collection, which could come during a later capture and destroy a graph there,
    invalidating that capture (and, through the allocator, every capture after it)."""
    import gc
    import weakref

    engine, cache, inputs, steps = recorded_tiny_engine()
    size = tuple(inputs["sample"].shape[-2:])
    plan = engine.plan(bench.blob_mask(size, 0.1), bucketed=False)
    engine.edit(cache, 0, plan=plan, **inputs)
    graphs = plan.memo["graphs"]
    assert len(graphs) == 1 and not steps.failed(plan)
    graph = weakref.ref(next(iter(graphs.values())))
    del plan, graphs
    collecting = gc.isenabled()
    gc.disable()
    try:
        # engine.plan keeps its last plan (for a repeated mask): another mask replaces it.
        engine.plan(bench.blob_mask(size, 0.05), bucketed=False)
        assert graph() is None, "freed with its plan, without a collection"
    finally:
        if collecting:
            gc.enable()

    collector_on_in_capture = []
    run = steps.edit

    def watched(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            collector_on_in_capture.append(gc.isenabled())
        return run(*args, **kwargs)

    monkeypatch.setattr(steps, "edit", watched)
    plan = engine.plan(bench.blob_mask(size, 0.02), bucketed=False)
    assert not plan.full, "a plan that runs sparse, so that its edit captures a graph"
    engine.edit(cache, 0, plan=plan, **inputs)
    assert collector_on_in_capture == [False] and gc.isenabled()


def test_a_failed_capture_runs_without_a_graph_and_later_captures_still_work(monkeypatch):
    engine, cache, inputs, steps = recorded_tiny_engine()
    size = tuple(inputs["sample"].shape[-2:])
    run = steps.edit

    def failing(*args, **kwargs):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("simulated capture failure")
        return run(*args, **kwargs)

    monkeypatch.setattr(steps, "edit", failing)
    first = engine.plan(bench.blob_mask(size, 0.1), bucketed=False)
    stream = steps.stream
    with pytest.warns(RuntimeWarning, match="simulated capture failure"):
        expected_first = engine.edit(cache, 0, plan=first, **inputs)
    assert steps.failed(first) and steps.stream is not stream
    monkeypatch.setattr(steps, "edit", run)
    second = engine.plan(bench.blob_mask(size, 0.05), bucketed=False)
    assert not second.full, "a plan that runs sparse, so that its edit captures a graph"
    engine.edit(cache, 0, plan=second, **inputs)
    assert steps.captured(second) and not steps.failed(second)
    assert torch.equal(engine.edit(cache, 0, plan=first, **inputs), expected_first)


def test_a_dense_routed_edit_is_the_dense_step_and_a_sparse_one_checks_the_timestep():
    """A plan that runs every level dense reads nothing recorded: its edit is ``engine.dense``
    of the inputs, without the host synchronisation of the timestep check; a sparse plan still
    refuses a timestep other than the recorded one."""
    engine, cache, inputs, _ = recorded_tiny_engine()
    size = tuple(inputs["sample"].shape[-2:])
    later = dict(inputs, timestep=inputs["timestep"] - 1)
    full = engine.plan(torch.ones(size, dtype=torch.bool))
    assert full.full
    assert torch.equal(engine.edit(cache, 0, plan=full, **later), engine.dense(**later))
    sparse = engine.plan(bench.blob_mask(size, 0.02))
    assert not sparse.full
    with pytest.raises(fc.FiseditError, match="timestep"):
        engine.edit(cache, 0, plan=sparse, **later)


def test_an_edit_pass_synchronises_only_at_its_first_step():
    """As a pipeline runs it (the timesteps views of one device tensor, one plan), an edit
    pass synchronises the host at its first step at most: the later steps' checks (timestep,
    U-Net state) and replays run without one, so a step's host work overlaps the GPU work of
    the step before. A wrong timestep in the middle of a pass is still refused."""
    unet = zoo.unet("sd15-tiny", dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    timesteps = torch.tensor([900, 600, 300, 100], device="cuda")
    engine = fc.compile(unet)
    cache = engine.new_cache(len(timesteps))
    for step, t in enumerate(timesteps):
        engine.record(cache, step, **dict(inputs, timestep=t))
    mask = bench.blob_mask((16, 16), 0.1)
    plan = engine.plan(mask)
    edited = bench.edited_inputs(inputs, mask)
    engine.edit(cache, 0, plan=plan, **dict(edited, timestep=timesteps[0]))   # captures
    edit_timesteps = timesteps.clone()             # the edit's own schedule tensor
    outputs = [engine.edit(cache, 0, plan=plan, **dict(edited, timestep=edit_timesteps[0]))]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2):
            outputs.append(engine.edit(cache, step, plan=plan,
                                       **dict(edited, timestep=edit_timesteps[step])))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    output_key = engine.program(inputs).output_key
    for step, output in enumerate(outputs):
        expected = fc.oracle.masked_dense(engine, plan, dict(inputs, timestep=timesteps[step]),
                                          dict(edited, timestep=timesteps[step]))
        assert bench.relative_error(output, expected) <= 2e-2
        outside = ~plan.levels[0].active.to(output.device)
        assert torch.equal(output[..., outside], cache.steps[step][output_key][..., outside])
    with pytest.raises(fc.FiseditError, match="timestep"):
        engine.edit(cache, 3, plan=plan, **dict(edited, timestep=edit_timesteps[2]))
