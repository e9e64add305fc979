"""Mask plans: level masks, tiling, coverage, dense fallback, index tables."""

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fisedit_compiler as fc
from fisedit_compiler import FiseditError
from fisedit_compiler.execution.plan import (Bucket, MaskPlan, capacity_buckets,
                                              effective_masks, validate_mask)

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
    (torch.zeros(8, 8, dtype=torch.bool), r"latent is 16x16; .*can be resized, e.g. "
                                          r"F.interpolate\(mask\[None, None\].float\(\), "
                                          r"\(16, 16\)\)"),
    (torch.zeros(128, 128, dtype=torch.bool), "image-resolution"),
    (torch.zeros(16, 16, dtype=torch.float32), "dtype bool"),
    (torch.zeros(2, 16, 16, dtype=torch.bool), "2-D.*drop batch and channel dimensions"),
    (torch.tensor(True), r"2-D.*got shape \(\); make it one bool per latent pixel"),
    ("not a mask", "bool tensor"),
])
def test_bad_masks(mask, message):
    with pytest.raises(FiseditError, match=message):
        plan_for(mask)


@pytest.mark.parametrize("mask, message", [
    (None, r"bool tensor or array of shape \[H, W\].*got NoneType"),
    ("mask.png", "load_mask_png"),
    (torch.zeros(16, 16), "dtype bool"),
    (torch.zeros(1, 16, 16, dtype=torch.bool), "2-D"),
    (torch.zeros(0, 16, dtype=torch.bool), r"shape \(0, 16\), with no pixels"),
])
def test_a_mask_checked_without_a_size_is_checked_for_all_else(mask, message):
    # SparseEngine.plan checks a mask so before compiling for its size.
    with pytest.raises(FiseditError, match=message):
        validate_mask(mask, None)
    assert validate_mask([[True, False]], None).shape == (1, 2)


def test_a_checked_mask_is_a_copy_and_numpy_views_are_taken():
    # A plan or an edit's result keeps its mask when the caller paints on theirs afterwards.
    mask = torch.zeros(4, 4, dtype=torch.bool)
    checked = validate_mask(mask, (4, 4))
    mask.fill_(True)
    assert not checked.any()
    painted = np.zeros((4, 4), dtype=bool)
    painted[0, 1] = True
    flipped = validate_mask(np.flip(painted, 1), (4, 4))     # negative strides
    assert flipped[0, 2] and int(flipped.sum()) == 1


def test_a_huge_dilation_plans_quickly_and_as_the_mask_size():
    """A dilation past the latent's side covers what the side does: planning stops there
    instead of looping once per pixel of radius (10**9 would never finish)."""
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2, 3] = True
    started = time.perf_counter()
    huge = plan_for(mask, tiles=(1, 1, 1), dilation=10 ** 9, threshold=1.0)
    buckets = capacity_buckets(LEVELS, [1, 1, 1], 10 ** 9, 1.0, 1.25)
    assert time.perf_counter() - started < 10
    side = plan_for(mask, tiles=(1, 1, 1), dilation=16, threshold=1.0)
    for level, expected in zip(huge.levels, side.levels):
        assert all(torch.equal(level.host[key], expected.host[key]) for key in expected.host)
    assert huge[0].count == 16 * 16
    assert buckets == capacity_buckets(LEVELS, [1, 1, 1], 16, 1.0, 1.25)
    # Each axis stops at its own side: a wide mask dilates as it would without the bound.
    wide = np.zeros((3, 40), dtype=bool)
    wide[1, 5] = True
    for radius in (2, 10, 39, 40, 10 ** 9):
        expected = np.zeros_like(wide)
        expected[max(0, 1 - radius):1 + radius + 1, max(0, 5 - radius):5 + radius + 1] = True
        assert np.array_equal(effective_masks(wide, [(3, 40)], [1], radius)[0], expected)


# --- capacity buckets ----------------------------------------------------------------------

SD_LEVELS = [(64, 64), (32, 32), (16, 16), (8, 8)]
SD_TILES = [4, 2, 1, 1]


