"""The sparse conv: its reference against plain torch, the Triton kernel against the reference.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1), at toy sizes
with one 16x16x16 tile config. Tolerances, relative to the output's largest magnitude:
* fp32: 1e-5 (fp32 accumulation in a different order; the kernel multiplies in IEEE fp32);
* fp16 / bf16: 1e-2 (both round the output to the half type, and a different summation order
  can move the output by an ulp).
bf16 runs on the GPU only: the interpreter's ``tl.dot`` multiplies bf16 bit patterns as
integers (triton-lang/triton#11584, not supported there).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.execution.kernels import HAS_TRITON
from fisedit_compiler.execution.kernels import sparse_conv
from fisedit_compiler.execution.kernels.sparse_conv import (
    pack_weight, sparse_conv2d, sparse_conv2d_reference)
from fisedit_compiler.execution.plan import MaskPlan

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# The toy cases run on the GPU where there is one (the interpreter runs CPU tensors only).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

GEOMETRIES = {
    "1x1": dict(kernel=(1, 1)),
    "3x3": dict(kernel=(3, 3), padding=(1, 1, 1, 1)),
    "3x3-stride2-downsample2d": dict(kernel=(3, 3), stride=(2, 2), padding=(0, 1, 0, 1)),
    "3x3-stride2": dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1)),
    "3x3-dilation2": dict(kernel=(3, 3), padding=(2, 2, 2, 2), dilation=(2, 2)),
    "2x3-asymmetric": dict(kernel=(2, 3), padding=(0, 1, 1, 0)),
}
FUSIONS = ("bias", "temb", "residual", "out_scale")
METHODS = ("implicit", "gather")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def output_size(size, kernel=(1, 1), stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1)):
    top, bottom, left, right = padding
    return ((size[0] + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
            (size[1] + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1)


def make_case(geometry, fusions=FUSIONS, dtype=torch.float32, *, batch=2, c_in=5, c_out=7,
              size=(7, 6), active=0.4, requested=0.6, index_dtype=torch.int32, seed=0,
              device=DEVICE):
    """Random arguments for one sparse conv: a random active set listed in a random compact
    order, and a random subset of the output pixels in random order. Returns (args, kwargs)
    and the fresh dense values ``new`` that ``x`` holds at the active pixels."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    geometry = dict(geometry)
    kernel = geometry.pop("kernel")
    out_size = output_size(size, kernel, **geometry)
    pixels = size[0] * size[1]
    chosen = torch.randperm(pixels, generator=gen)[:round(active * pixels)]
    in_position = torch.full((pixels,), -1, dtype=index_dtype)
    in_position[chosen] = torch.arange(chosen.numel(), dtype=index_dtype)
    count = out_size[0] * out_size[1]
    out_pixels = torch.randperm(count, generator=gen)[:max(1, round(requested * count))]
    new = randn(batch, c_in, *size)
    kwargs = dict(geometry, stride=geometry.get("stride", (1, 1)))
    if "temb" in fusions:
        kwargs["temb"] = randn(batch, c_out)
    if "residual" in fusions:
        kwargs["residual"] = randn(batch, c_out, out_pixels.numel())
    if "out_scale" in fusions:
        kwargs["out_scale"] = 0.7
    fan_in = c_in * kernel[0] * kernel[1]
    weight = (randn(c_out, c_in, *kernel, dtype=torch.float32) / fan_in ** 0.5).to(dtype)
    bias = randn(c_out, dtype=torch.float32) if "bias" in fusions else None
    args = [new.flatten(2)[:, :, chosen.to(device)], randn(batch, c_in, *size),
            in_position.to(device), out_pixels.to(device=device, dtype=index_dtype), out_size,
            weight, bias]
    return args, kwargs, new


