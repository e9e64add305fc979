"""End-to-end edits as users make them, against dense regeneration, on a GPU (issue 14).

For a zoo pipeline (random weights, same compute as trained ones) at its native resolution,
in one process:

1. ``EditSession.generate`` (recording every step), timed, then what it prepares for edits
   (``engine.prepare``: the dense graph of the probe steps, one captured sparse step per
   capacity bucket), reported apart as a one-time cost;
2. the **first edit after generate**, with a mask never seen before (and the same mask again
   at the end, to compare the first edit with later ones doing the same work);
3. **new-mask edits**: successive edits of the same generation, each with a new mask of a new
   size and place: seeded single blobs (squares, rectangles, discs) and scattered squares,
   ``--area`` of the latent (+-20%) in one group and 1-20% in another;
4. **repeat-mask edits**: the last mask again;
5. **dense regeneration** of the edited prompt with the strongest dense setting a diffusers
   user would pick (a copy of the U-Net in channels_last with fused QKV projections, 1x1
   convs as matmuls, ``torch.compile`` with CUDA graphs: the best of ``reduce-overhead`` and
   ``max-autotune``), and dense eager beside it.

Every edit passes a user mask (a random-weight model's automatic mask covers the whole
latent: nothing to localise) and runs as
``EditSession.edit`` does by default with one: every step sparse, from the first (the default
mask estimator needs no dense steps). ``--probe-steps N`` runs the first N steps dense instead,
as FISEdit's probe does (10 of 50). Latents out on both sides (no VAE decode). Each edit is timed from an idle GPU to its synchronised end, with its phases from
``report["timings_s"]``. Prints a table and writes JSON.

    python benchmarks/edit_e2e.py --model sd15 --steps 50 --area 0.05 [--probe-steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.execution import plan

PROMPT, NEW_PROMPT = "a dog on the sofa", "a dog on the sofa wearing a hat"


# Not engine.timing.synchronized_s: `gpu_run.sh e2e-ab` runs this script on an earlier tree's
# package, which may predate it.
def synchronized_s(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def new_masks(size: tuple[int, int], areas: list[float], seed: int) -> list[torch.Tensor]:
    """One mask per area, alternating shapes (square, wide, tall, disc, scattered), each at a
    seeded new place."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for index, area in enumerate(areas):
        shape = index % 5
        if shape == 4:
            masks.append(plan.scattered_mask(size, area, 4, seed=seed * 100 + index))
        elif shape == 3:
            masks.append(plan.disc_mask(size, area, gen))
        else:
            masks.append(plan.rectangle_mask(size, area, (1.0, 2.0, 0.5)[shape], gen))
    return masks


