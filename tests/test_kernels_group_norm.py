"""kernels.group_norm: the references against sparse_ops and F.group_norm, the one-launch
Triton kernel against the reference.

Tolerances: the reference's fp32 scale/shift are compared at 1e-5. The kernel's output is
compared at the default torch.testing tolerances of its dtype (bf16: 1.6e-2 relative, one unit
in the last place); fp32 outputs at 1e-5, as the Triton sums run in another order.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fisedit_compiler.errors import FiseditError
from fisedit_compiler.execution import sparse_ops as ops
from fisedit_compiler.execution.kernels.group_norm import (
    POLICIES, group_norm, group_norm_apply_reference, group_norm_reference,
    group_norm_scale_shift_reference)
from fisedit_compiler.execution.plan import MaskPlan

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


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
    """A random compact [B, C, P] input: contiguous, a channels-last view (channel stride 1, as
    at runtime), or a strided slice."""
    if layout == "channels_last":
        return torch.randn(batch, positions, channels, dtype=dtype, device=DEVICE).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(batch, channels, 2 * positions, dtype=dtype, device=DEVICE)[..., ::2]
    return torch.randn(batch, channels, positions, dtype=dtype, device=DEVICE)


# The kernel sums each group in fp32 blocks, torch pairwise. The tests' new values sit far
# from the recorded mean (to exercise the shift), so the variance is a difference of large
# sums and the statistics agree to ~1e-5 relative: near-zero half outputs differ by up to
# ~2e-5 on an H100 (SD1.5's 2560-channel level), beyond torch's default atol of 1e-5.
# That error is relative to the terms summed, not to each output: an output that the bias
# cancels to near zero carries the error of its (large) terms. So fp32 outputs get an absolute
# tolerance of 1e-5 times the largest output (at least 1e-5): with every tile active and a
# weight and bias of up to ~3, outputs reach ~10 and the two fp32 sums differ by up to ~3e-5
# (both are that far from an fp64 reference, so neither is the wrong one).
KERNEL_TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5),
                    torch.float16: dict(atol=1e-4, rtol=1e-3),      # rtol: torch's default
                    torch.bfloat16: dict(atol=1e-4, rtol=1.6e-2)}


def kernel_tolerance(expected):
    """``KERNEL_TOLERANCE`` of the output's dtype, fp32's atol scaled by the largest output."""
    tolerance = dict(KERNEL_TOLERANCE[expected.dtype])
    if expected.dtype == torch.float32:
        largest = expected.abs().max().item() if expected.numel() else 0.0
        tolerance["atol"] *= max(1.0, largest)
    return tolerance


def assert_matches_reference(args, silu, add=None, add_bias=None):
    """The kernel's output equals the reference's, in x's dtype and memory layout."""
    x = args[0]
    result = group_norm(*args, silu=silu, add=add, add_bias=add_bias)
    expected = group_norm_reference(*args, silu=silu, add=add, add_bias=add_bias)
    assert result.dtype == x.dtype and result.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(result, expected, **kernel_tolerance(expected))


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
    count = (8 // groups) * size[0] * size[1]
    torch.testing.assert_close(
        group_norm_reference(x, stats, level.tile_ids(), count, groups, weight, bias, 1e-5,
                             policy),
        ops.sparse_group_norm(x, stats, plan, 0, groups, weight, bias, 1e-5, policy),
        atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_affine", [False, True])
def test_reference_with_every_tile_active_is_group_norm(with_affine):
    stats, active_tiles, count = recorded_level(2, 12, 3, (7, 8), 4, 4)
    x = torch.randn(2, 12, 56, device=DEVICE) * 2 - 1
    weight, bias = affine(12, with_affine)
    torch.testing.assert_close(
        group_norm_reference(x, stats, active_tiles, count, 3, weight, bias, 1e-5, "incremental",
                             silu=True),
        F.silu(F.group_norm(x, 3, weight, bias, 1e-5)), atol=1e-5, rtol=1e-5)


# --- the Triton kernel against the reference ------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("batch, channels, groups, positions, n_active", [
    (2, 12, 4, 37, 3),        # several position blocks, 3 channels per group
    (1, 130, 2, 9, 1),        # 65 channels per group: several channel blocks
    (2, 8, 8, 0, 0),          # nothing active: the recorded statistics, an empty output
    (2, 10, 2, 1, 1),         # one position
    (2, 16, 4, 90, 9),        # every tile active
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel(batch, channels, groups, positions, n_active, dtype, policy):
    stats, active_tiles, count = recorded_level(batch, channels, groups, (10, 9), 4, n_active)
    x = compact(batch, channels, positions, dtype)
    weight, bias = affine(channels, n_active % 2 == 1, dtype)
    assert_matches_reference((x, stats, active_tiles, count, groups, weight, bias, 1e-5, policy),
                             silu=positions % 2 == 1)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_strided_input(dtype, layout, silu):
    stats, active_tiles, count = recorded_level(2, 24, 4, (10, 9), 4, 3)
    x = compact(2, 24, 37, dtype, layout)
    weight, bias = affine(24, True, dtype)
    args = (x, stats, active_tiles.int(), count, 4, weight, bias, 1e-6, "incremental")
    assert_matches_reference(args, silu)
    if layout == "channels_last":
        assert group_norm(*args, silu=silu).stride(1) == 1


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 2), groups=st.integers(1, 4), per_group=st.integers(1, 11),
       active_fraction=st.floats(0, 1),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       policy=st.sampled_from(POLICIES), with_weight=st.booleans(), with_bias=st.booleans(),
       silu=st.booleans(), with_add=st.booleans(), with_add_bias=st.booleans())
