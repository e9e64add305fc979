"""kernels.text_attention: the folded keys and the reference against the unfolded
cross-attention, the Triton kernel against the reference (interpreter on the CPU, real sizes
on the GPU).

Tolerances (absolute and relative, outputs of magnitude ~1): fp32 1e-5; fp16 2e-3 and bf16
1.6e-2 (the softmax weights are rounded to the values' dtype before their product, as flash
attention does, and the folded keys once to the model's dtype).
"""

import pytest
import torch
import torch.nn.functional as F

from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution.kernels import INTERPRET
from fisedit_compiler.execution.kernels import text_attention as text_attention_module
from fisedit_compiler.execution.kernels.text_attention import (
    MAX_TOKENS, _shared_bytes, fold_keys_reference, launch_shape, supported, text_attention,
    text_attention_reference)

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRET, reason="the Triton interpreter multiplies bf16 tl.dot operands as raw bits "
    "(triton-lang/triton#11584)"))


def rand(*shape, dtype=torch.float32, device=DEVICE, scale=1.0):
    return torch.randn(*shape, dtype=dtype, device=device) * scale


def inputs(batch, rows, channels, heads, tokens, head_dim, dtype=torch.float32, device=DEVICE):
    """Token rows, the text's keys and values as the attention takes them ([B, H, T, D]
    permuted views of [B, T, H * D] projections, as diffusers lays heads out) and a query
    weight; scaled so the scores spread the softmax (neither uniform nor one-hot)."""
    x = rand(batch, rows, channels, dtype=dtype, device=device)
    k, v = (rand(batch, tokens, heads * head_dim, dtype=dtype, device=device)
            .reshape(batch, tokens, heads, head_dim).permute(0, 2, 1, 3) for _ in range(2))
    weight = rand(heads * head_dim, channels, dtype=dtype, device=device,
                  scale=channels ** -0.5)
    return x, k, v, weight


def unfolded(x, k, v, weight, scale=None):
    """The cross-attention as the U-Net runs it: queries, heads, SDPA."""
    batch, rows, _ = x.shape
    heads, head_dim = k.shape[1], k.shape[3]
    q = F.linear(x, weight).reshape(batch, rows, heads, head_dim).permute(0, 2, 1, 3)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_the_folded_keys_give_the_unfolded_attention(scale):
    x, k, v, weight = inputs(2, 9, 24, 3, 7, 8, dtype=torch.float64, device="cpu")
    keys = fold_keys_reference(k, weight, scale)
    assert keys.shape == (2, 3, 7, 24) and keys.dtype == torch.float64
    torch.testing.assert_close(text_attention_reference(x, keys, v), unfolded(x, k, v, weight, scale))