def test_capacity_buckets_grow_geometrically_and_stop_at_the_dense_threshold():
    buckets = capacity_buckets(SD_LEVELS, SD_TILES, 1, 0.5, 1.25)
    assert 8 <= len(buckets) <= 30, "few buckets"
    assert [b.index for b in buckets] == list(range(len(buckets)))
    for smaller, larger in zip(buckets, buckets[1:]):
        assert larger.tiles[0] <= max(smaller.tiles[0] + 1, math.ceil(smaller.tiles[0] * 1.25))
        for low, high in zip(smaller.tiles, larger.tiles):
            assert high is None or (low is not None and low <= high), "capacities only grow"
    for bucket in buckets:
        dense = False
        for capacity, (height, width), tile in zip(bucket.tiles, SD_LEVELS, SD_TILES):
            dense = dense or capacity is None
            assert (capacity is None) == dense, "levels below a dense level are dense"
            if capacity is not None:
                assert min(capacity * tile * tile, height * width) <= 0.5 * height * width


def test_capacity_buckets_size_lower_levels_from_the_bank_given():
    # One bank mask: a 4x4-tile square at level 0 (64x64 pixels at tile 4 is 16x16 tiles).
    square = torch.zeros(64, 64, dtype=torch.bool)
    square[8:24, 8:24] = True
    buckets = capacity_buckets(SD_LEVELS, SD_TILES, 1, 0.5, 1.25, bank=[square])
    counts = [level.tile_count for level in MaskPlan(square, SD_LEVELS, SD_TILES, 1, 0.5).levels]
    holding = [b for b in buckets if b.tiles[0] >= counts[0]]
    assert holding, "the square's level-0 tiles fit a bucket below the threshold"
    for bucket in holding:
        assert list(bucket.tiles[1:]) == counts[1:], "lower levels: exactly the bank's need"
    for bucket in buckets:
        if bucket.tiles[0] < counts[0]:
            assert bucket.tiles[1:] == (1, 1, 1), "no bank mask this small: one tile"


@settings(max_examples=40, deadline=None)
@given(mask=masks())
def test_a_bucketed_plan_pads_the_exact_plan(mask):
    buckets = capacity_buckets(LEVELS, [4, 4, 2], 1, 0.6, 1.25)
    exact = MaskPlan(mask, LEVELS, [4, 4, 2], 1, 1.0)
    padded = MaskPlan(mask, LEVELS, [4, 4, 2], 1, 1.0, buckets=buckets)
    if padded.bucket is None:
        assert padded.full or padded.empty, "a mask past every bucket plans its levels dense"
        return
    assert padded.bucket == next(b for b in buckets
                                 if b.fits([level.tile_count for level in exact.levels]))
    for mine, theirs in zip(padded.levels, exact.levels):
        assert mine.dense == (padded.bucket.tiles[mine.index] is None)
        if mine.dense:
            continue
        assert torch.equal(mine.active, theirs.active)
        assert (mine.count, mine.tile_count) == (theirs.count, theirs.tile_count)
        assert mine.tile_capacity == padded.bucket.tiles[mine.index]
        assert torch.equal(mine.pixels[:mine.count], theirs.pixels)
        assert bool((mine.pixels[mine.count:] == theirs.pixels[0]).all()), "repeats"
        assert torch.equal(mine.position, theirs.position)
        assert torch.equal(mine.tiles[:mine.tile_count], theirs.tiles)
        assert mine.counts.tolist() == [theirs.count, theirs.tile_count]


def test_a_mask_past_a_bucket_moves_to_the_next_and_past_every_bucket_runs_dense():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[0:4, 0:12] = True                  # 3 tiles at level 0 (tile 4), 2 at levels 1, 2
    small, roomy = Bucket(0, (3, 1, 2)), Bucket(1, (3, 2, 2))
    plan = MaskPlan(mask, LEVELS, [4, 4, 2], 0, 1.0, buckets=[small, roomy])
    assert plan.bucket == roomy, "level 1 needs 2 tiles: past the first bucket"
    assert [level.tile_capacity for level in plan.levels] == [3, 2, 2]
    past_all = MaskPlan(mask, LEVELS, [4, 4, 2], 0, 1.0, buckets=[small])
    assert past_all.bucket is None and past_all.full


