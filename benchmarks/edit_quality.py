"""Edit quality with ground truth, on the trained "shapes" pipeline.

For a fixed, balanced set of prompt-edit pairs (``shapes.render.benchmark_pairs``: add, remove,
colour, move, background, in turn), each pair's original scene is generated with an
EditSession and edited automatically (probe steps, Otsu mask, blended latents, sparse steps):

* mask IoU: the automatic mask against the region the renderer says truly changes (at latent
  resolution), without and with cross-attention control;
* success: the checker (``shapes.checker``) on the edited image against the edited caption
  (every object's colour, position, shape and size, the background, no extra objects); also
  on the original generation and on a plain dense generation of the edited prompt from the
  same noise, which bound what an edit can reach;
* background: outside the plan's active region the final latents must equal the original's
  exactly (``latent_max_diff_outside``: 0 for every policy); decoded pixels are reported too
  (``pixel_max_diff_outside``, uint8 units): the VAE decoder's convolutions reach a few pixels
  past the region and its group norms are global, so decoded pixels can differ slightly even
  though the latents are identical (``pixel_max_diff_outside_4px`` leaves out a 4-pixel band).
  The edits here are decoded raw (``composite_background=False``) to measure that spread and
  to keep the checker's view of the decoder's own output; ``EditSession.edit`` by default
  copies the original's pixels outside the region, which makes both columns 0;
* fidelity: PSNR inside the active region against a dense reference: the same edit (same
  probe steps, mask and blend) whose remaining steps run the dense U-Net instead of the sparse
  engine; for the exact policies and FISEdit's approximations (cached group-norm statistics,
  SparseConfig(group_norm="cached"); sparse self-attention K/V, self_attention="sparse");
* speed: edit wall time per policy against a plain dense generation, and the MACs ratio.

    python benchmarks/edit_quality.py --pairs 200 --device cuda --out benchmarks/results/edit-quality

writes ``edit_quality.json`` (summary + one record per pair), ``examples.png`` (rows: rendered
truth, generated original, edit, automatic mask, true region, mask with cross-attention
control, dense generation of the edited prompt) and ``iou_by_kind.png`` (needs matplotlib;
skipped with a note otherwise). ``--random-tiny`` uses a randomly initialised tiny shapes
pipeline (numbers meaningless; for tests and for running before the weights exist).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fisedit_compiler as fc
from fisedit_compiler.shapes import checker, model, render

POLICIES = {
    "exact": fc.SparseConfig(),
    "cached_gn": fc.SparseConfig(group_norm="cached"),
    "sparse_kv": fc.SparseConfig(self_attention="sparse"),
}
PSNR_CAP = 100.0   # dB, reported when the two images are identical inside the region


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=200, help="number of pairs (default 200)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="edit-quality", help="output folder")
    p.add_argument("--pipeline", default=None,
                   help="a saved shapes pipeline folder (default: zoo.pipeline('shapes'))")
    p.add_argument("--random-tiny", action="store_true",
                   help="a randomly initialised tiny shapes pipeline (tests; numbers meaningless)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--probe-steps", type=int, default=5, help="dense probe steps (default 5)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated subset of {', '.join(POLICIES)}")
    p.add_argument("--examples", type=int, default=10, help="pairs in examples.png")
    p.add_argument("--start", type=int, default=0, help="first pair index (default 0)")
    return p.parse_args(argv)


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


@contextmanager
def dense_sparse_steps(session):
    """Make the session's sparse steps dense (the reference of the fidelity metric): every
    ``engine.edit`` call runs the U-Net densely on the same (blended) inputs."""
    def dense(cache, step, plan, **inputs):
        with torch.no_grad():
            return session.pipe.unet(**inputs)[0]

    session.engine.edit = dense
    try:
        yield
    finally:
        del session.engine.edit


def edit_record(session, result, original_image, original_latents, truth) -> dict:
    image = result.images[0]
    active = result.plan.levels[0].active
    outside = ~active.to(result.latents.device)
    size = image.shape[0]
    outside_px = ~upsample(active, size)
    band = F.max_pool2d(torch.from_numpy(~outside_px)[None, None].float(), 9, 1, 4)[0, 0] > 0
    report = result.report
    return {
        "mask_iou": iou(result.mask, truth),
        "mask_area": float(result.mask.float().mean()),
        "active_area": float(active.float().mean()),
        "latent_max_diff_outside": float((result.latents - original_latents)[..., outside].abs()
                                         .max()) if outside.any() else 0.0,
        "pixel_max_diff_outside": pixel_diff(image, original_image, outside_px),
        "pixel_max_diff_outside_4px": pixel_diff(image, original_image, ~band.numpy()),
        "edit_s": report["timings_s"]["edit_s"],
        "probe_s": report["timings_s"]["probe_s"],
        "sparse_s": report["timings_s"]["sparse_s"],
        "macs_ratio": report["macs"]["macs_ratio"],
    }


def run_pair(pair, sessions, args) -> tuple[dict, dict]:
    """All measurements of one pair; also returns the images for the example grid."""
    exact = sessions["exact"]
    pipe = exact.pipe
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  output_type="np")
    truth = render.latent_region(pair)
    record = {"index": pair.seed, "kind": pair.kind, "prompt": pair.prompt,
              "edit_prompt": pair.edit_prompt, "true_area": float(truth.float().mean())}

    original = exact.generate(pair.prompt, seed=pair.seed, **common)[0]
    original_latents = exact.original.latents[-1]
    record["original_check"] = checker.check(original, pair.original)["scene"]

    # Plain dense generation of the edited prompt from the same noise: the speed baseline and
    # what the checker says of a regeneration.
    start = time.perf_counter()
    with torch.no_grad():
        regenerated = pipe(pair.edit_prompt, latents=exact.original.noise.clone(),
                           **common).images[0]
    record["dense_generation_s"] = time.perf_counter() - start
    record["regenerated_check"] = checker.check(regenerated, pair.edited)["scene"]

    images = {"original": original, "regenerated": regenerated}
    edits = {}
    for name, cac in (("exact", False), ("exact_cac", True)):
        result = exact.edit(pair.edit_prompt, probe_steps=args.probe_steps,
                            cross_attention_control=cac, output_type="np",
                            composite_background=False)
        rec = edit_record(exact, result, original, original_latents, truth)
        check = checker.check(result.images[0], pair.edited)
        rec.update(success=check["scene"], check={k: check[k] for k in ("background",
                                                                         "no_extra")},
                   objects=[{a: o[a] for a in checker.ATTRIBUTES} for o in check["objects"]])
        edits[name] = (result, rec)
        images[name] = result.images[0]
        images[f"{name}_mask"] = result.mask
    images["truth_mask"] = truth

    result, _ = edits["exact"]
    with dense_sparse_steps(exact):
        reference = exact.edit(pair.edit_prompt, mask=result.mask, probe_steps=args.probe_steps,
                               output_type="np", composite_background=False).images[0]
    region = upsample(result.plan.levels[0].active, reference.shape[0])
    record["reference_check"] = checker.check(reference, pair.edited)["scene"]

    for name, (res, rec) in edits.items():
        rec["psnr_vs_dense"] = psnr(res.images[0], reference, region)
        record[name] = rec
    for name, session in sessions.items():
        if name == "exact":
            continue
        session.generate(pair.prompt, seed=pair.seed, **common)
        res = session.edit(pair.edit_prompt, probe_steps=args.probe_steps, output_type="np",
                           composite_background=False)
        rec = edit_record(session, res, original, session.original.latents[-1], truth)
        rec["same_mask_as_exact"] = bool(torch.equal(res.mask, result.mask))
        rec["psnr_vs_dense"] = psnr(res.images[0], reference, region)
        rec["success"] = checker.check(res.images[0], pair.edited)["scene"]
        record[name] = rec
    return record, images


# ---------------------------------------------------------------------------------- summaries

def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(records: list[dict], variants: list[str]) -> dict:
    out = {"pairs": len(records),
           "original_success": mean(r["original_check"] for r in records),
           "regenerated_success": mean(r["regenerated_check"] for r in records),
           "dense_reference_success": mean(r["reference_check"] for r in records),
           "dense_generation_s": mean(r["dense_generation_s"] for r in records)}
    for name in variants:
        rows = [r[name] for r in records]
        dense = out["dense_generation_s"]
        edit_s = mean(x["edit_s"] for x in rows)
        out[name] = {
            "mask_iou": mean(x["mask_iou"] for x in rows),
            "success": mean(x["success"] for x in rows),
            "latent_max_diff_outside": max(x["latent_max_diff_outside"] for x in rows),
            "pixel_max_diff_outside": max(x["pixel_max_diff_outside"] for x in rows),
            "pixel_max_diff_outside_4px": max(x["pixel_max_diff_outside_4px"] for x in rows),
            "psnr_vs_dense": mean(x["psnr_vs_dense"] for x in rows),
            "edit_s": edit_s,
            "speedup_vs_dense_generation": dense / edit_s if edit_s else None,
            "macs_ratio": mean(x["macs_ratio"] for x in rows),
        }
    by_kind = defaultdict(list)
    for r in records:
        by_kind[r["kind"]].append(r)
    out["by_kind"] = {
        kind: {"pairs": len(rows), "true_area": mean(r["true_area"] for r in rows),
               **{f"{v}_{m}": mean(r[v][m] for r in rows) for v in variants
                  for m in ("mask_iou", "success")}}
        for kind, rows in by_kind.items()}
    return out


def write_examples(examples: list[tuple], path: Path) -> str:
    """One row per pair: truth, original, exact edit, auto mask, true region, CAC mask,
    dense generation of the edited prompt."""
    rows = []
    for pair, images in examples:
        truth = render.to_uint8(render.render([pair.original]))[0]
        size = truth.shape[0]

        def overlay(image, mask):
            out = to_uint8(image).copy()
            m = upsample(mask, size)
            out[m] = (0.55 * out[m] + 0.45 * np.array([255, 0, 0])).astype(np.uint8)
            return out

        rows.append(np.concatenate([
            truth, to_uint8(images["original"]), to_uint8(images["exact"]),
            overlay(images["original"], images["exact_mask"]),
            overlay(images["original"], images["truth_mask"]),
            overlay(images["original"], images["exact_cac_mask"]),
            to_uint8(images["regenerated"])], axis=1))
    grid = np.concatenate(rows, axis=0)
    try:
        from PIL import Image
    except ImportError:
        np.save(path.with_suffix(".npy"), grid)
        return str(path.with_suffix(".npy"))
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2),
                                 Image.NEAREST).save(path)
    return str(path)


def write_plot(summary: dict, path: Path) -> str | None:
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
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for offset, (variant, label) in zip((-0.2, 0.2), (("exact", "automatic mask"),
                                                      ("exact_cac", "+ cross-attention control"))):
        ax.bar(x + offset, [summary["by_kind"][k][f"{variant}_mask_iou"] or 0 for k in kinds],
               0.4, label=label)
    ax.set_xticks(x, kinds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU with the true changed region")
    ax.set_title(f"Edit mask IoU by edit kind ({summary['pairs']} pairs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = set(policies) - set(POLICIES)
    if unknown or "exact" not in policies:
        raise SystemExit(f"--policies must include exact and name only {', '.join(POLICIES)}")
    pipe, device = load(args)
    base = fc.EditSession(pipe, POLICIES["exact"])
    sessions = {"exact": base}
    for name in policies:
        if name != "exact":
            session = fc.EditSession(pipe, POLICIES[name])
            session.engine = base.engine.with_config(POLICIES[name])   # share the traces
            sessions[name] = session
    pairs = render.benchmark_pairs(args.pairs, args.start)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, examples = [], []
    variants = ["exact", "exact_cac"] + [p for p in policies if p != "exact"]
    start = time.perf_counter()

    def save(files: dict) -> dict:
        # Written every 10 pairs as well, so a run cut short still leaves its results.
        summary = summarise(records, variants)
        summary["setup"] = {"device": str(device), "steps": args.steps,
                            "probe_steps": args.probe_steps,
                            "guidance_scale": args.guidance_scale,
                            "scheduler": type(pipe.scheduler).__name__,
                            "pipeline": "random-tiny" if args.random_tiny else
                            (args.pipeline or "zoo:shapes"), "torch": torch.__version__,
                            "seconds": time.perf_counter() - start,
                            "complete": len(records) == len(pairs)}
        (out / "edit_quality.json").write_text(json.dumps(
            {"summary": summary, "files": files, "pairs": records}, indent=2), encoding="utf-8")
        return summary

    for i, pair in enumerate(pairs):
        record, images = run_pair(pair, sessions, args)
        records.append(record)
        if len(examples) < args.examples:
            examples.append((pair, images))
        if (i + 1) % 10 == 0 or i + 1 == len(pairs):
            print(f"{i + 1}/{len(pairs)} pairs, {time.perf_counter() - start:.0f} s; mask IoU "
                  f"{mean(r['exact']['mask_iou'] for r in records):.3f}, with CAC "
                  f"{mean(r['exact_cac']['mask_iou'] for r in records):.3f}, success "
                  f"{mean(r['exact']['success'] for r in records):.3f}", flush=True)
            if i + 1 < len(pairs):
                save({})
    summary = summarise(records, variants)
    files = {"examples": write_examples(examples, out / "examples.png"),
             "plot": write_plot(summary, out / "iou_by_kind.png")}
    print(json.dumps(save(files), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
