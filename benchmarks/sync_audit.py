"""Where an edit synchronises the host with the GPU, as users call it (GPU only).

    python benchmarks/sync_audit.py [--model sd15] [--steps 20] [--area 0.05]

An edit step that synchronises puts the host work after it (the pipeline's scheduler and
guidance, the session's bookkeeping, the next call's checks and launches) in series with the
GPU instead of under the step before. This script generates with ``EditSession``, edits once
with a new mask to warm up, then runs a second edit with another new mask under
``torch.cuda.set_sync_debug_mode("warn")`` and prints each synchronising call site (the
innermost frames of this package, diffusers and torch) with its count.
"""

from __future__ import annotations

import argparse
import collections
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


if __name__ == "__main__":
    main()