@pytest.fixture(autouse=True)
def exact_fp32_convs(monkeypatch):
    """On CUDA, cuDNN's TF32 would make the fp32 reference the inexact side of a comparison."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def assert_matches(result, expected, dtype=torch.float32):
    assert result.dtype == expected.dtype and result.shape == expected.shape
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(result.float(), expected.float(), rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * scale)


def dense_conv(value, weight, bias, kwargs, groups=1):
    """Plain torch: the whole conv of a dense input, flattened to [B, Cout, Ho * Wo]."""
    top, bottom, left, right = kwargs.get("padding", (0, 0, 0, 0))
    value = F.pad(value, (left, right, top, bottom))
    return F.conv2d(value, weight, bias, kwargs["stride"], 0, kwargs.get("dilation", (1, 1)),
                    groups).flatten(2)


def apply_epilogue(out, kwargs):
    if "temb" in kwargs:
        out = out + kwargs["temb"][:, :, None]
    if "residual" in kwargs:
        out = out + kwargs["residual"]
    return out * kwargs.get("out_scale", 1.0)


# --- the reference against plain torch ------------------------------------------------------

@pytest.mark.parametrize("name", GEOMETRIES)
def test_reference_with_every_pixel_active_is_the_dense_conv_of_the_new_values(name):
    args, kwargs, new = make_case(GEOMETRIES[name], active=1.0, requested=1.0)
    x, recorded, in_position, out_pixels, out_size, weight, bias = args
    result = sparse_conv2d_reference(*args, **kwargs)
    expected = dense_conv(new, weight, bias, kwargs)[:, :, out_pixels]
    assert_matches(result, apply_epilogue(expected, kwargs))


@pytest.mark.parametrize("name", GEOMETRIES)
def test_reference_with_no_pixel_active_is_the_conv_of_the_recorded_input(name):
    args, kwargs, _ = make_case(GEOMETRIES[name], ("bias",), active=0.0)
    x, recorded, in_position, out_pixels, out_size, weight, bias = args
    assert x.shape[2] == 0 and bool((in_position < 0).all())
    expected = dense_conv(recorded, weight, bias, kwargs)[:, :, out_pixels]
    assert_matches(sparse_conv2d_reference(*args, **kwargs), expected)


def test_reference_supports_grouped_convs():
    args, kwargs, new = make_case(GEOMETRIES["3x3"], ("bias",), c_in=6, c_out=4, active=1.0,
                                  requested=1.0)
    args[5] = torch.randn(4, 3, 3, 3, device=DEVICE)
    expected = dense_conv(new, args[5], args[6], kwargs, groups=2)[:, :, args[3]]
    assert_matches(sparse_conv2d_reference(*args, **kwargs), expected)


# --- the kernel against the reference -------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_kernel_matches_reference_for_each_geometry(name, dtype, method):
    args, kwargs, _ = make_case(GEOMETRIES[name], dtype=dtype, seed=1)
    assert_matches(sparse_conv2d(*args, **kwargs, method=method),
                   sparse_conv2d_reference(*args, **kwargs), dtype)


@needs_triton
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fusion", ("none",) + FUSIONS)
def test_kernel_matches_reference_for_each_fusion(fusion, method):
    args, kwargs, _ = make_case(GEOMETRIES["3x3"], () if fusion == "none" else (fusion,), seed=2)
    assert_matches(sparse_conv2d(*args, **kwargs, method=method),
                   sparse_conv2d_reference(*args, **kwargs))


@needs_triton
@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(GEOMETRIES)), fusions=st.sets(st.sampled_from(FUSIONS)),
       dtype=st.sampled_from([torch.float32, torch.float16]),
       index_dtype=st.sampled_from([torch.int32, torch.int64]), batch=st.integers(1, 2),
       c_in=st.integers(1, 16), c_out=st.integers(1, 16), height=st.integers(2, 8),
       width=st.integers(2, 8), active=st.floats(0.0, 1.0), requested=st.floats(0.0, 1.0),
       split_k=st.sampled_from([None, 1, 2, 5]), method=st.sampled_from(METHODS),
       seed=st.integers(0, 2**31 - 1))
def test_kernel_matches_reference_on_random_cases(name, fusions, dtype, index_dtype, batch, c_in,
                                                  c_out, height, width, active, requested,
                                                  split_k, method, seed):
    geometry = GEOMETRIES[name]
    size = (height, width)
    if min(output_size(size, **geometry)) < 1:
        return  # the kernel does not fit this grid
    args, kwargs, _ = make_case(geometry, fusions, dtype, batch=batch, c_in=c_in, c_out=c_out,
                                size=size, active=active, requested=requested,
                                index_dtype=index_dtype, seed=seed)
    split_k = split_k if method == "implicit" else None      # cuBLAS splits the gather's GEMM
    assert_matches(sparse_conv2d(*args, **kwargs, split_k=split_k, method=method),
                   sparse_conv2d_reference(*args, **kwargs), dtype)


@needs_triton
@pytest.mark.parametrize("split_k", [2, 4, 7, 40])
def test_kernel_split_k_matches_reference(split_k):
    """Splits may start and end inside a tap (20 channels = 2 blocks of 16, 18 steps in all)
    or be empty (7 splits of 3 steps leave one empty, 40 leave 22)."""
    args, kwargs, _ = make_case(GEOMETRIES["3x3"], c_in=20, seed=4)
    assert_matches(sparse_conv2d(*args, **kwargs, split_k=split_k),
                   sparse_conv2d_reference(*args, **kwargs))


def split_k_counters(device=DEVICE):
    """The tile counters split-K launches on ``device`` share (the newest buffer)."""
    return sparse_conv._tile_counter_buffers[torch.device(device)][-1]


@needs_triton
def test_kernel_split_k_runs_in_one_launch_and_leaves_the_counters_at_zero():
    """The last split of each tile resets its counter: no memset is needed between launches."""
    args, kwargs, _ = make_case(GEOMETRIES["3x3"], c_in=20, seed=5)
    sparse_conv2d(*args, **kwargs, split_k=3)
    counters = split_k_counters(args[0].device)
    assert counters.dtype == torch.int32 and counters.numel() >= sparse_conv._MIN_TILE_COUNTERS
    assert not counters.any()


@needs_triton
def test_kernel_split_k_back_to_back_launches_of_different_shapes():
    """Launches share the counters: each must find them at zero whatever ran before, with
    another tile grid (shape) and another number of splits."""
    cases = [(make_case(GEOMETRIES["3x3"], c_in=20, c_out=7, seed=6), 4),
             (make_case(GEOMETRIES["3x3-stride2"], c_in=9, c_out=19, size=(9, 8), seed=7), 2),
             (make_case(GEOMETRIES["1x1"], c_in=40, c_out=5, seed=8), 3)]
    for (args, kwargs, _), split_k in cases + cases[:1]:
        assert_matches(sparse_conv2d(*args, **kwargs, split_k=split_k),
                       sparse_conv2d_reference(*args, **kwargs))
        assert not split_k_counters(args[0].device).any()


@needs_triton
@pytest.mark.parametrize("split_k", [1, 5])
def test_kernel_is_deterministic(split_k):
    """Split-K adds the partials in split order whichever split finishes the tile: two calls
    give the same bits."""
    args, kwargs, _ = make_case(GEOMETRIES["3x3"], c_in=20, seed=9)
    first = sparse_conv2d(*args, **kwargs, split_k=split_k)
    second = sparse_conv2d(*args, **kwargs, split_k=split_k)
    assert torch.equal(first, second)


@needs_triton
def test_split_k_counters_grow_zeroed_and_keep_the_old_buffer(monkeypatch):
    """A launch needing more tiles gets a larger zeroed buffer; the old one stays alive (a
    captured CUDA graph may still address it)."""
    monkeypatch.setattr(sparse_conv, "_tile_counter_buffers", {})
    device = torch.device("cpu")
    small = sparse_conv._tile_counters(device, 10)
    assert small.numel() == sparse_conv._MIN_TILE_COUNTERS
    assert sparse_conv._tile_counters(device, sparse_conv._MIN_TILE_COUNTERS) is small
    large = sparse_conv._tile_counters(device, sparse_conv._MIN_TILE_COUNTERS + 1)
    assert large.numel() == 2 * sparse_conv._MIN_TILE_COUNTERS and not large.any()
    assert sparse_conv._tile_counter_buffers[device] == [small, large]


@needs_triton
def test_split_k_counters_cannot_grow_during_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(sparse_conv, "_tile_counter_buffers", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(FiseditError, match="during CUDA graph capture"):
        sparse_conv._tile_counters(torch.device("cuda", 0), 10)


@needs_triton
@pytest.mark.parametrize("method", METHODS)
def test_kernel_reads_strided_inputs_in_place(method):
    args, kwargs, _ = make_case(GEOMETRIES["3x3-stride2"], seed=3)
    expected = sparse_conv2d_reference(*args, **kwargs)
    x, recorded = args[0], args[1]
    args[0] = x.transpose(1, 2).contiguous().transpose(1, 2)              # [B, P, C] storage
    args[1] = recorded.contiguous(memory_format=torch.channels_last)
    residual = kwargs["residual"]
    spread = torch.randn(*residual.shape[:2], 2 * residual.shape[2], device=DEVICE)
    spread[:, :, ::2] = residual
    kwargs["residual"] = spread[:, :, ::2]
    assert not args[0].is_contiguous() and not kwargs["residual"].is_contiguous()
    assert_matches(sparse_conv2d(*args, **kwargs, packed_weight=pack_weight(args[5]),
                                 method=method), expected)


@needs_triton
@pytest.mark.parametrize("method", METHODS)
def test_kernel_handles_empty_inputs_and_outputs(method):
    args, kwargs, _ = make_case(GEOMETRIES["3x3"], ("bias",), active=0.0)
    assert_matches(sparse_conv2d(*args, **kwargs, method=method),
                   sparse_conv2d_reference(*args, **kwargs))
    args[3] = args[3][:0]
    assert sparse_conv2d(*args, **kwargs, method=method).shape == (2, 7, 0)


@needs_triton
@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_both_take_the_mask_plans_position_and_pixels(kernel):
    """A 3x3 stride-2 conv from level 0 to level 1 equals the runtime's tile-based reference."""
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[1:4, 2:7] = True
    plan = MaskPlan(mask, [(8, 8), (4, 4)], [2, 1], 0, 1.0, device=DEVICE)
    source, target = plan[0], plan[1]
    new, recorded = (torch.randn(2, 6, 8, 8, device=DEVICE) for _ in range(2))
    weight, bias = torch.randn(5, 6, 3, 3, device=DEVICE), torch.randn(5, device=DEVICE)
    x = ops.gather_positions(new, source, (2, 3))
    expected = ops.sparse_conv2d(x, recorded, plan, 0, 1, weight, bias, (2, 2), (0, 1, 0, 1),
                                 (1, 1), 1)
    fn = sparse_conv2d_reference if kernel == "reference" else sparse_conv2d
    result = fn(x, recorded, source.position, target.pixels, target.size, weight, bias,
                stride=(2, 2), padding=(0, 1, 0, 1))
    assert_matches(result, expected)


