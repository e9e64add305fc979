"""kernels.tokens: add + layer_norm and GEGLU, references against torch, Triton against the
references.

Tolerances (absolute and relative): fp32 1e-5; fp16 1e-3 and bf16 1.6e-2, about one unit in the
last place on outputs of magnitude ~1. bf16 needs it in absolute terms too: the Triton
interpreter truncates fp32 -> bf16 (the GPU rounds to nearest), so the stored sum x + residual
can be one unit off, and layer_norm's affine can cancel that error's neighbours to near zero.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution.kernels.tokens import (
    add_layer_norm, add_layer_norm_reference, geglu, geglu_reference)

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def assert_close(actual, expected):
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def test_add_layer_norm_reference_is_layer_norm_of_the_sum():
    x, r, weight, bias = rand(3, 5, 40), rand(3, 5, 40), rand(40), rand(40)
    total, normed = add_layer_norm_reference(x, r, weight, bias, 1e-6)
    torch.testing.assert_close(total, x + r)
    torch.testing.assert_close(normed, F.layer_norm(x + r, (40,), weight, bias, 1e-6))
    total, normed = add_layer_norm_reference(x, None, None, None, 1e-5)
    assert total is x
    torch.testing.assert_close(normed, F.layer_norm(x, (40,), eps=1e-5))


def test_geglu_reference_is_hidden_times_erf_gelu_of_gate():
    x = rand(4, 6, 2 * 24)
    hidden, gate = x[..., :24], x[..., 24:]
    gelu = 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    torch.testing.assert_close(geglu_reference(x), hidden * gelu)


def strided(shape, dtype, layout):
    """``contiguous``; ``rows``: leading dims transposed (strided rows, unit last dim);
    ``columns``: a non-unit last-dim stride, which the kernels copy away."""
    if layout == "rows":
        return rand(shape[1], shape[0], *shape[2:], dtype=dtype).transpose(0, 1)
    if layout == "columns":
        return rand(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    return rand(*shape, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 40), (3, 1280), (1, 0, 8)])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("with_affine", [True, False])
def test_add_layer_norm_kernel(shape, dtype, residual, with_affine):
    x = rand(*shape, dtype=dtype)
    r = rand(*shape, dtype=dtype) if residual else None
    weight, bias = (rand(shape[-1], dtype=dtype), rand(shape[-1], dtype=dtype)) \
        if with_affine else (None, None)
    for result, expected in zip(add_layer_norm(x, r, weight, bias, 1e-5),
                                add_layer_norm_reference(x, r, weight, bias, 1e-5)):
        assert result.shape == expected.shape and result.dtype == dtype
        assert_close(result, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_sum_bias_is_stored_with_the_sum_only(dtype):
    """``sum_bias`` is added to the stored sum, not to what the norm sees."""
    x, r, weight, bias, sum_bias = (rand(3, 5, 40, dtype=dtype), rand(3, 5, 40, dtype=dtype),
                                    rand(40, dtype=dtype), rand(40, dtype=dtype),
                                    rand(40, dtype=dtype))
    total, normed = add_layer_norm_reference(x, r, weight, bias, 1e-5, sum_bias)
    assert_close(total, x + r + sum_bias)
    assert_close(normed, F.layer_norm(x + r, (40,), weight, bias, 1e-5))
    for result, expected in zip(add_layer_norm(x, r, weight, bias, 1e-5, sum_bias),
                                (total, normed)):
        assert_close(result, expected)
    for fn in (add_layer_norm, add_layer_norm_reference):
        with pytest.raises(FiseditError, match="sum_bias needs a residual"):
            fn(x, None, weight, bias, 1e-5, sum_bias)
        with pytest.raises(FiseditError, match="sum_bias must be"):
            fn(x, r, weight, bias, 1e-5, sum_bias[:-1])


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_add_layer_norm_kernel_strided(layout):
    x, r = strided((3, 5, 40), torch.float32, layout), strided((3, 5, 40), torch.float32, layout)
    weight, bias = rand(40), rand(40)
    for result, expected in zip(add_layer_norm(x, r, weight, bias, 1e-5),
                                add_layer_norm_reference(x, r, weight, bias, 1e-5)):
        assert_close(result, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 2 * 40), (3, 2 * 1280), (2, 3, 2 * 1100)])
def test_geglu_kernel(shape, dtype):
    x = rand(*shape, dtype=dtype)
    result = geglu(x)
    assert result.dtype == dtype and result.shape == (*shape[:-1], shape[-1] // 2)
    assert_close(result, geglu_reference(x))


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_geglu_kernel_strided(layout):
    x = strided((3, 4, 2 * 40), torch.float32, layout)
    assert_close(geglu(x), geglu_reference(x))


def test_bad_inputs_raise():
    x = rand(2, 3, 8)
    for fn in (add_layer_norm, add_layer_norm_reference):
        for residual, weight in [(rand(2, 3, 7), None), (x.half(), None), (None, rand(7))]:
            with pytest.raises(FiseditError):
                fn(x, residual, weight, None, 1e-5)
    for fn in (geglu, geglu_reference):
        with pytest.raises(FiseditError):
            fn(rand(2, 7))


# --- SD1.5 sizes on the GPU -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, channels", [(4096, 320), (1024, 640), (256, 1280)])
def test_kernels_sd15_sizes(tokens, channels, dtype):
    x, r = rand(2, tokens, channels, dtype=dtype), rand(2, tokens, channels, dtype=dtype)
    weight, bias = rand(channels, dtype=dtype), rand(channels, dtype=dtype)
    for result, expected in zip(add_layer_norm(x, r, weight, bias, 1e-5),
                                add_layer_norm_reference(x, r, weight, bias, 1e-5)):
        assert_close(result, expected)
    gated = rand(2, tokens, 8 * channels, dtype=dtype)
    assert_close(geglu(gated), geglu_reference(gated))