def test_refill_gives_a_template_another_plans_tables_in_place():
    buckets = [Bucket(0, (6, 6, 6))]
    first, second = torch.zeros(16, 16, dtype=torch.bool), torch.zeros(16, 16, dtype=torch.bool)
    first[0:3, 0:3] = True
    second[9:16, 10:13] = True
    plan_a = MaskPlan(first, LEVELS, [4, 4, 2], 0, 1.0, buckets=buckets)
    plan_b = MaskPlan(second, LEVELS, [4, 4, 2], 0, 1.0, buckets=buckets)
    template = plan_a.template()
    tables = {index: (level.pixels, level.position, level.tile_ids())
              for index, level in enumerate(template.levels)}
    template.refill(plan_b)
    for index, level in enumerate(template.levels):
        pixels, position, tile_ids = tables[index]
        assert level.pixels is pixels and level.tile_ids() is tile_ids, "same storage"
        assert torch.equal(pixels, plan_b[index].pixels)
        assert torch.equal(position, plan_b[index].position)
        assert torch.equal(tile_ids, plan_b[index].tile_ids())
    assert not torch.equal(plan_a[0].pixels, plan_b[0].pixels), "the plan itself is untouched"
    other_bucket = MaskPlan(second, LEVELS, [4, 4, 2], 0, 1.0, buckets=[Bucket(0, (7, 7, 7))])
    with pytest.raises(FiseditError, match="same capacity bucket"):
        template.refill(other_bucket)


def test_a_threshold_list_of_the_wrong_length_is_refused():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:8, :8] = True
    with pytest.raises(FiseditError, match="4 levels need 4 dense thresholds, got 2"):
        MaskPlan(mask, SD_LEVELS, SD_TILES, 1, (0.5, 0.75))
    with pytest.raises(FiseditError, match="thresholds_for"):
        capacity_buckets(SD_LEVELS, SD_TILES, 1, [0.5, 0.75], 1.25)
    config = fc.SparseConfig()
    assert config.thresholds_for(SD_LEVELS) == [0.5, 0.75, 0.75, 0.75], "the default"
    plan = MaskPlan(mask, SD_LEVELS, SD_TILES, 1, config.thresholds_for(SD_LEVELS))
    assert plan.dense_threshold == [0.5, 0.75, 0.75, 0.75]


@pytest.mark.parametrize("levels, tiles, dilation, threshold, message", [
    ([], [], 0, 0.5, "levels must be a non-empty list"),
    ([(16, 16), (8,), (4, 4)], [4, 4, 2], 0, 0.5, r"levels\[1\] must be an \(H, W\) pair"),
    ([(16, 16), (8, 0), (4, 4)], [4, 4, 2], 0, 0.5, r"levels\[1\] width 0 is out of range"),
    (LEVELS, [4, 4], 0, 0.5, "3 levels need 3 tile sizes.*tiles_for"),
    (LEVELS, [4, 4, 2, 1], 0, 0.5, "3 levels need 3 tile sizes"),
    (LEVELS, [4, 0, 2], 0, 0.5, r"tiles\[1\] 0 is out of range"),
    (LEVELS, [4, 2.5, 2], 0, 0.5, r"tiles\[1\] must be an int"),
    (LEVELS, [4, 4, 2], -1, 0.5, "dilation -1 is out of range"),
    (LEVELS, [4, 4, 2], 1.5, 0.5, "dilation must be an int"),
    (LEVELS, [4, 4, 2], 0, float("nan"), "dense_threshold must be a finite number"),
    (LEVELS, [4, 4, 2], 0, 1.5, "dense_threshold 1.5 is out of range"),
    (LEVELS, [4, 4, 2], 0, [0.5, float("inf"), 0.5], r"dense_threshold\[1\] must be a finite"),
])
def test_bad_per_level_arguments_are_refused_before_planning(levels, tiles, dilation,
                                                             threshold, message):
    # zip would cut every per-level list to the shortest, silently dropping levels.
    mask = torch.zeros(16, 16, dtype=torch.bool)
    with pytest.raises(FiseditError, match=message):
        MaskPlan(mask, levels, tiles, dilation, threshold)
    with pytest.raises(FiseditError, match=message):
        capacity_buckets(levels, tiles, dilation, threshold, 1.25)