# --- errors ---------------------------------------------------------------------------------

@needs_triton
def test_kernel_refuses_grouped_convs_and_points_to_the_reference():
    args, kwargs, _ = make_case(GEOMETRIES["3x3"], c_in=6, c_out=4)
    args[5] = torch.randn(4, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="groups=2.*sparse_conv2d_reference"):
        sparse_conv2d(*args, **kwargs)


def _break(args, kwargs, what):
    if what == "channels":
        args[0] = args[0][:, :-1]
    elif what == "in_position":
        args[2] = args[2][:-1]
    elif what == "out_size":
        args[4] = (args[4][0] + 1, args[4][1])
    elif what == "dtype":
        args[1] = args[1].double()
    elif what == "residual":
        kwargs["residual"] = kwargs["residual"][:, :, :-1]
    elif what == "temb":
        kwargs["temb"] = kwargs["temb"][:1]
    elif what == "padding":
        kwargs["padding"] = (1, 1)


@pytest.mark.parametrize("what, message", [
    ("channels", "differ in batch or channels"), ("in_position", "in_position has"),
    ("out_size", "is not the conv's output size"), ("dtype", "share one dtype"),
    ("residual", "residual must have shape"), ("temb", "temb must have shape"), ("padding", "padding 4")])
@pytest.mark.parametrize("fn", [sparse_conv2d_reference, sparse_conv2d],
                         ids=["reference", "triton"])
