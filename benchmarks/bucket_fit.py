"""How well the capacity buckets fit masks they were not sized from (CPU, no model needed).

    python benchmarks/bucket_fit.py [--thresholds 0.5] [--thresholds 0.47,0.73,0.73,0.8]
                                    [--variants]

Edits on the CUDA-graph path run bucketed plans (``plan.capacity_buckets``): a mask takes the
first bucket whose per-level capacities hold its active tiles, is padded to them, and runs
every level dense where no bucket holds it. The buckets' lower-level capacities come from a
bank of seeded masks (``plan.mask_bank``), so a mask unlike the bank's can miss them. For
SD1.5's level layout at 512 px (64x64 latent, default tiles and dilation) and each threshold
setting, over 300 test masks drawn from another seed (rectangles, discs, 2-8 scattered
squares; 0.5-45% of the latent), this prints:

- how many masks plan *all dense* bucketed while their exact plan (the one the calibration
  times) keeps some level sparse: each such edit costs the dense step where the calibration
  found a sparse plan faster;
- the cost of the bucketed plan over the exact one, in tiles (padded capacities, or the whole
  level where dense), median and 90th percentile. A tile of every SD1.5 level costs about the
  same MACs (4x4 positions at 320 channels, 2x2 at 640, one at 1280), so tiles are added up
  unweighted; small edits are bound by kernel launches rather than MACs, so this is an upper
  bound on the time padding costs there.

``--variants`` adds two bucket sets that were considered for the misses and not adopted
(RESULTS.md, session 9): the bank's buckets plus *catch-all* buckets (level 0 at the last
bucket's capacity, every lower level at the most its threshold allows, then the same with the
last 1, 2, ... levels dense), and the bank's buckets merged with a second chain sized from
scattered masks of 2-8 blobs alone (``capacity_buckets(bank=...)``). Merged sets are ordered
by tile cost, so a mask takes the cheapest bucket that holds it.

``--placements`` instead compares a centred square (``blob_mask``, the bench's square until
session 11) and the bench's square (``bench.placed_blob``) with squares of the same area at 50
seeded places, under the engine's default config: the tiles each computes
(level 0's active tiles, and the bucketed plan's tile cost over all levels). A square placed
off the tile grid covers more tiles than one on it, so a step timed on the bench's blob may
understate what the same area costs where users paint it.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench
from fisedit_compiler.execution import plan as plans

LEVELS = [(64, 64), (32, 32), (16, 16), (8, 8)]


def test_masks(count: int = 300, seed: int = 12345) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for index in range(count):
        area = 0.005 + 0.45 * float(torch.rand((), generator=gen))
        if index % 4 == 0:
            aspect = 0.5 + 2 * float(torch.rand((), generator=gen))
            masks.append(plans.rectangle_mask(LEVELS[0], area, aspect, gen))
        elif index % 4 == 1:
            masks.append(plans.disc_mask(LEVELS[0], area, gen))
        else:
            blobs = int(torch.randint(2, 9, (1,), generator=gen))
            masks.append(plans.scattered_mask(LEVELS[0], area, blobs, seed=seed + index))
    return masks


def tile_cost(plan: plans.MaskPlan, counts: list[int], grids: list[int]) -> int:
    """Tiles the plan computes: the whole level where dense, else its capacity (or count)."""
    capacities = plan.bucket.tiles if plan.bucket is not None else counts
    return sum(grid if level.dense else capacity
               for level, capacity, grid in zip(plan.levels, capacities, grids))


def bucket_sets(thresholds, variants: bool) -> dict[str, list[plans.Bucket]]:
    """The engine's buckets, and with ``variants`` the two alternatives of the docstring."""
    config = fc.SparseConfig()
    tiles = config.tiles_for(LEVELS)
    grids = [(h // t) * (w // t) for (h, w), t in zip(LEVELS, tiles)]
    levels = [thresholds] * len(LEVELS) if isinstance(thresholds, float) else thresholds
    bank = plans.capacity_buckets(LEVELS, tiles, config.dilation, thresholds,
                                  config.bucket_ratio)
    sets = {"bank's buckets (the engine's)": bank}
    if not variants:
        return sets
    most = [min(grid, int(threshold * h * w) // (tile * tile))
            for grid, threshold, (h, w), tile in zip(grids, levels, LEVELS, tiles)]
    catch_all = [(bank[-1].tiles[0], *most[1:len(LEVELS) - dense], *[None] * dense)
                 for dense in range(len(LEVELS) - 1)]
    sets["+ catch-all buckets"] = _ordered([b.tiles for b in bank] + catch_all, grids)
    gen = torch.Generator().manual_seed(7)
    scattered = [plans.scattered_mask(LEVELS[0], 0.001 * 600 ** (step / 19), blobs,
                                      seed=int(torch.randint(0, 2 ** 31, (1,), generator=gen)))
                 for step in range(20) for blobs in (2, 3, 4, 5, 6, 8)]
    chain = plans.capacity_buckets(LEVELS, tiles, config.dilation, thresholds,
                                   config.bucket_ratio, bank=scattered)
    sets["+ a chain from scattered masks"] = _ordered([b.tiles for b in bank + chain], grids)
    return sets


def _ordered(capacities: list[tuple], grids: list[int]) -> list[plans.Bucket]:
    """Distinct capacity tuples as buckets, cheapest first (tiles, a dense level's all)."""
    def cost(tiles):
        return sum(grid if capacity is None else capacity for capacity, grid in zip(tiles, grids))
    return [plans.Bucket(index, tiles)
            for index, tiles in enumerate(sorted(dict.fromkeys(capacities), key=cost))]


def fit(thresholds, masks, buckets: list[plans.Bucket]) -> dict:
    config = fc.SparseConfig()
    tiles = config.tiles_for(LEVELS)
    grids = [(h // t) * (w // t) for (h, w), t in zip(LEVELS, tiles)]
    missed, ratios = 0, []
    for mask in masks:
        exact = plans.MaskPlan(mask, LEVELS, tiles, config.dilation, thresholds)
        if exact.full:
            continue
        bucketed = plans.MaskPlan(mask, LEVELS, tiles, config.dilation, thresholds,
                                  buckets=buckets)
        missed += bucketed.full
        counts = plans.tile_counts(mask, LEVELS, tiles, config.dilation)
        ratios.append(tile_cost(bucketed, counts, grids) / tile_cost(exact, counts, grids))
    ratios.sort()
    return {"sparse_exact": len(ratios), "all_dense_bucketed": missed,
            "cost_median": statistics.median(ratios),
            "cost_p90": ratios[int(0.9 * (len(ratios) - 1))]}


def placements(areas=(0.01, 0.05, 0.2), count: int = 50, seed: int = 3) -> None:
    """The bench's blob against squares of its area at ``count`` seeded places (docstring)."""
    config = fc.SparseConfig()
    tiles = config.tiles_for(LEVELS)
    grids = [(h // t) * (w // t) for (h, w), t in zip(LEVELS, tiles)]
    thresholds = config.thresholds_for(LEVELS)
    buckets = plans.capacity_buckets(LEVELS, tiles, config.dilation, thresholds,
                                     config.bucket_ratio)

    def tiles_of(mask) -> tuple[int, int]:
        counts = plans.tile_counts(mask, LEVELS, tiles, config.dilation)
        bucketed = plans.MaskPlan(mask, LEVELS, tiles, config.dilation, thresholds,
                                  buckets=buckets)
        return counts[0], tile_cost(bucketed, counts, grids)

    gen = torch.Generator().manual_seed(seed)
    print("| area | centred square: level-0 tiles, bucketed tile cost | the bench's square "
          f"(`placed_blob`) | squares at {count} places: level-0 tiles median / max | "
          "bucketed tile cost median / max |")
    print("|---|---|---|---|---|")
    for area in areas:
        blob = tiles_of(plans.blob_mask(LEVELS[0], area))
        placed_blob = tiles_of(bench.placed_blob(LEVELS[0], area))
        placed = [tiles_of(plans.rectangle_mask(LEVELS[0], area, 1.0, gen)) for _ in range(count)]
        level0, cost = sorted(p[0] for p in placed), sorted(p[1] for p in placed)
        print(f"| {area:.0%} | {blob[0]}, {blob[1]} | {placed_blob[0]}, {placed_blob[1]} | "
              f"{statistics.median(level0):.0f} / "
              f"{level0[-1]} | {statistics.median(cost):.0f} / {cost[-1]} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", action="append", default=None,
                        help="per-level dense thresholds, comma-separated (repeatable); "
                             "default: 0.5, and session 8 run 4's calibrated ones")
    parser.add_argument("--variants", action="store_true",
                        help="also the catch-all buckets and a second chain (docstring)")
    parser.add_argument("--placements", action="store_true",
                        help="the bench's blob against squares of its area at seeded places")
    args = parser.parse_args(argv)
    if args.placements:
        placements()
        return
    settings = args.thresholds or ["0.5", "0.4746,0.7344,0.7344,0.7969"]
    masks = test_masks()
    print("| thresholds | bucket set | buckets | masks sparse exact | of them all dense bucketed | "
          "tile cost bucketed / exact: median | p90 | costliest two (capacities per level) |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in settings:
        values = [float(value) for value in setting.split(",")]
        thresholds = values[0] if len(values) == 1 else values
        for name, buckets in bucket_sets(thresholds, args.variants).items():
            row = fit(thresholds, masks, buckets)
            last = "; ".join(str(b.tiles) for b in buckets[-2:])
            print(f"| {setting} | {name} | {len(buckets)} | {row['sparse_exact']} | "
                  f"{row['all_dense_bucketed']} | {row['cost_median']:.3f} | "
                  f"{row['cost_p90']:.3f} | {last} |")


if __name__ == "__main__":
    main()
