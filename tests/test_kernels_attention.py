"""kernels.attention: the reference against SDPA, the Triton kernel against the reference.

Toy sizes run everywhere (the Triton interpreter on CPU); ``gpu`` tests use SD1.5 sizes.
Tolerances: fp32 1e-5 (exact fp32 dots); fp16 2e-3 and bf16 1.6e-2 absolute and relative on
outputs of magnitude ~1 (the softmax weights are rounded to the input dtype before P @ V).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution.kernels import INTERPRET
from fisedit_compiler.execution.kernels.attention import (
    _SPLIT_KEYS, _key_split, attention, attention_reference)

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BF16_DOT = pytest.mark.skipif(INTERPRET, reason="the Triton interpreter multiplies bf16 tl.dot "
                              "operands as raw bits (triton-lang/triton#11584)")


def rand(batch, heads, length, dim, dtype=torch.float32, strided=False):
    """Random [B, H, L, D]; ``strided`` gives the permuted view of a [B, L, H, D] tensor, as
    attention processors produce."""
    if strided:
        return torch.randn(batch, length, heads, dim, dtype=dtype, device=DEVICE).transpose(1, 2)
    return torch.randn(batch, heads, length, dim, dtype=dtype, device=DEVICE)


def edit(batch, heads, n_keys, n_active, dim, dtype=torch.float32, strided=False):
    """A random edit: the dense new K/V, the recorded K/V, the active rows (random, in random
    compact order), the compact new K/V and ``key_position``."""
    new_k, new_v = (rand(batch, heads, n_keys, dim, dtype, strided) for _ in range(2))
    k_recorded, v_recorded = (rand(batch, heads, n_keys, dim, dtype, strided) for _ in range(2))
    active = torch.randperm(n_keys, device=DEVICE)[:n_active]
    key_position = torch.full((n_keys,), -1, dtype=torch.int64, device=DEVICE)
    key_position[active] = torch.arange(n_active, device=DEVICE)
    return dict(new_k=new_k, new_v=new_v, k_recorded=k_recorded, v_recorded=v_recorded,
                k=new_k[:, :, active], v=new_v[:, :, active], active=active,
                key_position=key_position)


def assert_close(actual, expected):
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


# --- the reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [None, 0.3])
def test_reference_without_recorded_is_sdpa(scale):
    q, k, v = rand(2, 3, 11, 40), rand(2, 3, 29, 40), rand(2, 3, 29, 40)
    assert_close(attention_reference(q, k, v, scale),
                 F.scaled_dot_product_attention(q, k, v, scale=scale))


def test_reference_with_every_key_recorded_is_sdpa_on_the_recorded_kv():
    e = edit(2, 2, 33, 0, 16)
    q = rand(2, 2, 5, 16)
    k, v = rand(2, 2, 5, 16), rand(2, 2, 5, 16)      # new rows that no key reads
    assert_close(attention_reference(q, k, v, None, e["k_recorded"], e["v_recorded"],
                                     e["key_position"]),
                 F.scaled_dot_product_attention(q, e["k_recorded"], e["v_recorded"]))


def test_reference_mixed_is_sdpa_on_the_scattered_kv():
    e = edit(2, 2, 40, 13, 24)
    q = rand(2, 2, 13, 24)
    is_new = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    is_new[e["active"]] = True
    keys = torch.where(is_new[:, None], e["new_k"], e["k_recorded"])
    values = torch.where(is_new[:, None], e["new_v"], e["v_recorded"])
    assert_close(attention_reference(q, e["k"], e["v"], 0.2, e["k_recorded"], e["v_recorded"],
                                     e["key_position"]),
                 F.scaled_dot_product_attention(q, keys, values, scale=0.2))


# --- the Triton kernel against the reference ------------------------------------------------

def check_kernel(q, k, v, scale=None, k_recorded=None, v_recorded=None, key_position=None):
    result = attention(q, k, v, scale, k_recorded, v_recorded, key_position)
    assert result.shape == q.shape and result.dtype == q.dtype
    # Stored token-major, so the block's merge of the heads is a view.
    assert result.permute(0, 2, 1, 3).is_contiguous()
    assert_close(result, attention_reference(q, k, v, scale, k_recorded, v_recorded,
                                             key_position))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 160])
@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "mixed"])
def test_kernel_head_dims(head_dim, dtype, mixed):
    q = rand(2, 2, 19, head_dim, dtype)
    if mixed:
        e = edit(2, 2, 70, 19, head_dim, dtype)
        check_kernel(q, e["k"], e["v"], None, e["k_recorded"], e["v_recorded"],
                     e["key_position"])
    else:
        check_kernel(q, rand(2, 2, 45, head_dim, dtype), rand(2, 2, 45, head_dim, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_strided_inputs_and_int32_positions(dtype):
    """Permuted views for every input (incl. the recorded K/V) and int32 key positions."""
    e = edit(2, 3, 50, 17, 40, dtype, strided=True)
    q = rand(2, 3, 17, 40, dtype, strided=True)
    check_kernel(q, e["k"], e["v"], 0.25, e["k_recorded"], e["v_recorded"],
                 e["key_position"].int())


@pytest.mark.parametrize("n_keys", [2 * _SPLIT_KEYS, 3 * _SPLIT_KEYS + 4, 4 * _SPLIT_KEYS + 2])
def test_kernel_splits_the_keys_of_few_queries(n_keys):
    """Few queries: the keys are split across programs (the last split short when n_keys is
    not a multiple) and the partial softmaxes merged."""
    splits, keys_per_split = _key_split(5, 2, n_keys, DEVICE)
    assert splits > 1 and (splits - 1) * keys_per_split < n_keys <= splits * keys_per_split
    e = edit(1, 2, n_keys, 5, 40)
    check_kernel(rand(1, 2, 5, 40), e["k"], e["v"], None, e["k_recorded"], e["v_recorded"],
                 e["key_position"])
    check_kernel(rand(1, 2, 5, 40), e["new_k"], e["new_v"])


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 2), heads=st.integers(1, 2), q_len=st.integers(1, 40),
       n_keys=st.integers(1, 90), head_dim=st.sampled_from([8, 40, 80]), mixed=st.booleans(),
       scale=st.sampled_from([None, 0.1, 1.0]))
def test_kernel_random_shapes(batch, heads, q_len, n_keys, head_dim, mixed, scale):
    q = rand(batch, heads, q_len, head_dim)
    if mixed:
        n_active = min(q_len, n_keys)
        e = edit(batch, heads, n_keys, n_active, head_dim)
        check_kernel(q, e["k"], e["v"], scale, e["k_recorded"], e["v_recorded"],
                     e["key_position"])
    else:
        check_kernel(q, rand(batch, heads, n_keys, head_dim), rand(batch, heads, n_keys, head_dim),
                     scale)


@BF16_DOT
def test_kernel_bf16():
    e = edit(2, 2, 64, 20, 40, torch.bfloat16)
    check_kernel(rand(2, 2, 20, 40, torch.bfloat16), e["k"], e["v"], None, e["k_recorded"],
                 e["v_recorded"], e["key_position"])


def test_kernel_no_queries():
    q = rand(1, 2, 0, 40)
    assert attention(q, rand(1, 2, 5, 40), rand(1, 2, 5, 40)).shape == (1, 2, 0, 40)


@pytest.mark.parametrize("fn", [attention, attention_reference])
def test_bad_inputs_raise(fn):
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    e = edit(1, 2, 10, 6, 8)
    bad = [
        (q[0], k, v),                                              # q not 4-D
        (q, k[..., :4], v[..., :4]),                               # head dims differ
        (q, k, v[:, :, :5]),                                       # k, v lengths differ
        (q, k.half(), v.half()),                                   # dtypes differ
        (q, k, v, None, e["k_recorded"], e["v_recorded"]),         # key_position missing
        (q, k, v, None, e["k_recorded"], e["v_recorded"], e["key_position"][:9]),
        (q, k, v, None, e["k_recorded"], e["v_recorded"], e["key_position"].float()),
        (q, k[:, :, :0], v[:, :, :0]),                             # no keys
    ]
    for args in bad:
        with pytest.raises(FiseditError):
            fn(*args)


# --- SD1.5 sizes on the GPU -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_keys, head_dim", [(4096, 40), (1024, 80), (256, 160), (16384, 40)])
@pytest.mark.parametrize("fraction", [0.01, 0.2, 1.0])
def test_kernel_sd15_sizes(n_keys, head_dim, fraction, dtype):
    n_active = max(1, round(fraction * n_keys))
    e = edit(2, 8, n_keys, n_active, head_dim, dtype, strided=True)
    q = rand(2, 8, n_active, head_dim, dtype, strided=True)
    check_kernel(q, e["k"], e["v"], None, e["k_recorded"], e["v_recorded"], e["key_position"])


@pytest.mark.gpu
def test_kernel_cross_attention_sd15_size():
    q = rand(2, 8, 4096, 40, torch.float16, strided=True)
    check_kernel(q, rand(2, 8, 77, 40, torch.float16), rand(2, 8, 77, 40, torch.float16))
