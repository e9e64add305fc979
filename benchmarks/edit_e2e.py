"""End-to-end edit time against dense regeneration (issue 5), on a GPU.

For a zoo pipeline (random weights, same compute as trained ones) at its native resolution:
generate once with an ``EditSession`` (recording every step), then time

* the edit: ``probe_steps`` dense probe steps with the new prompt, then the remaining steps
  sparse under a square user mask of ``--area`` of the latent (the automatic mask of a
  random-weight model is empty; ``benchmarks/edit_quality.py`` measures the automatic mask on
  the trained shapes model);
* dense regeneration of the new prompt with the same pipeline, steps and scheduler.

Both sides run their dense U-Net calls through ``torch.compile`` with CUDA graphs (the session
through ``engine.dense``, the regeneration through ``torch.compile(pipe.unet,
mode="reduce-overhead")``), and the sparse steps on Triton kernels with CUDA graphs. Each is
warmed up once (compilation, capture, autotuning) and then timed over ``--reps`` runs with the
latents as output (no VAE decode on either side). Two kinds of edit are timed:

* repeat edits (``edit_s``): every edit uses the same mask, so after the warm-up the engine
  reuses its plan and captured graphs (``engine.plan``);
* new-mask edits (``new_mask_edit_s``): each edit's mask is the square moved by one more latent
  pixel, as when a user edits again with another prompt, so each pays planning, CUDA-graph
  capture and any autotuning a new size bucket needs.

``edit_timings_s`` and ``new_mask_timings_s`` hold every edit's phases (probe steps, mask,
the first sparse step, which captures the graphs of a new plan, and the rest).

    python benchmarks/edit_e2e.py --model sd15 --steps 50 --probe-steps 10 --area 0.05
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo


def wall_s(fn, reps: int) -> float:
    """Median wall seconds of ``fn`` (synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(bench.RESOLUTION))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--probe-steps", type=int, default=10)
    parser.add_argument("--area", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cache-budget-gib", type=float, metavar="GIB",
                        help="recorded steps beyond this many GiB on the GPU go to pinned host "
                             "memory (sdxl records ~1.4 GiB per step)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("edit_e2e.py measures GPU time and needs CUDA")

    size = bench.RESOLUTION[args.model]
    pipe = zoo.pipeline(args.model).to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    prompt, new_prompt = "a dog on the sofa", "a dog on the sofa wearing a hat"
    common = dict(num_inference_steps=args.steps, height=size, width=size)

    budget = None if args.cache_budget_gib is None else int(args.cache_budget_gib * 2**30)
    session = fc.EditSession(pipe, cache_budget_bytes=budget)
    session.generate(prompt, seed=0, output_type="latent", **common)
    mask = bench.blob_mask((size // 8, size // 8), args.area)
    reports, new_mask_reports = [], []

    def edit(edit_mask=mask, timings=reports):
        result = session.edit(new_prompt, mask=edit_mask, probe_steps=args.probe_steps,
                              output_type="latent")
        timings.append(result.report["timings_s"])

    edit_s = wall_s(edit, args.reps)
    shifts = iter(range(1, 2 * args.reps + 2))
    new_mask_edit = lambda: edit(mask.roll(next(shifts), dims=1), new_mask_reports)  # noqa
    new_mask_edit_s = wall_s(new_mask_edit, args.reps)

    unet = pipe.unet
    pipe.unet = torch.compile(unet, mode="reduce-overhead")
    regenerate = lambda: pipe(new_prompt, generator=torch.Generator().manual_seed(0),  # noqa
                              output_type="latent", **common)
    dense_s = wall_s(regenerate, args.reps)
    pipe.unet = unet

    result = {"model": args.model, "resolution_px": size, "steps": args.steps,
              "probe_steps": args.probe_steps, "mask_area": float(mask.float().mean()),
              "cache_budget_gib": args.cache_budget_gib,
              "edit_s": edit_s, "new_mask_edit_s": new_mask_edit_s,
              "dense_regeneration_s": dense_s, "speedup": dense_s / edit_s,
              "new_mask_speedup": dense_s / new_mask_edit_s,
              # Per edit (warm-up first): probe steps, mask capture, the first sparse step
              # (which captures CUDA graphs for a new plan) and the rest.
              "edit_timings_s": reports, "new_mask_timings_s": new_mask_reports,
              "environment": bench.environment()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
