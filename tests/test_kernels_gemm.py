"""The few-row split-K GEMM: its reference against plain torch, the Triton kernel against the
reference, its split-K counters and its launch rule.

On CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at toy sizes
with 16x16x16 tiles. Tolerances, relative to the output's largest magnitude: fp32 1e-5 (another
summation order), fp16 1e-2 (the output is rounded to fp16 once). bf16 runs on the GPU only
(the interpreter's ``tl.dot`` does not support it, triton-lang/triton#11584).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution.kernels import HAS_TRITON, INTERPRET, gemm
from fisedit_compiler.execution.kernels.gemm import GemmConfig, gemm_reference, launch_config

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
EPILOGUES = ("bias", "temb", "residual", "residual_rows", "out_scale")


def make_case(m_items=2, rows_per_item=5, k=40, n=24, epilogues=EPILOGUES,
              dtype=torch.float32, seed=0, device=DEVICE):
    """Random operands: ``a`` [M, K], ``b`` [K, N] read K-fast (a weight's layout), and the
    epilogue's tensors ("residual" in a conv's [B, N, P] layout, "residual_rows" as [M, N])."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    m = m_items * rows_per_item
    kwargs = {"rows_per_item": rows_per_item}
    if "bias" in epilogues:
        kwargs["bias"] = randn(n)
    if "temb" in epilogues:
        kwargs["temb"] = randn(m_items, n)
    if "residual" in epilogues:
        kwargs["residual"] = randn(m_items, rows_per_item, n).transpose(1, 2)
    elif "residual_rows" in epilogues:
        kwargs["residual"] = randn(m, n)
    if "out_scale" in epilogues:
        kwargs["out_scale"] = 0.7
    return randn(m, k), randn(n, k).t(), kwargs


