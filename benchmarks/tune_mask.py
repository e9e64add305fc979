"""Tune the noise-contrast mask's cut on held-out pairs of the shapes model, cheaply.

The noise-contrast estimator (``edit_flow.mask``) needs, per pair, only the original
generation's recording and its one contrast U-Net call; the cut that turns the contrast into
a mask (and the global-change rule) is pure tensor work on the result. This script therefore
works in two phases:

1. ``--collect``: for each pair of ``shapes.render.benchmark_pairs`` (built exactly as
   ``benchmarks/edit_quality.py`` builds them: 64 px, DDIM 20 steps, guidance 5, the pair's
   seed), generate the original with an ``EditSession``, start ``session.edit(edit_prompt)``
   with a capturing estimator that stops the edit as soon as the contrast call has run, and
   save the contrast (the new prompt's conditional noise predictions and the recorded
   original's, ``[S, C, H, W]`` for the contrast steps) with the true changed region at latent
   resolution (``render.latent_region``, as ``edit_quality.py`` scores IoU) to
   ``CACHE/pair-NNNN.pt``. Pairs already cached are skipped, so a run cut short resumes.
2. ``--evaluate``: score every variant of the cut (``VARIANTS``; ``--variants`` picks some) on
   the cached pairs: object-edit mask IoU (add, remove, colour, move; a pair called global
   gets the all-ones mask, as the session plans it), IoU per kind, the share of background
   changes detected as global (must be ~1) and of object edits called global (must be ~0),
   and the mean mask area against the mean true area of object edits. ``--shipped`` scores
   the estimator as ``edit_flow.mask`` ships it (``noise_contrast_score``, ``is_global``,
   ``binarize`` with the estimator's cut), which must equal the variant it implements.

Pairs 0-499 are the benchmark (``edit_quality.py``) and must not be used for tuning: tune on
500-599, validate on 600-699::

    python benchmarks/tune_mask.py --collect --start 500 --pairs 100 --cache C --threads 1
    python benchmarks/tune_mask.py --evaluate --start 500 --pairs 100 --cache C --out tune.json

Collection costs one 20-step generation plus one U-Net call per pair (~2-4 s on one CPU core).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

OBJECT_KINDS = ("add", "remove", "colour", "move")
KINDS = OBJECT_KINDS + ("background",)


# -------------------------------------------------------------------------------- collection

class _Captured(Exception):
    def __init__(self, contrast):
        super().__init__("contrast captured")
        self.contrast = contrast


def _capture(contrast):
    raise _Captured(contrast)


def collect(start: int, pairs: int, cache: Path, steps: int = 20, guidance: float = 5.0,
            pipeline: str | None = None) -> None:
    import dataclasses

    import fisedit_compiler as fc
    from fisedit_compiler.edit_flow import mask as tac
    from fisedit_compiler.shapes import render

    cache.mkdir(parents=True, exist_ok=True)
    pipe = fc.zoo.pipeline(None, path=pipeline) if pipeline else fc.zoo.pipeline("shapes")
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    session = fc.EditSession(pipe)
    # A registered estimator whose score stops the edit with the contrast: the same U-Net call
    # on the same recorded inputs as the noise-contrast estimator's, nothing after it.
    tac.ESTIMATORS["tune-capture"] = dataclasses.replace(
        tac.ESTIMATORS["noise-contrast"], name="tune-capture", score=_capture)
    def contrast(prompt, edit, seed):
        session.generate(prompt, seed=seed, num_inference_steps=steps,
                         guidance_scale=guidance, output_type="np")
        try:
            session.edit(edit, mask_estimator="tune-capture", output_type="np")
        except _Captured as captured:
            return captured.contrast
        raise RuntimeError("the capturing estimator did not run")

    # The shipped demo's edit (seed 0, as `fisedit demo` runs it): it must stay local.
    path = cache / "demo.pt"
    if not path.exists():
        from fisedit_compiler import shapes
        found = contrast(shapes.DEMO_PROMPT, shapes.DEMO_EDIT, 0)
        torch.save({"index": "demo", "kind": "demo", "new": found.new.float().cpu(),
                    "old": found.old.float().cpu(), "truth": None}, path)
    for pair in render.benchmark_pairs(pairs, start):
        path = cache / f"pair-{pair.seed:04d}.pt"
        if path.exists():
            continue
        found = contrast(pair.prompt, pair.edit_prompt, pair.seed)
        torch.save({"index": pair.seed, "kind": pair.kind, "prompt": pair.prompt,
                    "edit_prompt": pair.edit_prompt, "truth": render.latent_region(pair).cpu(),
                    "new": found.new.float().cpu(), "old": found.old.float().cpu()}, path)
        print(f"pair {pair.seed} ({pair.kind}) cached", flush=True)


def load(start: int, pairs: int, cache: Path) -> list[dict]:
    records = []
    for index in range(start, start + pairs):
        path = cache / f"pair-{index:04d}.pt"
        if path.exists():
            records.append(torch.load(path))
    return records


# ---------------------------------------------------------------------------------- variants

def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


VARIANTS: dict[str, callable] = {}


def variant(name: str):
    def register(function):
        VARIANTS[name] = function
        return function
    return register


def shipped(record: dict) -> tuple[torch.Tensor, bool]:
    """The estimator as ``edit_flow.mask`` ships it (what ``EditSession.edit`` computes)."""
    from fisedit_compiler.edit_flow import mask as tac
    if global_rule(record):
        return torch.ones_like(record["new"][0, 0], dtype=torch.bool), True
    estimator = tac.ESTIMATORS["noise-contrast"]
    score = estimator.score(_contrast(record))
    return tac.binarize(score, estimator.cut, smooth=estimator.smooth), False


# Building blocks of the variants: a score map from the contrast, then a cut. Every variant
# uses the same global rule (``--global-rule``), so variants differ only in the mask of
# local edits.

def step_maps(record: dict, reduce: str = "mean") -> torch.Tensor:
    """Per contrast step, the new-vs-old difference reduced over channels: ``[S, H, W]``,
    each step normalised to its peak."""
    difference = (record["new"] - record["old"]).float()
    if reduce == "mean":
        maps = difference.abs().mean(dim=1)
    elif reduce == "l2":
        maps = difference.pow(2).mean(dim=1).sqrt()
    elif reduce == "max":
        maps = difference.abs().amax(dim=1)
    else:
        raise ValueError(reduce)
    return torch.stack([m / m.max() if m.max() > 0 else m for m in maps])


def combine(maps: torch.Tensor, how: str) -> torch.Tensor:
    if how == "sum":
        return maps.sum(0)
    if how == "min":
        return maps.amin(0)
    if how == "geo":
        return maps.clamp_min(0).prod(0).pow(1 / maps.shape[0])
    if how == "first":
        return maps[0]
    if how == "last":
        return maps[-1]
    raise ValueError(how)


def smooth(score: torch.Tensor, kind: str | None) -> torch.Tensor:
    """A 3x3 smoothing of the score: ``"box"`` (mean) or ``"gauss"`` ([1 2 1] squared / 16),
    edges replicated."""
    if kind is None:
        return score
    import torch.nn.functional as F
    row = torch.tensor([1.0, 1.0, 1.0]) if kind == "box" else torch.tensor([1.0, 2.0, 1.0])
    kernel = (row[:, None] * row[None, :]) / (row.sum() ** 2)
    padded = F.pad(score[None, None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel[None, None])[0, 0]


def grow(seeds: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The pixels of ``allowed`` 8-connected to ``seeds`` (hysteresis)."""
    from fisedit_compiler.edit_flow import mask as tac
    region = seeds & allowed
    while True:
        grown = tac.dilate(region, 3) & allowed
        if torch.equal(grown, region):
            return region
        region = grown


