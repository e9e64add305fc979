"""Where an edit's checks go: EditSession.edit's work before its run (the report's ``checks_s``).

    python benchmarks/edit_checks.py [--model sd15] [--edits 5]

A zoo pipeline at its native resolution (fp16 on CUDA, fp32 on the CPU), a generation of two
steps without CUDA graphs (the checks do not depend on them, and capturing every bucket's
graph would take a minute and a half), then ``--edits`` (at least 2) edits, each with a new
user mask (a square of 1-20% of the latent at a new place, seeded), latents out, each from an
idle GPU: the report's ``checks_s`` (the edit call's entry to its run's start, on the device's
timeline: host time, since the GPU is idle) and ``edit_s`` beside the call's synchronised
wall time. Then one more edit under cProfile: the time of
each function ``edit`` calls directly, which splits the checks (``_decoder_identity``,
``_check_unchanged``, ``_warn_if_truncated``, ...) from the run (``_run``) and the report
(``_report``); cProfile's own overhead inflates every row, so compare rows with each other,
not with ``checks_s``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics

import torch

import fisedit_compiler as fc
from fisedit_compiler import zoo
from fisedit_compiler.engine.timing import synchronized_s
from fisedit_compiler.execution import plan

PROMPT, NEW_PROMPT = "a dog on the sofa", "a dog on the sofa wearing a hat"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(zoo.PIPELINE_NAMES))
    parser.add_argument("--edits", type=int, default=5)
    args = parser.parse_args(argv)
    if args.edits < 2:
        parser.error("--edits must be at least 2: the first edit is reported apart")
    cuda = torch.cuda.is_available()
    pipe = zoo.pipeline(args.model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe = pipe.to("cuda", torch.float16) if cuda else pipe
    pipe.set_progress_bar_config(disable=True)
    session = fc.EditSession(pipe, fc.SparseConfig(cuda_graphs=False))
    session.generate(PROMPT, seed=0, num_inference_steps=2, height=size, width=size,
                     output_type="latent")
    latent = pipe.unet.config.sample_size
    gen = torch.Generator().manual_seed(1)
    results = []

    def edit():
        area = 0.01 + 0.19 * float(torch.rand((), generator=gen))
        shift = [int(v) for v in torch.randint(-latent // 3, latent // 3, (2,), generator=gen)]
        mask = plan.blob_mask((latent, latent), area).roll(shift, dims=(0, 1))
        results.append(session.edit(NEW_PROMPT, mask=mask, output_type="latent"))

    walls = [synchronized_s(edit) for _ in range(args.edits)]
    print(f"{args.model} {size} px, {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU'}"
          f", 2 steps, a new 1-20% user mask each edit, latents out")
    print("| edit | wall ms | edit_s ms | checks_s ms |")
    print("|---|---|---|---|")
    for index, (wall, result) in enumerate(zip(walls, results)):
        timings = result.report["timings_s"]
        print(f"| {index + 1} | {1e3 * wall:.2f} | {1e3 * timings['edit_s']:.2f} | "
              f"{1e3 * timings['checks_s']:.2f} |")
    later = [result.report["timings_s"]["checks_s"] for result in results[1:]]
    print(f"checks_s median of edits 2-{len(results)}: {1e3 * statistics.median(later):.2f} ms")
    profiler = cProfile.Profile()
    if cuda:
        torch.cuda.synchronize()
    profiler.enable()
    edit()
    profiler.disable()
    print("\nwhat edit calls, by cumulative time (cProfile, one edit):")
    for name, ms in callees_ms(pstats.Stats(profiler), "edit")[:15]:
        print(f"{ms:9.3f} ms  {name}")


def callees_ms(stats: pstats.Stats, caller: str) -> list[tuple[str, float]]:
    """The functions ``caller`` (EditSession's method of that name) calls directly, with the
    cumulative milliseconds spent in each from that caller, longest first."""
    keys = [key for key in stats.stats
            if key[2] == caller and key[0].endswith("edit_flow/session.py")]
    rows = []
    for (path, line, name), (_, _, _, _, callers) in stats.stats.items():
        for key in keys:
            if key in callers:
                rows.append((f"{name} ({path.rsplit('/', 1)[-1]}:{line})",
                             1e3 * callers[key][3]))
    return sorted(rows, key=lambda row: -row[1])


if __name__ == "__main__":
    main()
