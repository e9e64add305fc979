"""The engine on its Triton path: the lowered edit graph meets the oracle.

On CPU the kernels run in Triton's interpreter (slow, so one tiny model and one mask); on a GPU
the same check runs at SD1.5 size with CUDA graphs, and the bench helpers are checked here.
"""

import pytest
import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.config import HAS_TRITON
from fisedit_compiler.engine.edit_cache import StepStore
from fisedit_compiler.execution import sparse_ops, triton_ops
from fisedit_compiler.execution.derived_weights import DerivedWeights
from fisedit_compiler.execution.kernels.recorded_shift import SHIFT_ALIGN
from fisedit_compiler.execution.kernels.sparse_conv import pack_weight
from fisedit_compiler.graph_keys import DERIVED_WEIGHTS, IN_PLACE_KEYS, SHIFTED_KEYS
from fisedit_compiler.passes import registry
from fisedit_compiler.passes.lower_kernels import CHANNELS_LAST_KEYS

def edit_and_check(unet, config, mask, tolerance):
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet, config)
    cache = engine.new_cache()
    engine.record(cache, step=0, **inputs)
    plan = engine.plan(mask)
    edited = bench.edited_inputs(inputs, mask)
    actual = engine.edit(cache, step=0, plan=plan, **edited)
    expected = fc.oracle.masked_dense(engine, plan, inputs, edited)
    targets = {node.target for node in engine.program(inputs).edit.graph.nodes}
    assert set(registry.lowerings().values()) <= targets        # lowered to the Triton ops
    derived = getattr(engine.program(inputs).edit, DERIVED_WEIGHTS)  # owned by the program
    assert isinstance(derived, DerivedWeights)
    assert any(entry[3] is pack_weight for entry in derived._entries.values())
    assert bench.relative_error(actual, expected) <= tolerance
    return engine, cache, plan, edited, actual


@pytest.mark.parametrize("conv_method", fc.config.CONV_METHODS)
def test_interpreted_kernels_meet_the_oracle(conv_method):
    unet = zoo.unet("sd15-tiny")
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[5:7, 6:8] = True              # small: the interpreter runs every program in Python
    config = fc.SparseConfig(kernels="triton", conv_method=conv_method)
    engine, cache, *_ = edit_and_check(unet, config, mask, 1e-5)
    convs = [node for node in engine.program(zoo.example_inputs(unet, batch=2)).edit.graph.nodes
             if node.target is triton_ops.sparse_conv2d]
    assert convs and all(node.kwargs["method"] == conv_method for node in convs)
    # The sparse convs' recorded inputs are kept channels-last, the layout their kernel reads
    # fastest; the edit above read them that way.
    keys = engine.program(zoo.example_inputs(unet, batch=2)).edit.meta[CHANNELS_LAST_KEYS]
    assert keys and all(cache.steps[0][key].is_contiguous(memory_format=torch.channels_last)
                        for key in keys)


def test_interpreted_kernels_read_the_recorded_step_at_the_shift():
    """What a CUDA graph's step does, without the graph: the edit graph run on a stand-in
    store (the values copied before a replay, noise where the values read in place lie) whose
    recorded shift points at the recorded step gives the same edit as the step itself. The
    values read in place are the sparse convs' recorded inputs and the self-attentions'
    recorded K/V, and nothing else reads them; every key read at the shift is one of them (so
    a CUDA graph's static store holds no copy of them: a conv's fused group-norm statistics,
    also cache reads, are not read at the shift)."""
    unet = zoo.unet("sd15-tiny")
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[9:11, 3:5] = True
    engine, cache, plan, edited, actual = edit_and_check(
        unet, fc.SparseConfig(kernels="triton"), mask, 1e-5)
    program = engine.program(edited)
    in_place = program.edit.meta[IN_PLACE_KEYS]
    assert program.edit.meta[SHIFTED_KEYS] == in_place
    reads = [node for node in program.edit.graph.nodes if node.target is sparse_ops.cache_read]
    readers = {user.target for read in reads if read.args[1] in in_place for user in read.users}
    assert readers == {triton_ops.sparse_conv2d, triton_ops.sparse_attention}
    assert all(user.kwargs.get("recorded_shift") is not None
               for read in reads if read.args[1] in in_place for user in read.users)
    step = cache.steps[0]
    copied = step.layout.span_without(in_place)
    assert copied < step.layout.nbytes / 2        # the bulk of a step is read in place
    noise = torch.randint(0, 256, step.buffer.shape, dtype=torch.uint8)
    noise[:copied] = step.buffer[:copied]
    shift = torch.tensor([step.buffer.data_ptr() - noise.data_ptr()])
    assert shift.item() % SHIFT_ALIGN == 0
    stand_in = StepStore(noise, step.layout, recorded_shift=shift)
    flat = flatten_inputs(edited)
    with torch.no_grad():
        shifted = engine._edit_step(program, plan, flat, stand_in, cache, graphs=False,
                                      new_pass=True)
    assert torch.equal(shifted, actual)