def test_mismatched_arguments_raise_clear_errors(fn, what, message):
    args, kwargs, _ = make_case(GEOMETRIES["3x3"])
    _break(args, kwargs, what)
    with pytest.raises(FiseditError, match=message):
        fn(*args, **kwargs)


@needs_triton
def test_kernel_refuses_a_wrongly_packed_weight():
    args, kwargs, _ = make_case(GEOMETRIES["3x3"])
    with pytest.raises(FiseditError, match="packed_weight must be pack_weight"):
        sparse_conv2d(*args, **kwargs, packed_weight=args[5].flatten(1))


@needs_triton
@pytest.mark.parametrize("method", METHODS)
def test_kernel_takes_a_bias_in_another_dtype(method):
    """The bias is added in fp32 whatever its dtype (an fp32 bias on fp16 activations here;
    cuBLAS, which adds a bias of the activations' dtype only, must not get it)."""
    args, kwargs, _ = make_case(GEOMETRIES["3x3"], ("bias",), torch.float16, seed=6)
    assert args[6].dtype == torch.float32
    assert_matches(sparse_conv2d(*args, **kwargs, method=method),
                   sparse_conv2d_reference(*args, **kwargs), torch.float16)


@needs_triton
def test_kernel_refuses_an_unknown_method():
    args, kwargs, _ = make_case(GEOMETRIES["3x3"])
    with pytest.raises(FiseditError, match="method must be one of 'implicit', 'gather', got 'cudnn'"):
        sparse_conv2d(*args, **kwargs, method="cudnn")
    with pytest.raises(FiseditError, match="split_k applies to method='implicit' only"):
        sparse_conv2d(*args, **kwargs, method="gather", split_k=2)


