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
latents as output (no VAE decode on either side). Every edit uses the same mask, so after
the warm-up the engine reuses its plan and captured graphs (``engine.plan``); the warm-up's
``first_sparse_step_s`` in ``edit_timings_s`` shows what capturing costs a new mask.

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
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("edit_e2e.py measures GPU time and needs CUDA")

    size = bench.RESOLUTION[args.model]
    pipe = zoo.pipeline(args.model).to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    prompt, new_prompt = "a dog on the sofa", "a dog on the sofa wearing a hat"
    common = dict(num_inference_steps=args.steps, height=size, width=size)

    session = fc.EditSession(pipe)
    session.generate(prompt, seed=0, output_type="latent", **common)
    mask = bench.blob_mask((size // 8, size // 8), args.area)
    reports = []

    def edit():
        result = session.edit(new_prompt, mask=mask, probe_steps=args.probe_steps,
                              output_type="latent")
        reports.append(result.report["timings_s"])

    edit_s = wall_s(edit, args.reps)

    unet = pipe.unet
    pipe.unet = torch.compile(unet, mode="reduce-overhead")
    regenerate = lambda: pipe(new_prompt, generator=torch.Generator().manual_seed(0),  # noqa
                              output_type="latent", **common)
    dense_s = wall_s(regenerate, args.reps)
    pipe.unet = unet

    result = {"model": args.model, "resolution_px": size, "steps": args.steps,
              "probe_steps": args.probe_steps, "mask_area": float(mask.float().mean()),
              "edit_s": edit_s, "dense_regeneration_s": dense_s,
              "speedup": dense_s / edit_s,
              # Per edit (warm-up first): probe steps, mask capture, the first sparse step
              # (which captures CUDA graphs for a new plan) and the rest.
              "edit_timings_s": reports, "environment": bench.environment()}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