def test_ops_that_fall_back_to_their_reference_read_the_recorded_values_at_the_shift():
    """A conv into a dense level and an attention under a mask run their torch references;
    given a stand-in recorded tensor and a shift, they read the values at the shift (a copy)
    and equal the same ops given the recorded values themselves."""
    from fisedit_compiler.execution.plan import MaskPlan

    from test_kernels_recorded_shift import stand_in

    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1:4, 2:7] = True
    plan = MaskPlan(mask, [(8, 8), (4, 4)], [2, 1], 0, (1.0, 0.0))   # level 1 dense
    assert not plan[0].dense and plan[1].dense
    gen = torch.Generator().manual_seed(0)
    new, recorded = (torch.randn(2, 6, 8, 8, generator=gen) for _ in range(2))
    weight, bias = torch.randn(5, 6, 3, 3, generator=gen), torch.randn(5, generator=gen)
    x = sparse_ops.gather_positions(new, plan[0], (2, 3))
    conv = (plan, 0, 1, weight, bias, (2, 2), (0, 1, 0, 1), (1, 1), 1)
    (fake,), _, shift = stand_in(recorded)
    torch.testing.assert_close(triton_ops.sparse_conv2d(x, fake, *conv, recorded_shift=shift),
                               triton_ops.sparse_conv2d(x, recorded, *conv))
    active = plan[0].pixels.numel()
    q, k, v = (torch.randn(2, 3, active, 8, generator=gen) for _ in range(3))
    recorded_k, recorded_v = (torch.randn(2, 3, 64, 8, generator=gen) for _ in range(2))
    attn_mask = torch.rand(active, 64, generator=gen) > 0.3
    (fake_k, fake_v), _, shift = stand_in(recorded_k, recorded_v)
    attention = (plan, 0, None, "full", attn_mask)
    torch.testing.assert_close(
        triton_ops.sparse_attention(q, k, v, fake_k, fake_v, *attention, recorded_shift=shift),
        triton_ops.sparse_attention(q, k, v, recorded_k, recorded_v, *attention))