def test_a_bucket_of_another_level_count_is_refused_and_a_config_fits_its_tuples():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(FiseditError, match="bucket 0 has 2 capacities .* 3 levels"):
        MaskPlan(mask, LEVELS, [4, 4, 2], 0, 1.0, buckets=[Bucket(0, (3, 3))])
    # A config's longer tuples are cut to the levels by design (SparseConfig.tiles_for and
    # thresholds_for) before a plan is made, so they plan as the levels' own.
    config = fc.SparseConfig(tile=(4, 4, 2, 1, 1), dense_threshold=(0.5, 0.6, 0.7, 0.8, 0.9))
    plan = MaskPlan(mask, LEVELS, config.tiles_for(LEVELS), 0, config.thresholds_for(LEVELS))
    assert [level.tile for level in plan.levels] == [4, 4, 2]
    assert plan.dense_threshold == [0.5, 0.6, 0.7]


def test_the_mask_helpers_refuse_what_they_cannot_read_and_read_numpy_masks(tmp_path):
    """The helpers the mask errors point to (image_mask, mask_to_latent, load_mask_png,
    mask_from_box) name a wrong argument instead of failing inside PIL or torch."""
    from PIL import Image

    from fisedit_compiler.execution.plan import (image_mask, load_mask_png, mask_from_box,
                                                 mask_to_latent)

    path = tmp_path / "mask.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(path)
    for size in [(16,), (0, 0), (16.0, 16), "16x16"]:
        with pytest.raises(FiseditError, match="latent size must be .height, width."):
            load_mask_png(path, size)
    for value in [np.ones((8, 8), bool), torch.ones(8, 8)]:
        with pytest.raises(FiseditError, match="image_mask reads a PIL image.*engine.plan"):
            image_mask(value)
    with pytest.raises(FiseditError, match="the mask must be a 2-D .* got a 1-D tensor"):
        mask_to_latent(torch.ones(32, dtype=torch.bool), (16, 16), "the mask")
    pixels = np.zeros((32, 32), bool)
    pixels[3, 30] = True
    assert torch.equal(mask_to_latent(pixels, (16, 16), "the mask"),
                       mask_to_latent(torch.from_numpy(pixels), (16, 16), "the mask"))
    # numpy's integers are sizes too (an array's shape read through numpy arithmetic).
    assert torch.equal(mask_to_latent(pixels, (np.int64(16), np.int32(16)), "the mask"),
                       mask_to_latent(pixels, (16, 16), "the mask"))
    with pytest.raises(FiseditError, match="latent size must be .height, width."):
        mask_to_latent(pixels, (np.bool_(True), 16), "the mask")
    # A soft mask is not read as "any value above 0 is an edit" (a faint brush stroke over the
    # image would edit most of it); nor are a mask without values or pixels, or a bad scale.
    for mask, message in [(pixels.astype(np.float32), "must have dtype bool, got torch.float32"),
                          (torch.from_numpy(pixels).to("meta"), "on the meta device"),
                          (torch.zeros(0, 0, dtype=torch.bool), r"shape \(0, 0\), with no pixels"),
                          (np.array([[None] * 32] * 32), "must be a bool tensor or array")]:
        with pytest.raises(FiseditError, match=message):
            mask_to_latent(mask, (16, 16), "the mask")
    for scale, message in [(0, "scale .the VAE's. 0 is out of range"), ("2", "must be an int")]:
        with pytest.raises(FiseditError, match=message):
            mask_to_latent(pixels, (16, 16), "the mask", scale=scale)
    from fisedit_compiler.execution.plan import blob_mask, scattered_mask

    for make in (blob_mask, scattered_mask):
        for area in (0, 1.5, float("nan"), "0.1"):
            with pytest.raises(FiseditError, match="the mask's area"):
                make((16, 16), area)
    for arguments, message in [(dict(blobs=0), "blobs 0 is out of range"),
                               (dict(blobs=True), "blobs must be an int"),
                               (dict(blobs=2.5), "blobs must be an int"),
                               (dict(seed=None), "seed must be an int"),
                               (dict(seed=-1), "seed -1 is out of range")]:
        with pytest.raises(FiseditError, match=f"scattered_mask's {message}"):
            scattered_mask((16, 16), 0.2, **arguments)
    for size in [(16.5, 16), (0, 16)]:
        with pytest.raises(FiseditError, match="latent size must be .height, width."):
            mask_from_box("0,0,1,1", size)
    with pytest.raises(FiseditError, match="mask box is a string .* got tuple"):
        mask_from_box((0, 0, 1, 1), (16, 16))