# --- real SD1.5 sizes on the GPU ------------------------------------------------------------

SD15_CASES = {
    "resnet-conv1-320-64x64": (dict(kernel=(3, 3), padding=(1, 1, 1, 1)), 320, 320, (64, 64),
                               ("bias", "temb")),
    "resnet-conv2-1280-16x16": (dict(kernel=(3, 3), padding=(1, 1, 1, 1)), 1280, 1280, (16, 16),
                                ("bias", "residual", "out_scale")),
    "conv1-2560-to-1280-16x16": (dict(kernel=(3, 3), padding=(1, 1, 1, 1)), 2560, 1280, (16, 16),
                                 ("bias", "temb")),
    "shortcut-1x1-640-to-320": (dict(kernel=(1, 1)), 640, 320, (64, 64), ("bias",)),
    "downsample-320-64-to-32": (dict(kernel=(3, 3), stride=(2, 2), padding=(0, 1, 0, 1)), 320,
                                320, (64, 64), ("bias",)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("name", SD15_CASES)
def test_kernel_matches_reference_at_sd15_sizes(name, dtype):
    geometry, c_in, c_out, size, fusions = SD15_CASES[name]
    args, kwargs, _ = make_case(geometry, fusions, dtype, c_in=c_in, c_out=c_out, size=size,
                                active=0.2, requested=0.2)
    result = sparse_conv2d(*args, **kwargs, packed_weight=pack_weight(args[5]))
    expected = sparse_conv2d_reference(*args, **kwargs)
    # fp32 sums of up to 23k terms in another order: allow 1e-4 of the output's scale.
    tolerance = 1e-4 if dtype == torch.float32 else TOLERANCE[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(result.float(), expected.float(), rtol=tolerance,
                               atol=tolerance * scale)
