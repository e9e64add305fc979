"""Mask plans: level masks, tiling, coverage, dense fallback, index tables."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fisedit_compiler import FiseditError
from fisedit_compiler.execution.plan import MaskPlan

LEVELS = [(16, 16), (8, 8), (4, 4)]


def plan_for(mask, tiles=(4, 4, 2), dilation=0, threshold=0.5, levels=LEVELS):
    return MaskPlan(mask, levels, list(tiles), dilation, threshold)


@st.composite
def masks(draw, size=(16, 16)):
    bits = draw(st.lists(st.booleans(), min_size=size[0] * size[1], max_size=size[0] * size[1]))
    return torch.tensor(bits, dtype=torch.bool).reshape(size)


@settings(max_examples=40, deadline=None)
@given(mask=masks(), dilation=st.integers(0, 2), threshold=st.sampled_from([0.3, 0.5, 1.0]))
def test_level_masks_cover_the_mask_and_are_tiled(mask, dilation, threshold):
    plan = plan_for(mask, dilation=dilation, threshold=threshold)
    assert bool((plan[0].active | ~mask).all()), "level 0 must cover the raw mask"
    for upper, lower in zip(plan.levels, plan.levels[1:]):
        # nearest upsampling from the lower level reads only active positions
        up = lower.active.repeat_interleave(2, 0).repeat_interleave(2, 1)
        assert bool((up | ~upper.active).all())
        assert not (upper.dense and not lower.dense), "levels below a dense level are dense"
    for level in plan.levels:
        if not level.dense:
            tiles = level.active.reshape(level.size[0] // level.tile, level.tile,
                                         level.size[1] // level.tile, level.tile)
            per_tile = tiles.sum(dim=(1, 3))
            assert bool(((per_tile == 0) | (per_tile == level.tile ** 2)).all())
            assert level.fraction <= threshold


@settings(max_examples=30, deadline=None)
@given(mask=masks((12, 10)))
def test_compact_order_is_tile_major_and_inverse_maps_agree(mask):
    plan = plan_for(mask, tiles=(4, 4), levels=[(12, 10), (6, 5)], threshold=1.0)
    for level in plan.levels:
        pixels = level.pixels
        assert pixels.numel() == int(level.active.sum())
        assert torch.equal(level.active.flatten()[pixels], torch.ones_like(pixels, dtype=torch.bool))
        assert torch.equal(level.position[pixels], torch.arange(pixels.numel()))
        assert int((level.position >= 0).sum()) == pixels.numel()
        tile_of = (pixels // level.size[1]) // level.tile * 100 + (pixels % level.size[1]) // level.tile
        rows_of_tiles = level.tiles[:, 0] * 100 + level.tiles[:, 1]
        # positions of one tile are contiguous, tiles in row-major order
        assert torch.equal(torch.unique_consecutive(tile_of), rows_of_tiles)


def test_empty_and_full_masks():
    empty = plan_for(torch.zeros(16, 16, dtype=torch.bool))
    assert empty.empty and all(level.count == 0 for level in empty.levels)
    full = plan_for(torch.ones(16, 16, dtype=torch.bool))
    assert full.full and not full.empty
    assert torch.equal(full[0].pixels, torch.arange(256))


def test_dense_fallback_starts_at_the_first_level_over_the_threshold():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[0:4, 0:8] = True                      # 12.5% at level 0, 25% at level 1 (tile 4)
    plan = plan_for(mask, threshold=0.2)
    assert [level.dense for level in plan.levels] == [False, True, True]


def test_dilation_grows_the_mask():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[7, 7] = True
    assert plan_for(mask, tiles=(1, 1, 1), dilation=0)[0].count == 1
    assert plan_for(mask, tiles=(1, 1, 1), dilation=2)[0].count == 25


@pytest.mark.parametrize("mask, message", [
    (torch.zeros(8, 8, dtype=torch.bool), "latent is 16x16"),
    (torch.zeros(128, 128, dtype=torch.bool), "image-resolution"),
    (torch.zeros(16, 16, dtype=torch.float32), "dtype bool"),
    (torch.zeros(2, 16, 16, dtype=torch.bool), "2-D"),
    ("not a mask", "bool tensor"),
])
def test_bad_masks(mask, message):
    with pytest.raises(FiseditError, match=message):
        plan_for(mask)
