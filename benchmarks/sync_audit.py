"""Where an edit synchronises the host with the GPU, as users call it (GPU only).

    python benchmarks/sync_audit.py [--model sd15] [--steps 20] [--area 0.05]

An edit step that synchronises puts the host work after it (the pipeline's scheduler and
guidance, the session's bookkeeping, the next call's checks and launches) in series with the
GPU instead of under the step before. This script generates with ``EditSession``, edits once
with a new mask to warm up, then runs a second edit with another new mask under
``torch.cuda.set_sync_debug_mode("warn")`` and prints each synchronising call site (the
innermost frames of this package, diffusers and torch) with its count. ``--profile`` then
profiles a third edit (torch.profiler, CPU and CUDA): the edit's wall time, its summed GPU
kernel time and the kernels by GPU time, so that GPU work beside the U-Net step (the
pipeline's scheduler and guidance, the session's copies) shows against the step's own.
"""

from __future__ import annotations

import argparse
import collections
import time
import traceback
import warnings

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo

PROMPT, NEW_PROMPT = "a red ball on a table", "a blue ball on a table"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(bench.RESOLUTION))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--area", type=float, default=0.05)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    size = bench.RESOLUTION[args.model]
    latent = (size // 8, size // 8)
    pipe = zoo.pipeline(args.model).to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    session = fc.EditSession(pipe)
    session.generate(PROMPT, seed=0, output_type="latent", num_inference_steps=args.steps,
                     height=size, width=size)
    warm = bench.blob_mask(latent, args.area)
    session.edit(NEW_PROMPT, mask=warm, output_type="latent")
    audited = bench.blob_mask(latent, args.area * 1.3).roll((latent[0] // 5, -latent[1] // 7),
                                                           dims=(0, 1))
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno} {frame.name}"
                  for frame in traceback.extract_stack()[:-1]
                  if "warnings.py" not in frame.filename]
        sites["\n    ".join(frames[-6:])] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            session.edit(NEW_PROMPT, mask=audited, output_type="latent")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"{args.model}, {args.steps} steps, new {args.area * 1.3:.0%} mask: "
          f"{sum(sites.values())} synchronisations at {len(sites)} call sites")
    for site, count in sites.most_common():
        print(f"{count:4d}x\n    {site}")
    if args.profile:
        profile_edit(session, audited.roll(latent[1] // 3, dims=1), args.steps)


def profile_edit(session, mask, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        session.edit(NEW_PROMPT, mask=mask, output_type="latent")
        torch.cuda.synchronize()
    wall_ms = 1000 * (time.perf_counter() - started)
    kernels: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels[event.name[:100]] += event.device_time_total / 1000
            counts[event.name[:100]] += 1
    gpu_ms = sum(kernels.values())
    print(f"\nprofiled edit: wall {wall_ms:.1f} ms (under the profiler), GPU kernels "
          f"{sum(counts.values())} in {gpu_ms:.1f} ms; per step {gpu_ms / steps:.2f} ms")
    for name, ms in kernels.most_common(40):
        print(f"  {ms:8.3f} ms {counts[name]:6d}x {name}")


if __name__ == "__main__":
    main()
