"""Each sparse op against its dense computation on random inputs and random plans."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fisedit_compiler import ir
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.execution.plan import Bucket, MaskPlan


@st.composite
def plans(draw, levels):
    """Random plans, exact or padded: half of them are made for a capacity bucket with room
    for up to 3 more tiles per level than the mask needs (as CUDA-graph edits use them), so
    every op is checked at a capacity above its active count: the positions past the count
    repeat the first one and must compute its value."""
    height, width = levels[0]
    mask = torch.zeros(levels[0], dtype=torch.bool)
    for _ in range(draw(st.integers(1, 3))):
        y0, x0 = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
        mask[y0:y0 + draw(st.integers(1, 6)), x0:x0 + draw(st.integers(1, 6))] = True
    tiles = [draw(st.sampled_from([1, 2, 4])) for _ in levels]
    dilation = draw(st.integers(0, 1))
    exact = MaskPlan(mask, levels, tiles, dilation, 1.0)
    if not draw(st.booleans()):
        return exact
    capacities = tuple(min(level.tile_grid[0] * level.tile_grid[1],
                           level.tile_count + draw(st.integers(0, 3))) for level in exact.levels)
    padded = MaskPlan(mask, levels, tiles, dilation, 1.0, buckets=[Bucket(0, capacities)])
    assert padded.bucket is not None and all(level.padded for level in padded.levels)
    return padded


def mixed(new, recorded, level):
    """Dense tensor: new values at active positions, recorded elsewhere."""
    return torch.where(level.active, new, recorded)


@settings(max_examples=30, deadline=None)
@given(plan=plans([(13, 11), (7, 6)]), kernel=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]),
       pad=st.sampled_from([(0, 0, 0, 0), (1, 1, 1, 1), (0, 1, 0, 1)]))
def test_sparse_conv2d_equals_dense_conv_on_the_mixed_input(plan, kernel, stride, groups, pad):
    level_out = 0 if stride == 1 else 1
    source, target = plan[0], plan[level_out]
    new, recorded = torch.randn(2, 4, 13, 11), torch.randn(2, 4, 13, 11)
    weight, bias = torch.randn(6, 4 // groups, kernel, kernel), torch.randn(6)
    expected = ir.conv2d(mixed(new, recorded, source), weight, bias, (stride, stride), pad,
                         (1, 1), groups)
    if expected.shape[-2:] != target.size:
        return  # this padding does not map the levels onto each other
    compact = ops.gather_positions(new, source, (2, 3))
    result = ops.sparse_conv2d(compact, recorded, plan, 0, level_out, weight, bias,
                               (stride, stride), pad, (1, 1), groups)
    torch.testing.assert_close(result, ops.gather_positions(expected, target, (2, 3)))


@settings(max_examples=20, deadline=None)
@given(plan=plans([(8, 8), (4, 4)]))
def test_upsample_gather_equals_nearest_upsampling(plan):
    low = torch.randn(2, 3, 4, 4)
    compact = ops.gather_positions(low, plan[1], (2, 3))
    expected = ops.gather_positions(F.interpolate(low, scale_factor=2.0, mode="nearest"),
                                    plan[0], (2, 3))
    assert torch.equal(ops.upsample_gather(compact, plan, 1, 0), expected)


@settings(max_examples=25, deadline=None)
@given(plan=plans([(12, 12)]), policy=st.sampled_from(["incremental", "cached"]))
def test_sparse_group_norm(plan, policy):
    level = plan[0]
    recorded = torch.randn(2, 8, 12, 12) * 3 + 5
    new = torch.randn(2, 8, 12, 12) * 2 - 1
    weight, bias = torch.randn(8), torch.randn(8)
    stats = ops.group_norm_stats(recorded, 4, level.tile, level.size)
    result = ops.sparse_group_norm(ops.gather_positions(new, level, (2, 3)), stats, plan, 0, 4,
                                   weight, bias, 1e-5, policy)
    x = mixed(new, recorded, level)
    if policy == "incremental" or level.dense:
        expected = F.group_norm(x, 4, weight, bias, 1e-5)
    else:
        grouped = recorded.reshape(2, 4, -1)
        mean = grouped.mean(-1)[:, :, None, None]
        std = torch.sqrt(grouped.var(-1, unbiased=False) + 1e-5)[:, :, None, None]
        expected = (((x.reshape(2, 4, 2, 12, 12) - mean[..., None]) / std[..., None])
                    .reshape(2, 8, 12, 12) * weight[:, None, None] + bias[:, None, None])
    torch.testing.assert_close(result, ops.gather_positions(expected, level, (2, 3)),
                               rtol=1e-5, atol=1e-5)


def test_incremental_group_norm_stays_exact_for_a_tiny_change_far_from_zero():
    """The shifted sums avoid cancellation when the mean is large."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[0, 0] = True
    plan = MaskPlan(mask, [(16, 16)], [1], 0, 1.0)
    recorded = torch.randn(1, 4, 16, 16) + 1000.0
    new = recorded + 1e-3 * torch.randn_like(recorded)
    stats = ops.group_norm_stats(recorded, 2, 1, (16, 16))
    result = ops.sparse_group_norm(ops.gather_positions(new, plan[0], (2, 3)), stats, plan, 0, 2,
                                   None, None, 1e-5, "incremental")
    expected = F.group_norm(mixed(new, recorded, plan[0]).double(), 2, eps=1e-5)
    torch.testing.assert_close(result.double(), expected[..., 0, :1], rtol=1e-4, atol=1e-4)