GLOBAL_RULE = "shipped"   # or "peak": the peak rule alone (``is_global``), as before session 6


def _contrast(record: dict):
    from fisedit_compiler.edit_flow import mask as tac
    return tac.Contrast(samples=None, old=record["old"], new=record["new"], alphas=None,
                        prediction_type="epsilon", final=None)


def global_rule(record: dict) -> bool:
    """The shipped global-change rule (``contrast_is_global``), or with ``GLOBAL_RULE = "peak"``
    the peak rule alone."""
    from fisedit_compiler.edit_flow import mask as tac
    contrast = _contrast(record)
    if GLOBAL_RULE == "peak":
        return tac.is_global(tac.noise_contrast_score(contrast))
    return tac.contrast_is_global(contrast)


def make_variant(reduce="mean", how="sum", cut=0.5, low=None, relative="otsu", blur=None,
                 opening=True):
    """A variant: channels reduced by ``reduce``, steps combined by ``how``, smoothed by a
    ``blur`` 3x3 filter, cut at ``cut`` times Otsu's threshold (``relative="otsu"``) or at ``cut``
    of the peak (``"peak"``); with ``low``, hysteresis: the cut's pixels are the seeds, grown
    into the connected pixels above ``low`` (same scale)."""
    from fisedit_compiler.edit_flow import mask as tac

    def function(record):
        if global_rule(record):
            return torch.ones_like(record["new"][0, 0], dtype=torch.bool), True
        score = smooth(combine(step_maps(record, reduce), how), blur)
        floor = float(score.min())
        if relative == "otsu":
            unit = tac.otsu_threshold(score) - floor
        else:
            unit = float(score.max()) - floor
        mask = score > floor + cut * unit
        if low is not None:
            mask = grow(mask, score > floor + low * unit)
        if opening:
            mask = tac.opening(mask, tac.opening_size(mask.shape[0]))
        return mask, False
    return function


