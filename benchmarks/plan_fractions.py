"""Active fraction per level of the bench's masks under several tile settings (CPU, seconds).

Why: `fisedit-compiler bench --tile` measures smaller tiles on the GPU; this says beforehand
what they change in the plan itself, where nothing is timed: the fraction of each level an
edit computes (finest level first), for the bench's blob and scattered masks.

    python benchmarks/plan_fractions.py [--latent 64] [--levels 4] [--dilation 1]
"""
import argparse

from fisedit_compiler.bench import placed_blob
from fisedit_compiler.execution.plan import MaskPlan, scattered_mask

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--latent", type=int, default=64, help="latent side (SD1.5 512 px: 64)")
parser.add_argument("--levels", type=int, default=4, help="spatial levels (SD1.5: 4)")
parser.add_argument("--dilation", type=int, default=1)
args = parser.parse_args()
levels = [(args.latent >> level, args.latent >> level) for level in range(args.levels)]
print("mask | " + " | ".join(f"tiles {tiles}" for tiles in ((4, 2, 1), (2, 1), (1,))))
for name, make in (("blob", placed_blob), ("scattered", scattered_mask)):   # as bench draws
    for area in (0.01, 0.05, 0.2):
        cells = []
        for tiles in ((4, 2, 1), (2, 1), (1,)):
            sides = [tiles[min(level, len(tiles) - 1)] for level in range(len(levels))]
            plan = MaskPlan(make(levels[0], area), levels, sides, args.dilation, 1.0)
            cells.append("/".join(f"{fraction:.1%}" for fraction in plan.fractions()))
        print(f"{name} {area:.0%} | " + " | ".join(cells))