def plain(a, b, bias=None, temb=None, residual=None, rows_per_item=None, out_scale=None):
    """The GEMM and its epilogue written out in fp64, independently of the reference."""
    out = a.double() @ b.double()
    if bias is not None:
        out += bias.double()
    if temb is not None:
        out += temb.double()[torch.arange(a.shape[0]) // rows_per_item]
    if residual is not None:
        rows = residual if residual.dim() == 2 else residual.transpose(1, 2).reshape(
            a.shape[0], -1)
        out += rows.double()
    if out_scale is not None:
        out *= out_scale
    return out


def assert_matches(result, expected):
    scale = expected.double().abs().max().clamp_min(1e-6)
    error = (result.double().cpu() - expected.double().cpu()).abs().max() / scale
    assert error <= TOLERANCE[result.dtype], f"relative error {error:.2e}"


@pytest.mark.parametrize("epilogues", [(), ("bias",), ("temb",), ("residual",),
                                       ("residual_rows",), ("out_scale",), EPILOGUES[:3]])
def test_reference_is_the_gemm_and_its_epilogue(epilogues):
    a, b, kwargs = make_case(epilogues=epilogues, device="cpu")
    result = gemm_reference(a, b, **kwargs)
    assert result.dtype == a.dtype and result.shape == (a.shape[0], b.shape[1])
    assert_matches(result, plain(a, b, **kwargs))


def test_reference_keeps_float64():
    a, b, kwargs = make_case(dtype=torch.float64, device="cpu")
    result = gemm_reference(a, b, **kwargs)
    assert result.dtype == torch.float64
    assert torch.allclose(result, plain(a, b, **kwargs), rtol=1e-12, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_matches_reference_with_every_epilogue(dtype, splits):
    a, b, kwargs = make_case(dtype=dtype, seed=1)
    result = gemm.gemm(a, b, **kwargs, config=GemmConfig(16, 16, 16, splits))
    assert_matches(result, gemm_reference(a, b, **kwargs))


@needs_triton
@settings(max_examples=12, deadline=None)
@given(m_items=st.integers(1, 3), rows_per_item=st.integers(1, 21), k=st.integers(1, 70),
       n=st.integers(1, 40), epilogues=st.sets(st.sampled_from(EPILOGUES)),
       dtype=st.sampled_from([torch.float32, torch.float16]), splits=st.integers(1, 6),
       block=st.sampled_from([(16, 16, 16), (16, 32, 16), (32, 16, 32)]),
       seed=st.integers(0, 2**16))
def test_kernel_matches_reference_on_random_cases(m_items, rows_per_item, k, n, epilogues, dtype,
                                                  splits, block, seed):
    """Any shape (tails in every dimension), epilogue, tile shape and number of splits, more
    splits than K steps included (those programs add zeros)."""
    a, b, kwargs = make_case(m_items, rows_per_item, k, n, epilogues, dtype, seed)
    result = gemm.gemm(a, b, **kwargs, config=GemmConfig(*block, splits))
    assert_matches(result, gemm_reference(a, b, **kwargs))
    assert not split_k_counters(a.device).any()


def split_k_counters(device):
    buffers = gemm._tile_counter_buffers.get(torch.device(device))
    return buffers[-1] if buffers else torch.zeros(1, dtype=torch.int32)


@needs_triton
@pytest.mark.parametrize("splits", [1, 4])
def test_kernel_is_deterministic(splits):
    """Split-K adds the partials in split order whichever split finishes the tile."""
    a, b, kwargs = make_case(k=70, seed=2)
    config = GemmConfig(16, 16, 16, splits)
    assert torch.equal(gemm.gemm(a, b, **kwargs, config=config),
                       gemm.gemm(a, b, **kwargs, config=config))


@needs_triton
def test_kernel_writes_into_out_and_reads_strided_operands():
    """``out`` is filled in place; a row-strided ``a`` (a slice of a wider matrix) is read
    where it lies."""
    a_wide, b, kwargs = make_case(k=48, seed=3)
    a = a_wide[:, 8:40]
    b = b[8:40]
    out = torch.empty(a.shape[0], b.shape[1], device=a.device)
    returned = gemm.gemm(a, b, **kwargs, out=out, config=GemmConfig(16, 16, 16, 2))
    assert returned is out
    assert_matches(out, gemm_reference(a.contiguous(), b.contiguous(), **kwargs))


@needs_triton
def test_kernel_handles_empty_outputs():
    a, b, _ = make_case(m_items=1, rows_per_item=1)
    assert gemm.gemm(a[:0], b).shape == (0, b.shape[1])
    assert gemm.gemm(a, b[:, :0]).shape == (a.shape[0], 0)


def test_split_k_counters_grow_zeroed_and_keep_the_old_buffer(monkeypatch):
    """A launch needing more tiles gets a larger zeroed buffer; the old one stays alive (a
    captured CUDA graph may still address it)."""
    monkeypatch.setattr(gemm, "_tile_counter_buffers", {})
    device = torch.device("cpu")
    small = gemm.tile_counters(device, 10)
    assert small.numel() == gemm.MIN_TILE_COUNTERS
    assert gemm.tile_counters(device, gemm.MIN_TILE_COUNTERS) is small
    large = gemm.tile_counters(device, gemm.MIN_TILE_COUNTERS + 1)
    assert large.numel() == 2 * gemm.MIN_TILE_COUNTERS and not large.any()
    assert gemm._tile_counter_buffers[device] == [small, large]


def test_split_k_counters_cannot_grow_during_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(gemm, "_tile_counter_buffers", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(FiseditError, match="during CUDA graph capture"):
        gemm.tile_counters(torch.device("cuda", 0), 10)


@pytest.mark.parametrize("change, message", [
    (lambda a, b, kw: (a[:, :-1], b, kw), "a must be"),
    (lambda a, b, kw: (a, b.double(), kw), "share one dtype"),
    (lambda a, b, kw: (a, b, {**kw, "rows_per_item": 3}), "rows_per_item"),
    (lambda a, b, kw: (a, b, {**kw, "bias": kw["bias"][:-1]}), "bias must have shape"),
    (lambda a, b, kw: (a, b, {**kw, "temb": kw["temb"][:1]}), "temb must have shape"),
    (lambda a, b, kw: (a, b, {**kw, "residual": kw["residual"][:, :-1]}),
     "residual must have shape"),
])
@pytest.mark.parametrize("function", ["reference", "kernel"])
def test_mismatched_arguments_raise_clear_errors(change, message, function):
    if function == "kernel" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    a, b, kwargs = make_case()
    a, b, kwargs = change(a, b, kwargs)
    run = gemm_reference if function == "reference" else gemm.gemm
    with pytest.raises(FiseditError, match=message):
        run(a, b, **kwargs)


@needs_triton
def test_kernel_refuses_a_non_contiguous_out():
    a, b, _ = make_case(epilogues=())
    out = torch.empty(b.shape[1], a.shape[0], device=a.device).t()
    with pytest.raises(FiseditError, match="out must be a contiguous"):
        gemm.gemm(a, b, out=out)


def test_launch_config_declines_float64_and_splits_long_reductions_only():
    device = torch.device(DEVICE)
    assert launch_config(10, 16, 64, torch.float64, device) is None
    if INTERPRET and HAS_TRITON:
        assert launch_config(10, 16, 16, torch.float32, device).splits == 1
        assert launch_config(10, 16, 256, torch.float32, device).splits > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, k, n", [(18, 11520, 1280), (50, 1280, 1280), (200, 5760, 640),
                                     (800, 2880, 320), (800, 320, 320), (1600, 2880, 320)])
def test_kernel_matches_reference_at_sd15_step_shapes(dtype, m, k, n):
    """The 5% SD1.5 step's GEMM shapes (benchmarks/RESULTS.md, session 21) with the launch
    configuration the runtime picks, every epilogue on."""
    a, b, kwargs = make_case(2, m // 2, k, n, EPILOGUES[:3] + ("out_scale",), dtype, seed=4,
                             device="cuda")
    config = launch_config(m, n, k, dtype, a.device) or GemmConfig(64, 64, 64, 4)
    result = gemm.gemm(a, b, **kwargs, config=config)
    assert_matches(result, gemm_reference(a, b, **kwargs))
    assert not split_k_counters(a.device).any()