@settings(max_examples=20, deadline=None)
@given(plan=plans([(6, 6)]), policy=st.sampled_from(["full", "sparse"]), cross=st.booleans())
def test_sparse_attention(plan, policy, cross):
    level = plan[0]
    q_new, k_new, v_new = (torch.randn(2, 2, 36, 8) for _ in range(3))
    k_rec, v_rec = torch.randn(2, 2, 36, 8), torch.randn(2, 2, 36, 8)
    q = ops.gather_positions(q_new, level, (2,))
    if cross:
        text_k, text_v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
        result = ops.sparse_attention(q, text_k, text_v, None, None, plan, 0, None, "cross")
        expected = F.scaled_dot_product_attention(q, text_k, text_v)
        torch.testing.assert_close(result, expected)
        return
    k, v = ops.gather_positions(k_new, level, (2,)), ops.gather_positions(v_new, level, (2,))
    result = ops.sparse_attention(q, k, v, k_rec, v_rec, plan, 0, None, policy)
    if policy == "full" or level.dense:
        keys = torch.where(level.active.flatten()[:, None], k_new, k_rec)
        values = torch.where(level.active.flatten()[:, None], v_new, v_rec)
        expected = F.scaled_dot_product_attention(q, keys, values)
    else:
        count = level.count       # the compact keys, without a padded plan's repeats
        expected = F.scaled_dot_product_attention(q, k[..., :count, :], v[..., :count, :])
    torch.testing.assert_close(result, expected)


def test_scatter_full_and_gather_positions_round_trip():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 3:7] = True
    plan = MaskPlan(mask, [(8, 8)], [2], 0, 1.0)
    new, recorded = torch.randn(3, 8, 8, 5), torch.randn(3, 8, 8, 5)
    compact = ops.gather_positions(new, plan[0], (1, 2))
    full = ops.scatter_full(compact, recorded, plan[0], (1, 2))
    assert torch.equal(full, torch.where(plan[0].active[:, :, None], new, recorded))


@pytest.mark.parametrize("template, expected", [((2, None, 4), (2, 7, 4)), ((None, 8), (7, 8))])
def test_compact_reshape(template, expected):
    x = torch.randn(2, 7, 4) if len(template) == 3 else torch.randn(7, 2, 4)
    dim = 1 if len(template) == 3 else 0
    assert ops.compact_reshape(x, template, dim).shape == expected