def strongest_dense(unet, mode: str):
    """``unet`` as a diffusers user tuning for speed would run it (``bench.tuned_unet``)."""
    return bench.compiled_dense(unet, bench.TUNED + mode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(bench.RESOLUTION))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--probe-steps", type=int, default=None,
                        help="dense steps before the sparse ones (default: the session's, "
                             "none with a user mask)")
    parser.add_argument("--area", type=float, default=0.05)
    parser.add_argument("--edits", type=int, default=6, help="new-mask edits per group")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-modes", default="reduce-overhead,max-autotune",
                        help="torch.compile modes of the dense side; max-autotune compiles "
                             "SD1.5 for several minutes")
    parser.add_argument("--cache-budget-gib", type=float, metavar="GIB",
                        help="recorded steps beyond this many GiB on the GPU go to pinned host "
                             "memory (sdxl records ~1.4 GiB per step)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("edit_e2e.py measures GPU time and needs CUDA")

    size = bench.RESOLUTION[args.model]
    latent = (size // 8, size // 8)
    pipe = zoo.pipeline(args.model).to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=args.steps, height=size, width=size)
    budget = None if args.cache_budget_gib is None else int(args.cache_budget_gib * 2**30)
    session = fc.EditSession(pipe, cache_budget_bytes=budget)
    generate_s = synchronized_s(lambda: session.generate(PROMPT, seed=0, output_type="latent",
                                                         **common))
    prepare = dict(session.prepare_report)
    print(f"generate {generate_s:.2f} s; prepare {prepare['prepare_s']:.2f} s "
          f"({prepare['graphs_captured']} graphs)", flush=True)

    def edit(mask) -> dict:
        holder = {}

        def run():
            holder["result"] = session.edit(NEW_PROMPT, mask=mask, probe_steps=args.probe_steps,
                                            output_type="latent")
        wall = synchronized_s(run)
        report = holder["result"].report
        print(f"edit: {wall:.3f} s, mask {report['mask_area_fraction']:.1%}, "
              f"{report['timings_s']}", flush=True)
        return {"wall_s": wall, "mask_area": report["mask_area_fraction"],
                "active_area": report["active_area_fraction"],
                "bucket": None if holder["result"].plan.bucket is None
                else holder["result"].plan.bucket.index,
                "timings_s": report["timings_s"]}

    gen = torch.Generator().manual_seed(7)
    around = [args.area * (0.8 + 0.4 * float(torch.rand((), generator=gen)))
              for _ in range(args.edits)]
    spread = [0.01 + 0.19 * float(torch.rand((), generator=gen)) for _ in range(args.edits)]
    first_mask = new_masks(latent, [args.area], seed=1)[0]
    first = edit(first_mask)
    at_area = [edit(mask) for mask in new_masks(latent, around, seed=2)]
    spread_edits = [edit(mask) for mask in new_masks(latent, spread, seed=3)]
    repeat = [edit(new_masks(latent, around, seed=2)[-1]) for _ in range(args.reps)]
    # The first edit against later edits with the same mask (same bucket, same work).
    first_again = [edit(first_mask) for _ in range(args.reps)]

    regenerate = lambda: pipe(NEW_PROMPT, generator=torch.Generator().manual_seed(0),  # noqa
                              output_type="latent", **common)
    unet = pipe.unet
    dense = {"eager": min(synchronized_s(regenerate) for _ in range(args.reps))}
    for mode in args.dense_modes.split(","):
        pipe.unet = strongest_dense(unet, mode)
        synchronized_s(regenerate)
        synchronized_s(regenerate)               # CUDA graphs record on a later call
        dense[mode] = min(synchronized_s(regenerate) for _ in range(args.reps))
        pipe.unet = unet
        print(f"dense regeneration {mode}: {dense[mode]:.3f} s", flush=True)
    best_mode = min((m for m in dense if m != "eager"), key=dense.__getitem__)
    best = dense[best_mode]

    median = lambda edits: statistics.median(e["wall_s"] for e in edits)  # noqa: E731
    result = {
        "model": args.model, "resolution_px": size, "steps": args.steps,
        "probe_steps": args.probe_steps, "area": args.area,
        "generate_s": generate_s, "prepare": prepare,
        "first_edit_after_generate": first,
        "new_mask_edits_at_area": at_area, "new_mask_edits_1_to_20": spread_edits,
        "repeat_mask_edits": repeat, "first_mask_again": first_again,
        "dense_regeneration_s": dense, "best_dense_mode": best_mode,
        "summary": {
            "first_edit_s": first["wall_s"],
            "new_mask_at_area_median_s": median(at_area),
            "new_mask_1_to_20_median_s": median(spread_edits),
            "repeat_mask_median_s": median(repeat),
            "best_dense_s": best,
            "speedup_new_mask_at_area": best / median(at_area),
            "speedup_new_mask_1_to_20": best / median(spread_edits),
            "speedup_repeat": best / median(repeat),
            "new_over_repeat": median(at_area) / median(repeat),
            "first_over_later": first["wall_s"] / median(first_again),
        },
        "environment": bench.environment(),
    }
    print(json.dumps(result, indent=1))
    summary = result["summary"]
    probes = "default (none)" if args.probe_steps is None else args.probe_steps
    print(f"\n{args.model} {size} px, {args.steps} steps, probe steps {probes}; "
          f"generate {generate_s:.2f} s, prepare {prepare['prepare_s']:.2f} s "
          f"({prepare['graphs_captured']} graphs)")
    print("dense regeneration: " + ", ".join(f"{m} {s:.3f} s" for m, s in dense.items()))
    for name in ("first_edit_s", "new_mask_at_area_median_s", "new_mask_1_to_20_median_s",
                 "repeat_mask_median_s"):
        print(f"{name:28s} {summary[name]:.3f} s  ({best / summary[name]:.2f}x vs best dense)")
    print(f"new/repeat {summary['new_over_repeat']:.3f}, first/later "
          f"{summary['first_over_later']:.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
