"""kernels.group_norm: the references against sparse_ops and F.group_norm, the Triton kernels
against the references.

Tolerances: scale/shift are fp32 (1e-5; the Triton sums run in another order). The applied
output is compared at the default torch.testing tolerances of its dtype (bf16: 1.6e-2 relative,
one unit in the last place).
"""

import pytest
import torch
import torch.nn.functional as F

from fisedit_compiler.errors import FiseditError
from fisedit_compiler.kernels.group_norm import (POLICIES, group_norm_apply,
                                                 group_norm_apply_reference,
                                                 group_norm_scale_shift,
                                                 group_norm_scale_shift_reference)
from fisedit_compiler.runtime import sparse_ops as ops
from fisedit_compiler.runtime.plan import MaskPlan

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def affine(channels, present, dtype=torch.float32):
    if not present:
        return None, None
    return (torch.randn(channels, dtype=dtype, device=DEVICE),
            torch.randn(channels, dtype=dtype, device=DEVICE))


def recorded_level(batch, channels, groups, size, tile, n_active):
    """Stats of a random recorded input (mean far from zero) and a random active tile set."""
    recorded = torch.randn(batch, channels, *size, device=DEVICE) * 3 + 5
    stats = ops.group_norm_stats(recorded, groups, tile, size)
    tiles = stats["tile_sum"].shape[-1]
    active_tiles = torch.randperm(tiles, device=DEVICE)[:n_active]
    return stats, active_tiles, (channels // groups) * size[0] * size[1]


def compact(batch, channels, positions, dtype=torch.float32, layout="contiguous"):
    """A random compact [B, C, P] input: contiguous, a channels-last view, or a strided slice."""
    if layout == "channels_last":
        return torch.randn(batch, positions, channels, dtype=dtype, device=DEVICE).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(batch, channels, 2 * positions, dtype=dtype, device=DEVICE)[..., ::2]
    return torch.randn(batch, channels, positions, dtype=dtype, device=DEVICE)


# --- the references --------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("policy", POLICIES)
def test_reference_matches_sparse_group_norm(policy, seed):
    generator = torch.Generator().manual_seed(seed)
    size, tile, groups = (10, 9), [2, 4][seed % 2], 4
    mask = torch.rand(size, generator=generator) < 0.08
    mask[seed % 10, seed % 9] = True
    plan = MaskPlan(mask, [size], [tile], 0, 1.0, device=DEVICE)
    level = plan[0]
    recorded = torch.randn(2, 8, *size, device=DEVICE) * 3 + 5
    stats = ops.group_norm_stats(recorded, groups, tile, size)
    x = ops.gather_positions(torch.randn(2, 8, *size, device=DEVICE), level, (2, 3))
    weight, bias = affine(8, seed % 3 > 0)
    active_tiles = level.tiles[:, 0] * level.tile_grid[1] + level.tiles[:, 1]
    count = (8 // groups) * size[0] * size[1]
    scale, shift = group_norm_scale_shift_reference(x, stats, active_tiles, count, groups,
                                                    weight, bias, 1e-5, policy)
    torch.testing.assert_close(
        group_norm_apply_reference(x, scale, shift),
        ops.sparse_group_norm(x, stats, plan, 0, groups, weight, bias, 1e-5, policy),
        atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_affine", [False, True])
def test_reference_with_every_tile_active_is_group_norm(with_affine):
    stats, active_tiles, count = recorded_level(2, 12, 3, (7, 8), 4, 4)
    x = torch.randn(2, 12, 56, device=DEVICE) * 2 - 1
    weight, bias = affine(12, with_affine)
    scale, shift = group_norm_scale_shift_reference(x, stats, active_tiles, count, 3, weight,
                                                    bias, 1e-5, "incremental")
    torch.testing.assert_close(group_norm_apply_reference(x, scale, shift, silu=True),
                               F.silu(F.group_norm(x, 3, weight, bias, 1e-5)),
                               atol=1e-5, rtol=1e-5)


# --- the Triton kernels against the references ----------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("batch, channels, groups, positions, n_active", [
    (2, 12, 4, 37, 3),        # several position splits
    (1, 130, 2, 9, 1),        # 65 channels per group: the channel loop
    (2, 8, 8, 0, 0),          # nothing active: the recorded statistics
    (2, 16, 4, 90, 9),        # every tile active
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_shift_kernel(batch, channels, groups, positions, n_active, dtype, policy):
    stats, active_tiles, count = recorded_level(batch, channels, groups, (10, 9), 4, n_active)
    x = compact(batch, channels, positions, dtype)
    weight, bias = affine(channels, n_active % 2 == 1, dtype)
    args = (x, stats, active_tiles, count, groups, weight, bias, 1e-5, policy)
    for result, expected in zip(group_norm_scale_shift(*args),
                                group_norm_scale_shift_reference(*args)):
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_scale_shift_kernel_strided_input(layout):
    stats, active_tiles, count = recorded_level(2, 12, 4, (10, 9), 4, 3)
    x = compact(2, 12, 37, layout=layout)
    args = (x, stats, active_tiles.int(), count, 4, None, None, 1e-6, "incremental")
    for result, expected in zip(group_norm_scale_shift(*args),
                                group_norm_scale_shift_reference(*args)):
        torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_kernel(dtype, layout, silu):
    x = compact(2, 24, 37, dtype, layout)
    scale, shift = torch.randn(2, 24, device=DEVICE), torch.randn(2, 24, device=DEVICE)
    result = group_norm_apply(x, scale, shift, silu)
    assert result.dtype == dtype
    torch.testing.assert_close(result, group_norm_apply_reference(x, scale, shift, silu))
    if layout == "channels_last":
        assert result.stride(1) == 1


def test_bad_inputs_raise():
    stats, active_tiles, count = recorded_level(2, 12, 4, (10, 9), 4, 3)
    x = compact(2, 12, 37)
    bad = [
        dict(x=x[0]),                                   # not [B, C, P]
        dict(groups=5),                                 # 12 channels, 5 groups
        dict(groups=6),                                 # stats were recorded for 4 groups
        dict(policy="exact"),
        dict(weight=torch.randn(11, device=DEVICE)),
        dict(stats={"mean": stats["mean"], "variance": stats["variance"]}),  # no tile sums
        dict(active_tiles=active_tiles.float()),
    ]
    base = dict(x=x, stats=stats, active_tiles=active_tiles, count=count, groups=4, weight=None,
                bias=None, eps=1e-5, policy="incremental")
    for fn in (group_norm_scale_shift, group_norm_scale_shift_reference):
        for change in bad:
            with pytest.raises(FiseditError):
                fn(**{**base, **change})
    for fn in (group_norm_apply, group_norm_apply_reference):
        with pytest.raises(FiseditError):
            fn(x, torch.randn(2, 11, device=DEVICE), torch.randn(2, 12, device=DEVICE))


# --- SD1.5 sizes on the GPU -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("channels, side, tile", [(320, 64, 8), (640, 32, 4), (1280, 16, 2),
                                                  (2560, 8, 1)])
@pytest.mark.parametrize("fraction", [0.05, 1.0])
def test_kernels_sd15_sizes(channels, side, tile, fraction, policy):
    grid = (side // tile) ** 2
    n_active = max(1, round(fraction * grid))
    stats, active_tiles, count = recorded_level(2, channels, 32, (side, side), tile, n_active)
    x = compact(2, channels, n_active * tile * tile, torch.float16)
    weight, bias = affine(channels, True, torch.float16)
    args = (x, stats, active_tiles, count, 32, weight, bias, 1e-5, policy)
    scale, shift = group_norm_scale_shift(*args)
    expected_scale, expected_shift = group_norm_scale_shift_reference(*args)
    torch.testing.assert_close(scale, expected_scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shift, expected_shift, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(group_norm_apply(x, scale, shift, silu=True),
                               group_norm_apply_reference(x, scale, shift, silu=True))