def test_a_16_bit_mask_png_is_read_by_its_upper_half(tmp_path):
    """Pillow clips 16-bit grey when converting it; a dark background must stay unmarked."""
    from PIL import Image

    from fisedit_compiler.execution.plan import read_mask_png

    values = np.full((32, 32), 2000, dtype=np.uint16)        # ~3% grey
    values[4:8, 8:16] = 65535
    path = tmp_path / "mask16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    mask = read_mask_png(str(path))
    assert mask.sum() == 32 and mask[4:8, 8:16].all()
    Image.fromarray(np.where(values == 65535, 255, 0).astype(np.uint16)).save(path)
    with pytest.raises(FiseditError, match="16-bit image whose values reach only 255 of 65535"
                                           ".*save it as an 8-bit PNG"):
        read_mask_png(str(path))


def test_a_painted_rgba_mask_png_counts_strokes_of_any_opacity(tmp_path):
    """As the app's painter does: a soft magenta stroke on a transparent layer is an edit."""
    from PIL import Image

    from fisedit_compiler.execution.plan import read_mask_png

    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[2:4, 5:9] = (255, 0, 255, 100)                      # alpha 100 of 255
    rgba[10, 10] = (255, 255, 255, 0)                        # white but fully transparent
    path = tmp_path / "painted.png"
    Image.fromarray(rgba, "RGBA").save(path)
    mask = read_mask_png(str(path))
    assert mask.sum() == 8 and mask[2:4, 5:9].all()


@pytest.mark.parametrize("suffix", [".gif", ".png", ".tiff"])
def test_a_mask_file_of_several_frames_is_refused_not_read_by_its_first(tmp_path, suffix):
    from PIL import Image

    from fisedit_compiler.execution.plan import read_mask_png

    first, second = Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)
    path = tmp_path / f"mask{suffix}"
    first.save(path, save_all=True, append_images=[second])
    with pytest.raises(FiseditError, match=r"holds 2 frames .*save the frame you mean as a "
                                           r"single-frame PNG"):
        read_mask_png(str(path))


def test_a_mask_image_too_large_to_read_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    from fisedit_compiler.execution.plan import read_mask_png

    path = tmp_path / "mask.png"
    Image.new("L", (64, 64), 255).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)     # 4096 > 2x the limit: a bomb
    with pytest.raises(FiseditError, match="is too large to read"):
        read_mask_png(str(path))


def test_differs_outside_reads_the_finest_active_region_only():
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:8, 4:8] = True
    plan = MaskPlan(mask, [(16, 16), (8, 8)], [4, 2], 0, 1.0)
    old = torch.zeros(2, 4, 16, 16)
    inside, outside = old.clone(), old.clone()
    inside[..., 5, 5] = 1.0
    outside[..., 15, 0] = 1.0
    assert not plan.differs_outside(inside, old) and not plan.differs_outside(old, old)
    assert plan.differs_outside(outside, old)
    assert plan.differs_outside(torch.full_like(old, float("nan")), old)