def test_kernel_random_shapes(batch, groups, per_group, active_fraction, dtype, layout, policy,
                              with_weight, with_bias, silu, with_add, with_add_bias):
    # Seeded per example, so a failing example replays with the same data.
    torch.manual_seed(hash((batch, groups, per_group, active_fraction)) % 2**31)
    channels = groups * per_group
    # A 6 x 7 level in 3 x 3 tiles: a 2 x 3 tile grid whose last column is 1 pixel wide.
    n_active = round(active_fraction * 6)
    stats, active_tiles, count = recorded_level(batch, channels, groups, (6, 7), 3, n_active)
    # The new values cover exactly the active tiles' pixels, as at runtime (other counts make
    # the incremental variance meaningless, even negative).
    positions = sum(3 * (1 if tile % 3 == 2 else 3) for tile in active_tiles.tolist())
    x = compact(batch, channels, positions, dtype, layout)
    weight, bias = affine(channels, True, dtype)
    args = (x, stats, active_tiles, count, groups, weight if with_weight else None,
            bias if with_bias else None, 1e-5, policy)
    add = torch.randn(batch, channels, dtype=dtype, device=DEVICE) if with_add else None
    add_bias = torch.randn(channels, dtype=dtype, device=DEVICE) if with_add_bias else None
    assert_matches_reference(args, silu, add, add_bias)


@settings(max_examples=10, deadline=None)
@given(extra_positions=st.integers(0, 9), extra_tiles=st.integers(0, 3),
       dtype=st.sampled_from(DTYPES), policy=st.sampled_from(POLICIES), silu=st.booleans())
def test_padded_input_sums_only_the_counted_positions(extra_positions, extra_tiles, dtype,
                                                      policy, silu):
    """A padded plan's compact tensor repeats its first position past the count (and its tile
    list the first tile): with ``active_counts`` the statistics are the exact ones, and the
    repeats are normalised like the position they repeat, in the reference and the kernel."""
    stats, active_tiles, count = recorded_level(2, 8, 4, (6, 6), 3, 2)
    x = compact(2, 8, 18, dtype)                    # two 3 x 3 tiles
    padded = torch.cat([x, x[..., :1].expand(2, 8, extra_positions)], -1)
    padded_tiles = torch.cat([active_tiles, active_tiles[:1].expand(extra_tiles)])
    counts = torch.tensor([18, 2], dtype=torch.int32, device=DEVICE)
    weight, bias = affine(8, True, dtype)
    exact = group_norm_reference(x, stats, active_tiles, count, 4, weight, bias, 1e-5, policy,
                                 silu=silu)
    args = (padded, stats, padded_tiles, count, 4, weight, bias, 1e-5, policy)
    reference = group_norm_reference(*args, silu=silu, active_counts=counts)
    # The padded tensor's sums run in another order, so the fp32 statistics may differ in their
    # last bits and a 16-bit output by one rounding step (CI saw 6e-5 in fp16).
    torch.testing.assert_close(reference[..., :18], exact, **kernel_tolerance(exact))
    # Repeats are normalised like the position they repeat: bit for bit on the GPU; on the CPU
    # a vectorised elementwise op may round a position in a vector's tail otherwise (one step,
    # seen once with fresh examples; padded plans serve the CUDA graphs).
    exactly = dict(rtol=0, atol=0) if DEVICE == "cuda" else kernel_tolerance(reference)
    torch.testing.assert_close(reference[..., 18:],
                               reference[..., :1].expand_as(reference[..., 18:]), **exactly)
    kernel = group_norm(*args, silu=silu, active_counts=counts)
    torch.testing.assert_close(kernel, reference, **kernel_tolerance(reference))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("added", ["add", "add_bias", "both"])