def test_the_fold_computes_in_the_accumulation_dtype():
    x, k, v, weight = inputs(1, 4, 16, 2, 5, 8, dtype=torch.float16, device="cpu")
    keys = fold_keys_reference(k, weight, None)
    exact = (k.double() @ weight.double().reshape(2, 8, 16) * 8 ** -0.5).half()
    assert keys.dtype == torch.float16
    torch.testing.assert_close(keys, exact, atol=0, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
@pytest.mark.parametrize("rows,channels,heads,tokens,head_dim", [
    (37, 48, 2, 7, 8),       # rows over several blocks, channels over several chunks
    (1, 20, 3, 77, 10),      # CLIP's 77 tokens, odd head dim and channels (masked lanes)
    (16, 16, 1, 1, 16),      # one token: the softmax is all ones
])
def test_kernel_matches_reference(dtype, rows, channels, heads, tokens, head_dim):
    x, k, v, weight = inputs(2, rows, channels, heads, tokens, head_dim, dtype)
    keys = fold_keys_reference(k, weight, None)
    got = text_attention(x, keys, v)
    expected = text_attention_reference(x, keys, v)
    assert got.shape == expected.shape == (2, heads, rows, head_dim)
    # Heads inside rows: the output projection's reshape is a view.
    assert got.permute(0, 2, 1, 3).is_contiguous()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def test_kernel_reads_strided_rows_and_takes_no_rows():
    x, k, v, weight = inputs(2, 12, 32, 2, 9, 16)
    keys = fold_keys_reference(k, weight, None)
    strided = rand(12, 2, 64).transpose(0, 1)[..., ::2]        # no unit stride anywhere
    torch.testing.assert_close(text_attention(strided, keys, v),
                               text_attention_reference(strided, keys, v),
                               atol=1e-5, rtol=1e-5)
    empty = text_attention(x[:, :0], keys, v)
    assert empty.shape == (2, 2, 0, 16)


def test_long_texts_and_wide_fp32_heads_are_for_the_reference():
    _, k, v, _ = inputs(1, 1, 16, 1, MAX_TOKENS + 1, 16, device="cpu")
    assert not supported(k, v) and supported(k[:, :, :MAX_TOKENS], v[:, :, :MAX_TOKENS])
    # SD1.5's widest heads (160 channels, padded to 256) at CLIP's 77 tokens (128): 64 KiB of
    # fp16 values fit beside the pipelined blocks in an H100's shared memory (the interpreter
    # assumes one), 128 KiB of fp32 ones would not.
    wide = rand(1, 1, 77, 160, device="cpu")
    assert supported(wide, wide.half()) and not supported(wide, wide)
    with pytest.raises(FiseditError, match="text_attention_reference"):
        text_attention(rand(1, 4, 16, device="cpu"), rand(1, 1, MAX_TOKENS + 1, 16, device="cpu"),
                       v)


@pytest.mark.parametrize("case,match", [
    (lambda x, keys, v: (x[0], keys, v), r"x must be \[B, N, C\]"),
    (lambda x, keys, v: (x, keys[..., :-1], v), "must share B, H, T"),
    (lambda x, keys, v: (x, keys, v[:, :, :-1]), "must share B, H, T"),
    (lambda x, keys, v: (x, keys[:, :, :0], v[:, :, :0]), "no text tokens"),
    (lambda x, keys, v: (x.half(), keys, v), "one dtype"),
])
def test_bad_inputs_are_refused_by_reference_and_kernel(case, match):
    x, k, v, weight = inputs(2, 3, 16, 2, 5, 8, device="cpu")
    arguments = case(x, fold_keys_reference(k, weight, None), v)
    for function in (text_attention_reference, text_attention):
        with pytest.raises(FiseditError, match=match):
            function(*arguments)


def test_a_query_weight_of_other_heads_is_refused():
    _, k, _, weight = inputs(1, 1, 16, 2, 5, 8, device="cpu")
    with pytest.raises(FiseditError, match=r"must be \[H \* D = 16, C\]"):
        fold_keys_reference(k, weight[:-1], None)


H100 = dict(programs=132, shared_bytes=227 * 1024)


@pytest.mark.parametrize("rows, batch_heads, channels, head_dim, expected", [
    (25, 16, 1280, 160, (16, 128, 8)),     # SD1.5's deepest level: few rows, 16-row blocks
    (400, 16, 320, 40, (64, 64, 4)),       # SD1.5's first level: blocks grow with the grid
    (288, 20, 640, 64, (64, 128, 8)),      # SDXL
    (240, 40, 1280, 64, (128, 128, 8)),
])
def test_row_blocks_grow_until_the_grid_fits_the_gpu(monkeypatch, rows, batch_heads, channels,
                                                      head_dim, expected):
    monkeypatch.setattr(text_attention_module, "INTERPRET", False)
    shape = launch_shape(rows, batch_heads, channels, 77, head_dim, 2, **H100)
    assert shape == expected
    block_m = shape[0]
    assert block_m == 16 or -(-rows // (block_m // 2)) * batch_heads > H100["programs"]


@pytest.mark.parametrize("tokens, head_dim, item_size, shared_kib, fits", [
    (77, 64, 2, 227, True), (77, 64, 4, 227, True), (256, 128, 2, 227, True),
    (77, 160, 2, 99, True),          # SD1.5's widest heads on a 99 KiB GPU (RTX 4090, L4)
    (256, 128, 2, 99, False)])       # T5-length text there: the reference
def test_launch_shapes_fit_the_shared_memory(monkeypatch, tokens, head_dim, item_size, shared_kib,
                                             fits):
    """Any row count: the pipelined blocks and the values fit the device's shared memory,
    except where even the smallest blocks do not (then ``supported`` sends the call to the
    reference); wide texts or heads, and fp32, stop at 32 rows."""
    monkeypatch.setattr(text_attention_module, "INTERPRET", False)
    shared = shared_kib * 1024
    assert (_shared_bytes(16, 64, tokens, head_dim, item_size) <= shared) is fits
    for rows in (1, 40, 300, 5000):
        block_m, block_c, warps = launch_shape(rows, 40, 1280, tokens, head_dim, item_size, 132,
                                               shared)
        assert _shared_bytes(block_m, block_c, tokens, head_dim, item_size) <= shared or \
            (not fits and (block_m, block_c) == (16, 64))
        assert block_m <= (32 if tokens > 128 or head_dim > 128 or item_size > 2 else 128)
        assert warps == (8 if block_c == 128 or block_m == 128 else 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,channels,heads,head_dim", [
    (820, 320, 8, 40), (40, 640, 8, 80), (18, 1280, 8, 160),           # SD1.5 at 5%
    (2458, 320, 8, 40),                                                # SD1.5 at 30%: 128 rows
    (288, 640, 10, 64), (72, 1280, 20, 64), (240, 1280, 20, 64)])      # SDXL at 7-23%
def test_kernel_at_model_sizes_on_the_gpu(dtype, rows, channels, heads, head_dim):
    """SD1.5's and SDXL's cross-attentions (rows per level, batch 2, CLIP text), against the
    unfolded attention computed in fp32 (the fold's rounding included)."""
    x, k, v, weight = inputs(2, rows, channels, heads, 77, head_dim, dtype, device="cuda")
    keys = fold_keys_reference(k, weight, None)
    got = text_attention(x, keys, v)
    expected = unfolded(x.float(), k.float(), v.float(), weight.float())
    tolerance = 2 * TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)
