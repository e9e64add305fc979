"""Edit quality with ground truth, per mask estimator, on the trained "shapes" pipeline.

For a fixed, balanced set of prompt-edit pairs (``shapes.render.benchmark_pairs``: add, remove,
colour, move, background, in turn), each pair's original scene is generated with an
EditSession and edited automatically with every variant: a mask estimator of
``edit_flow.mask.ESTIMATORS`` and the number of dense steps before the sparse ones
(``estimator@dense_steps``; ``probe@5`` is FISEdit's probe with 5 of 20 steps, the ratio of its
10 of 50). Per variant:

* mask IoU: the mask against the region the renderer says truly changes (at latent
  resolution); whether the change was detected as global (planned dense);
* success: the checker (``shapes.checker``) on the edited image against the edited caption
  (every object's colour, position, shape and size, the background, no extra objects); also
  on the original generation and on a plain dense generation of the edited prompt from the
  same noise, which bound what an edit can reach;
* fidelity: PSNR inside the truly changed region (pixels) against that dense generation;
* background: outside the edit's region (``result.region``: its mask grown by the dilation)
  the final latents must equal the original's (``latent_max_diff_outside``: 0) and, with
  ``EditSession.edit``'s default compositing, so do the decoded pixels
  (``pixel_max_diff_outside``: 0);
* cost: the dense U-Net evaluations spent on the mask (one = one denoising step's batched
  call), the edit's wall time against a plain dense generation, and the MACs ratio.

    python benchmarks/edit_quality.py --pairs 500 --out benchmarks/results/edit-quality

writes ``edit_quality.json`` (summary + one record per pair; saved with the figures every 10
pairs, so a run cut short leaves its results), ``examples.png`` (rows: rendered truth, generated original, the
edits and masks of the first variants, the true region, the dense generation of the edited
prompt) and ``iou_by_kind.png`` (needs matplotlib). Runs split with ``--start`` are combined
with ``--merge a/edit_quality.json b/edit_quality.json --out DIR``; ``--workers N`` does both
on one many-core machine (N one-thread processes, then the merge), and ``--time-limit``
stops a run cleanly (for a command limit). ``--random-tiny`` uses a
randomly initialised tiny shapes pipeline (numbers meaningless; for tests).

``--gpu-timing sd15`` measures instead, on the GPU, each variant's edit time on a zoo pipeline
with random weights (``--size`` 512, ``--steps`` 50, fp16): random weights give no meaningful
mask, so the edit runs with a centred square user mask of ``--area`` (default 5%) and the
variant's dense steps, and the estimator's own cost (``report["timings_s"]["mask_s"]``, its
U-Net call) is measured apart and added; writes ``gpu_timing.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import fisedit_compiler as fc
from fisedit_compiler.edit_flow import mask as tac
from fisedit_compiler.shapes import checker, model, render

VARIANTS = ("probe@5", "noise-contrast@0", "noise-contrast@2", "x0@0", "cross-attention@0",
            "noise-contrast+cross-attention@0")
PSNR_CAP = 100.0   # dB, reported when the two images are identical inside the region
OBJECT_KINDS = ("add", "remove", "colour", "move")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=500, help="number of pairs (default 500)")
    p.add_argument("--start", type=int, default=0, help="first pair index (default 0)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="edit-quality", help="output folder")
    p.add_argument("--pipeline", default=None,
                   help="a saved shapes pipeline folder (default: zoo.pipeline('shapes'))")
    p.add_argument("--random-tiny", action="store_true",
                   help="a randomly initialised tiny shapes pipeline (tests; numbers meaningless)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default 20; 50 with --gpu-timing)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated estimator@dense_steps (estimators: "
                        f"{', '.join(tac.ESTIMATORS)})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--examples", type=int, default=10, help="pairs in examples.png")
    p.add_argument("--workers", type=int, default=1,
                   help="split the pairs into this many processes of one thread each, then "
                        "merge their results into --out (many-core machines)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new pair after this many seconds (one pair always runs); "
                        "the results so far are saved (marked incomplete)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine these runs' edit_quality.json into --out; runs nothing")
    p.add_argument("--gpu-timing", metavar="MODEL",
                   help="time the variants on a zoo pipeline with random weights (e.g. sd15)")
    p.add_argument("--size", type=int, default=512, help="--gpu-timing image size (512)")
    p.add_argument("--area", type=float, default=0.05, help="--gpu-timing mask area (0.05)")
    p.add_argument("--repeats", type=int, default=3, help="--gpu-timing timed repeats (3)")
    return p.parse_args(argv)


def parse_variants(text: str) -> list[tuple[str, str, int]]:
    """``[(label, estimator, dense_steps)]`` from ``"probe@5,noise-contrast@0"``."""
    variants = []
    for label in (v.strip() for v in text.split(",") if v.strip()):
        estimator, _, dense = label.partition("@")
        if estimator not in tac.ESTIMATORS or not dense.isdigit():
            raise SystemExit(f"--variants: {label!r} is not estimator@dense_steps with an "
                             f"estimator of {', '.join(tac.ESTIMATORS)}")
        variants.append((label, estimator, int(dense)))
    return variants


def load(args):
    if args.random_tiny:
        pipe = model.build_pipeline(tiny=True, seed=0)
    elif args.pipeline:
        pipe = fc.zoo.pipeline(None, path=args.pipeline)
    else:
        pipe = fc.zoo.pipeline("shapes")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, device


# ------------------------------------------------------------------------------- measurements

def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool().cpu(), b.bool().cpu()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def upsample(mask: torch.Tensor, size: int) -> np.ndarray:
    factor = size // mask.shape[0]
    return np.kron(mask.cpu().numpy().astype(np.uint8), np.ones((factor, factor),
                                                                dtype=np.uint8)).astype(bool)


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def pixel_diff(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return 0.0
    return float(np.abs(to_uint8(a).astype(np.int16) - to_uint8(b).astype(np.int16))[where]
                 .max())


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float | None:
    """PSNR (dB, 8-bit peak) of two [0, 1] images over ``where``; None for an empty region."""
    if not where.any():
        return None
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2)[where].mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(1.0 / mse))


def edit_record(pair, result, original_image, original_latents, regenerated) -> dict:
    image = result.images[0]
    active = result.plan.levels[0].active
    outside = ~result.region.to(result.latents.device)
    truth = render.latent_region(pair)
    changed = render.changed_region(pair, image.shape[0]).numpy()
    report = result.report
    check = checker.check(image, pair.edited)
    return {
        "mask_iou": iou(result.mask, truth),
        "mask_area": float(result.mask.float().mean()),
        "active_area": float(active.float().mean()),
        "global_change": report["global_change"],
        "success": check["scene"],
        "check": {k: check[k] for k in ("background", "no_extra")},
        "psnr_vs_regenerated": psnr(image, regenerated, changed),
        "latent_max_diff_outside": float((result.latents - original_latents)[..., outside].abs()
                                         .max()) if outside.any() else 0.0,
        "pixel_max_diff_outside": pixel_diff(image, original_image,
                                             ~upsample(result.region, image.shape[0])),
        "mask_unet_evaluations": report["mask_unet_evaluations"],
        "edit_s": report["timings_s"]["edit_s"],
        "mask_s": report["timings_s"]["mask_s"],
        "macs_ratio": report["macs"]["macs_ratio"],
    }


def run_pair(pair, session, variants, args) -> tuple[dict, dict]:
    """All measurements of one pair; also returns the images for the example grid."""
    pipe = session.pipe
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  output_type="np")
    record = {"index": pair.seed, "kind": pair.kind, "prompt": pair.prompt,
              "edit_prompt": pair.edit_prompt,
              "true_area": float(render.latent_region(pair).float().mean())}

    original = session.generate(pair.prompt, seed=pair.seed, **common)[0]
    original_latents = session.original.latents[-1]
    record["original_check"] = checker.check(original, pair.original)["scene"]

    # Plain dense generation of the edited prompt from the same noise: the speed baseline, the
    # fidelity reference and what the checker says of a regeneration.
    start = time.perf_counter()
    with torch.no_grad():
        regenerated = pipe(pair.edit_prompt, latents=session.original.noise.clone(),
                           **common).images[0]
    record["dense_generation_s"] = time.perf_counter() - start
    record["regenerated_check"] = checker.check(regenerated, pair.edited)["scene"]

    images = {"original": original, "regenerated": regenerated,
              "truth_mask": render.latent_region(pair)}
    for label, estimator, dense_steps in variants:
        result = session.edit(pair.edit_prompt, mask_estimator=estimator,
                              probe_steps=dense_steps, output_type="np")
        record[label] = edit_record(pair, result, original, original_latents, regenerated)
        images[label], images[f"{label}_mask"] = result.images[0], result.mask
    return record, images


# ---------------------------------------------------------------------------------- summaries

def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def summarise(records: list[dict], variants: list[str]) -> dict:
    objects = [r for r in records if r["kind"] in OBJECT_KINDS]
    out = {"pairs": len(records),
           "original_success": mean(r["original_check"] for r in records),
           "regenerated_success": mean(r["regenerated_check"] for r in records),
           "dense_generation_s": median(r["dense_generation_s"] for r in records)}
    for name in variants:
        rows = [r[name] for r in records]
        edit_s = median(x["edit_s"] for x in rows)
        out[name] = {
            "object_mask_iou": mean(r[name]["mask_iou"] for r in objects),
            "mask_iou": mean(x["mask_iou"] for x in rows),
            "success": mean(x["success"] for x in rows),
            "global_detected": mean(x["global_change"] for x in rows),
            "psnr_vs_regenerated": mean(x["psnr_vs_regenerated"] for x in rows),
            "latent_max_diff_outside": max(x["latent_max_diff_outside"] for x in rows),
            "pixel_max_diff_outside": max(x["pixel_max_diff_outside"] for x in rows),
            "mask_unet_evaluations": mean(x["mask_unet_evaluations"] for x in rows),
            "edit_s": edit_s,
            "speedup_vs_dense_generation": out["dense_generation_s"] / edit_s if edit_s else None,
            "macs_ratio": mean(x["macs_ratio"] for x in rows),
        }
    by_kind = defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r)
    out["by_kind"] = {
        kind: {"pairs": len(rows), "true_area": mean(r["true_area"] for r in rows),
               "regenerated_success": mean(r["regenerated_check"] for r in rows),
               **{f"{v}_{m}": mean(r[v][m] for r in rows) for v in variants
                  for m in ("mask_iou", "success", "global_change")}}
        for kind, rows in by_kind.items()}
    return out


def write_examples(examples: list[tuple], variants: list[str], path: Path) -> str:
    """One row per pair: truth, original, then per variant (up to 3) its edit and its mask on
    the original, the true region, the dense generation of the edited prompt."""
    rows = []
    for pair, images in examples:
        truth = render.to_uint8(render.render([pair.original]))[0]
        size = truth.shape[0]

        def overlay(image, mask):
            out = to_uint8(image).copy()
            m = upsample(mask, size)
            out[m] = (0.55 * out[m] + 0.45 * np.array([255, 0, 0])).astype(np.uint8)
            return out

        columns = [truth, to_uint8(images["original"])]
        for name in variants[:3]:
            columns += [to_uint8(images[name]), overlay(images["original"],
                                                        images[f"{name}_mask"])]
        columns += [overlay(images["original"], images["truth_mask"]),
                    to_uint8(images["regenerated"])]
        rows.append(np.concatenate(columns, axis=1))
    grid = np.concatenate(rows, axis=0)
    from PIL import Image

    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                 Image.NEAREST).save(path)
    return str(path)


def write_plot(summary: dict, variants: list[str], path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping iou_by_kind.png (the numbers are in "
              "edit_quality.json under by_kind)")
        return None
    kinds = list(summary["by_kind"])
    x = np.arange(len(kinds))
    width = 0.8 / len(variants)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for metric, ax, label in (("mask_iou", axes[0], "IoU with the true changed region"),
                              ("success", axes[1], "checker success")):
        for i, variant in enumerate(variants):
            ax.bar(x + (i - (len(variants) - 1) / 2) * width,
                   [summary["by_kind"][k][f"{variant}_{metric}"] or 0 for k in kinds], width,
                   label=variant)
        ax.set_xticks(x, kinds)
        ax.set_ylim(0, 1)
        ax.set_ylabel(label)
    axes[0].set_title(f"Mask IoU by edit kind ({summary['pairs']} pairs)")
    axes[1].set_title("Edit success by edit kind")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------- GPU timing

def gpu_timing(args, variants) -> dict:
    """Per variant: the edit time with a centred square mask of ``args.area`` and the variant's
    dense steps, plus its estimator's own time (the U-Net call on the recorded trajectory, from
    an edit that estimates), against a dense generation; random-weight zoo pipeline."""
    device = torch.device(args.device or "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = fc.zoo.pipeline(args.gpu_timing).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    session = fc.EditSession(pipe)
    common = dict(num_inference_steps=args.steps, height=args.size, width=args.size)
    prompt, edit = "a red circle on a white table", "a blue circle on a white table"
    session.generate(prompt, seed=0, output_type="latent", **common)
    latent = session.original.noise.shape[-1]
    side = max(1, round(latent * math.sqrt(args.area)))
    box = torch.zeros(latent, latent, dtype=torch.bool)
    box[(latent - side) // 2:(latent + side) // 2, (latent - side) // 2:(latent + side) // 2] = 1

    def best(run) -> float:
        run()                                       # warm: programs, plans, CUDA graphs
        return min(run() for _ in range(args.repeats))

    def dense() -> float:
        start = time.perf_counter()
        pipe(edit, generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
             guidance_scale=7.5, **common)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    out = {"model": args.gpu_timing, "size": args.size, "steps": args.steps,
           "mask_area": float(box.float().mean()), "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "dense_generation_s": best(dense), "variants": {}}
    for label, estimator, dense_steps in variants:
        def boxed() -> float:
            return session.edit(edit, mask=box, probe_steps=dense_steps,
                                output_type="latent").report["timings_s"]["edit_s"]

        def estimate() -> float:
            # The probe's cost is its dense steps, already in the boxed edit.
            if not tac.ESTIMATORS[estimator].before_step_zero:
                return 0.0
            return session.edit(edit, mask_estimator=estimator, probe_steps=dense_steps,
                                output_type="latent").report["timings_s"]["mask_s"]

        edit_s, mask_s = best(boxed), best(estimate)
        out["variants"][label] = {"edit_s": edit_s + mask_s, "mask_s": mask_s,
                                  "speedup_vs_dense": out["dense_generation_s"] / (edit_s + mask_s)}
        print(label, out["variants"][label], flush=True)
    return out


# ---------------------------------------------------------------------------------------- main

def finish(records, variants, examples, setup, out: Path) -> dict:
    summary = summarise(records, variants)
    summary["setup"] = setup
    files = {"examples": write_examples(examples, variants, out / "examples.png")
             if examples else None,
             "plot": write_plot(summary, variants, out / "iou_by_kind.png")}
    (out / "edit_quality.json").write_text(json.dumps(
        {"summary": summary, "files": files, "pairs": records}, indent=2), encoding="utf-8")
    return summary


def merge(paths, out: Path) -> int:
    """Combine the ``edit_quality.json`` of runs over different pairs into ``out``."""
    runs = [json.loads(Path(path).read_text(encoding="utf-8")) for path in paths]
    records = sorted((r for run in runs for r in run["pairs"]), key=lambda r: r["index"])
    variants = [v for v in runs[0]["summary"] if isinstance(runs[0]["summary"][v], dict)
                and "mask_iou" in runs[0]["summary"][v]]
    setup = dict(runs[0]["summary"]["setup"], merged=[str(path) for path in paths],
                 seconds=sum(run["summary"]["setup"]["seconds"] for run in runs),
                 complete=all(run["summary"]["setup"]["complete"] for run in runs))
    print(json.dumps(finish(records, variants, [], setup, out), indent=2))
    return 0


def run_workers(args, argv: list[str], out: Path) -> int:
    """``--workers N``: N processes over contiguous shares of the pairs (one thread each, their
    results under ``out/part-K``), then their merge into ``out``; the first share draws the
    examples. A worker that saved nothing (killed before its first save) is left out, and the
    merged setup says the run is incomplete."""
    import subprocess

    kept = _without_options(argv)
    base, extra = divmod(args.pairs, args.workers)
    processes, parts, first = [], [], args.start
    for k in range(args.workers):
        count = base + (k < extra)
        part = out / f"part-{k}"
        parts.append(part / "edit_quality.json")
        command = [sys.executable, __file__, *kept, "--start", str(first), "--pairs", str(count),
                   "--threads", "1", "--out", str(part),
                   "--examples", str(args.examples if k == 0 else 0)]
        processes.append(subprocess.Popen(command))
        first += count
    failed = sum(process.wait() != 0 for process in processes)
    saved = [path for path in parts if path.exists()]
    if not saved:
        print("no worker saved results", file=sys.stderr)
        return 1
    merge(saved, out)
    if (parts[0].parent / "examples.png").exists():
        (out / "examples.png").write_bytes((parts[0].parent / "examples.png").read_bytes())
    return 1 if failed or len(saved) < len(parts) else 0


def _without_options(argv: list[str]) -> list[str]:
    """``argv`` without the options ``run_workers`` sets per worker (and their values)."""
    replaced = {"--workers", "--start", "--pairs", "--out", "--threads", "--examples"}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.split("=", 1)[0] in replaced:
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args.merge, out)
    variants = parse_variants(args.variants)
    if args.workers > 1 and not args.gpu_timing:
        return run_workers(args, argv if argv is not None else sys.argv[1:], out)
    if args.gpu_timing:
        args.steps = args.steps or 50
        result = gpu_timing(args, variants)
        (out / "gpu_timing.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        return 0
    args.steps = args.steps or 20
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, device = load(args)
    session = fc.EditSession(pipe)
    pairs = render.benchmark_pairs(args.pairs, args.start)
    labels = [label for label, _, _ in variants]
    records, examples = [], []
    start = time.perf_counter()

    def setup() -> dict:
        return {"device": str(device), "steps": args.steps, "guidance_scale": args.guidance_scale,
                "scheduler": type(pipe.scheduler).__name__, "start": args.start,
                "pipeline": "random-tiny" if args.random_tiny else (args.pipeline or "zoo:shapes"),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "seconds": time.perf_counter() - start, "complete": len(records) == len(pairs)}

    for i, pair in enumerate(pairs):
        if records and args.time_limit is not None \
                and time.perf_counter() - start > args.time_limit:
            print(f"time limit: stopped after {i} of {len(pairs)} pairs", flush=True)
            break
        record, images = run_pair(pair, session, variants, args)
        records.append(record)
        if len(examples) < args.examples:
            examples.append((pair, images))
        if (i + 1) % 10 == 0 or i + 1 == len(pairs):
            print(f"{i + 1}/{len(pairs)} pairs, {time.perf_counter() - start:.0f} s; " + ", ".join(
                f"{v} IoU {mean(r[v]['mask_iou'] for r in records):.3f} success "
                f"{mean(r[v]['success'] for r in records):.3f}" for v in labels), flush=True)
            if i + 1 < len(pairs):
                finish(records, labels, examples, setup(), out)
    print(json.dumps(finish(records, labels, examples, setup(), out), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