def test_add_is_the_norm_of_the_sum(policy, added):
    """``add`` (a time embedding per batch item and channel) and ``add_bias`` (a conv's bias
    per channel) give the norm of ``x + add + add_bias``: the reference's folded shift against
    the sum written out, and the kernel against both."""
    stats, active_tiles, count = recorded_level(2, 12, 4, (10, 9), 4, 3)
    x = compact(2, 12, 48, layout="channels_last")
    adds = {"add": torch.randn(2, 12, device=DEVICE), "add_bias": torch.randn(12, device=DEVICE)}
    if added != "both":
        adds = {added: adds[added]}
    total = adds.get("add", torch.zeros(2, 12, device=DEVICE)) + adds.get("add_bias", 0)
    weight, bias = affine(12, True)
    args = (stats, active_tiles, count, 4, weight, bias, 1e-5, policy)
    summed = group_norm_reference(x + total[:, :, None], *args, silu=True)
    torch.testing.assert_close(group_norm_reference(x, *args, silu=True, **adds), summed,
                               **kernel_tolerance(summed))
    torch.testing.assert_close(group_norm(x, *args, silu=True, **adds), summed,
                               **kernel_tolerance(summed))


def test_kernel_cached_policy_reads_only_mean_and_variance():
    stats, active_tiles, count = recorded_level(2, 12, 4, (10, 9), 4, 3)
    x = compact(2, 12, 37)
    cached = {"mean": stats["mean"], "variance": stats["variance"]}
    torch.testing.assert_close(
        group_norm(x, cached, active_tiles, count, 4, None, None, 1e-5, "cached"),
        group_norm(x, stats, active_tiles, count, 4, None, None, 1e-5, "cached"))


def test_bad_inputs_raise():
    stats, active_tiles, count = recorded_level(2, 12, 4, (10, 9), 4, 3)
    x = compact(2, 12, 37)
    bad = [
        dict(x=x[0]),                                   # not [B, C, P]
        dict(groups=5),                                 # 12 channels, 5 groups
        dict(groups=6),                                 # stats were recorded for 4 groups
        dict(policy="exact"),
        dict(weight=torch.randn(11, device=DEVICE)),
        dict(bias=torch.randn(12, 1, device=DEVICE)),
        dict(stats={"mean": stats["mean"], "variance": stats["variance"]}),  # no tile sums
        dict(stats={**stats, "tile_sum_sq": stats["tile_sum_sq"][..., :-1]}),
        dict(active_tiles=active_tiles.float()),
        dict(active_tiles=active_tiles[None]),
        dict(add=torch.randn(2, 11, device=DEVICE)),    # not [B, C]
        dict(add=torch.randn(12, device=DEVICE)),
        dict(add_bias=torch.randn(2, 12, device=DEVICE)),  # not [C]
        dict(add_bias=torch.randn(11, device=DEVICE)),
    ]
    base = dict(x=x, stats=stats, active_tiles=active_tiles, count=count, groups=4, weight=None,
                bias=None, eps=1e-5, policy="incremental")
    for fn in (group_norm, group_norm_reference, group_norm_scale_shift_reference):
        for change in bad:
            with pytest.raises(FiseditError):
                fn(**{**base, **change})
    with pytest.raises(FiseditError):
        group_norm_apply_reference(x, torch.randn(2, 11, device=DEVICE),
                                   torch.randn(2, 12, device=DEVICE))


# --- SD1.5 sizes on the GPU -----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("channels, side, tile", [(320, 64, 8), (640, 32, 4), (1280, 16, 2),
                                                  (2560, 8, 1)])
@pytest.mark.parametrize("fraction", [0.05, 1.0])
def test_kernel_sd15_sizes(channels, side, tile, fraction, layout, policy):
    grid = (side // tile) ** 2
    n_active = max(1, round(fraction * grid))
    stats, active_tiles, count = recorded_level(2, channels, 32, (side, side), tile, n_active)
    x = compact(2, channels, n_active * tile * tile, torch.float16, layout)
    weight, bias = affine(channels, True, torch.float16)
    assert_matches_reference((x, stats, active_tiles, count, 32, weight, bias, 1e-5, policy),
                             silu=True)