def _register_grid():
    for reduce in ("mean", "l2", "max"):
        for how in ("sum", "min", "geo", "first"):
            for cut in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0):
                VARIANTS[f"{reduce}/{how}/otsu*{cut}"] = make_variant(reduce, how, cut)
    for how in ("sum", "min", "geo"):
        for cut in (0.2, 0.25, 0.3, 0.35, 0.4, 0.5):
            VARIANTS[f"mean/{how}/peak*{cut}"] = make_variant("mean", how, cut,
                                                             relative="peak")
        for high, low in ((1.0, 0.5), (1.0, 0.4), (1.0, 0.6), (0.8, 0.4), (0.8, 0.5),
                          (1.2, 0.5), (1.0, 0.3), (0.7, 0.4)):
            VARIANTS[f"mean/{how}/hyst otsu*{high}->{low}"] = make_variant(
                "mean", how, high, low=low)
        for reduce in ("mean", "l2"):
            for blur in ("box", "gauss"):
                for cut in (0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3):
                    VARIANTS[f"{reduce}/{how}/{blur}/otsu*{cut}"] = make_variant(
                        reduce, how, cut, blur=blur)
                for high, low in ((1.2, 0.8), (1.2, 0.9), (1.3, 0.9), (1.5, 0.9), (1.5, 1.0)):
                    VARIANTS[f"{reduce}/{how}/{blur}/hyst otsu*{high}->{low}"] = make_variant(
                        reduce, how, high, low=low, blur=blur)


_register_grid()


def evaluate(records: list[dict], function, demo: dict | None = None) -> dict:
    by_kind = defaultdict(list)
    for record in records:
        mask, is_global = function(record)
        truth = record["truth"].bool()
        by_kind[record["kind"]].append({
            "iou": iou(mask.bool().cpu(), truth), "global": is_global,
            "area": float(mask.float().mean()), "true_area": float(truth.float().mean())})
    objects = [row for kind in OBJECT_KINDS for row in by_kind.get(kind, [])]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else None

    demo_mask, demo_global = function(demo) if demo is not None else (None, None)
    return {"pairs": len(records),
            "demo_global": demo_global,
            "demo_mask_area": None if demo_mask is None else float(demo_mask.float().mean()),
            "object_iou": mean(objects, "iou"),
            "iou_by_kind": {kind: mean(by_kind.get(kind, []), "iou") for kind in OBJECT_KINDS},
            "background_global": mean(by_kind.get("background", []), "global"),
            "objects_global": mean(objects, "global"),
            "object_mask_area": mean(objects, "area"),
            "object_true_area": mean(objects, "true_area")}


def demo(result: dict) -> str:
    if result["demo_global"] is None:
        return "-"
    return f"{'global' if result['demo_global'] else 'local'}, {result['demo_mask_area']:.3f}"


def table(results: dict[str, dict]) -> str:
    lines = ["| variant | object IoU | add | remove | colour | move | background global | "
             "objects global | mask area / true area (objects) | demo: global, mask area |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    for name, r in results.items():
        kinds = " | ".join(number(r["iou_by_kind"][k]) for k in OBJECT_KINDS)
        lines.append(f"| {name} | {number(r['object_iou'])} | {kinds} | "
                     f"{number(r['background_global'], 2)} | {number(r['objects_global'])} | "
                     f"{number(r['object_mask_area'])} / {number(r['object_true_area'])} | "
                     f"{demo(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--collect", action="store_true", help="generate and cache the contrasts")
    p.add_argument("--evaluate", action="store_true", help="score the variants on the cache")
    p.add_argument("--start", type=int, default=500, help="first pair (default 500)")
    p.add_argument("--pairs", type=int, default=100, help="number of pairs (default 100)")
    p.add_argument("--cache", default="benchmarks/results/tune-mask-cache", help="cache folder")
    p.add_argument("--pipeline", default=None, help="a saved shapes pipeline folder")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--global-rule", choices=("shipped", "peak"), default="shipped",
                   help="the global-change rule of every variant (peak: before session 6)")
    args = p.parse_args(argv)
    if args.start < 500 and not args.evaluate:
        print("warning: pairs below 500 are the benchmark's; do not tune on them",
              file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    global GLOBAL_RULE
    GLOBAL_RULE = args.global_rule
    if args.collect:
        collect(args.start, args.pairs, cache, pipeline=args.pipeline)
    if args.evaluate:
        records = load(args.start, args.pairs, cache)
        names = args.variants.split(",") if args.variants else list(VARIANTS)
        demo_path = cache / "demo.pt"
        demo_record = torch.load(demo_path) if demo_path.exists() else None
        results = {"shipped": evaluate(records, shipped, demo_record)}
        results.update({name: evaluate(records, VARIANTS[name], demo_record) for name in names})
        print(f"{len(records)} pairs from {args.start}")
        print(table(results))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