@pytest.mark.parametrize("into_layout", ["contiguous", "transposed", "broadcast"])
def test_linear_accumulate_lowering_adds_in_place_where_it_can(into_layout):
    """Into a contiguous sum of the product's shape the GEMM adds in place (the sum is
    returned); any other sum gets the reference's new tensor, the same values."""
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 5, 6, generator=gen), torch.randn(4, 6, generator=gen)
    into = {"contiguous": torch.randn(2, 5, 4, generator=gen),
            "transposed": torch.randn(2, 4, 5, generator=gen).transpose(1, 2),
            "broadcast": torch.randn(4, generator=gen)}[into_layout]
    expected = sparse_ops.linear_accumulate(x, weight, into.clone())
    result = triton_ops.linear_accumulate(x, weight, into)
    torch.testing.assert_close(result, expected)
    assert (result is into) == (into_layout == "contiguous")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("temb_shape", [(2, 6, 1), (1, 6, 1), (2, 6, 5), None])
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_with_a_bias_and_time_embedding_before_its_norm_matches_the_reference(temb_shape,
                                                                                  with_bias):
    """``input_temb`` and ``input_bias`` (moved by passes.fuse from the conv before): the
    group-norm kernel adds a per-channel time embedding and the bias; a time embedding of any
    other shape runs the conv's reference. Both equal the reference."""
    from fisedit_compiler.execution.plan import MaskPlan

    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1:4, 2:7] = True
    plan = MaskPlan(mask, [(8, 8)], [2], 0, 1.0)
    gen = torch.Generator().manual_seed(0)
    recorded = torch.randn(2, 6, 8, 8, generator=gen)
    x = sparse_ops.gather_positions(torch.randn(2, 6, 8, 8, generator=gen), plan[0], (2, 3))
    stats = sparse_ops.group_norm_stats(recorded * 2 + 1, 3, plan[0].tile, (8, 8))
    norm = (stats, 3, torch.randn(6, generator=gen), torch.randn(6, generator=gen), 1e-5,
            "incremental")
    temb = None if temb_shape is None else torch.randn(
        *temb_shape[:2], temb_shape[2] if temb_shape[2] == 1 else x.shape[-1], generator=gen)
    input_bias = torch.randn(6, generator=gen) if with_bias else None
    weight, bias = torch.randn(5, 6, 3, 3, generator=gen), torch.randn(5, generator=gen)
    conv = (recorded, plan, 0, 0, weight, bias, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    kwargs = dict(norm=norm, silu=True, input_temb=temb, input_bias=input_bias)
    torch.testing.assert_close(triton_ops.sparse_conv2d(x, *conv, **kwargs),
                               sparse_ops.sparse_conv2d(x, *conv, **kwargs),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channel_fast", [True, False])
def test_pointwise_conv_lowering_matches_the_reference(channel_fast):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 6, generator=gen)
    if channel_fast:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    weight, bias = torch.randn(5, 6, 1, 1, generator=gen), torch.randn(5, generator=gen)
    result = triton_ops.pointwise_conv2d(x.transpose(1, 2), weight, bias)
    expected = sparse_ops.pointwise_conv2d(x.transpose(1, 2), weight, bias)
    torch.testing.assert_close(result, expected)
    # A channel-fast input gives a channel-fast output: the next conv gathers it as vectors.
    assert (result.stride(1) == 1) == (x.transpose(1, 2).stride(1) == 1)


def test_kernel_choice_follows_the_config():
    assert not fc.SparseConfig(kernels="torch").use_triton("cuda")
    assert not fc.SparseConfig().use_triton("cpu")            # auto: the reference on CPU
    with pytest.raises(fc.FiseditError, match="kernels"):
        fc.SparseConfig(kernels="cuda")
    # The kernels take fp16, bf16 and fp32: a float64 U-Net runs the reference (in float64),
    # and an explicit kernels="triton" for it is refused by name.
    if HAS_TRITON:
        assert fc.SparseConfig().use_triton("cuda", torch.float16)
    assert not fc.SparseConfig().use_triton("cuda", torch.float64)
    with pytest.raises(fc.FiseditError, match=r"cannot run on float64 tensors \(they take "
                                              r"fp16, bf16 and fp32\)"):
        fc.compile(zoo.unet("sd15-tiny").double(), fc.SparseConfig(kernels="triton"))


def test_bench_masks_cover_the_requested_area():
    for area in (0.01, 0.05, 0.2, 1.0):
        assert abs(bench.blob_mask((64, 64), area).float().mean() - area) < 0.01
    scattered = bench.scattered_mask((64, 64), 0.1)
    assert 0.05 < float(scattered.float().mean()) <= 0.1 + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("policies, conv_method", [(("incremental", "full"), "implicit"),
                                                   (("cached", "sparse"), "implicit"),
                                                   (("incremental", "full"), "gather")])
def test_cuda_graph_edits_meet_the_oracle_at_sd15_size(policies, conv_method):
    unet = zoo.unet("sd15", dtype=torch.float16, device="cuda")
    mask = bench.blob_mask((64, 64), 0.05)
    config = fc.SparseConfig(group_norm=policies[0], self_attention=policies[1],
                             conv_method=conv_method)
    engine, cache, plan, edited, first = edit_and_check(unet, config, mask, 2e-2)
    again = engine.edit(cache, step=0, plan=plan, **edited)      # a replay of the capture
    assert torch.equal(first, again)


@pytest.mark.gpu
def test_a_mask_on_the_device_is_planned():
    engine = fc.compile(zoo.unet("sd15-tiny", device="cuda"))
    mask = bench.blob_mask((16, 16), 0.2)
    on_device = engine.plan(mask.cuda())
    assert torch.equal(on_device.raw.cpu(), mask)
    assert [l.fraction for l in on_device.levels] == [l.fraction for l in engine.plan(mask).levels]


