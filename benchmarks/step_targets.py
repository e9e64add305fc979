"""Issue 17's plot: the sparse step against edit area, per model, beside the issue's targets.

    python benchmarks/step_targets.py results/bench_sd15_h200_session6.json \
        results/bench_sdxl_h200_session6.json --out results/step_targets_session6.png

Reads ``fisedit-compiler bench`` result files (``results.json``, or the log the bench printed:
its summary line and markdown table, for runs whose JSON did not come back) and draws, per
model and
layout, the step time (Triton + CUDA graphs) against the edit area, the run's best dense step
(the tuned ``torch.compile`` baseline) as a line, and the issue's targets as crosses; where the
run timed them (session 11 on), also the steps and the dense step called back to back as a
pipeline's loop calls them (dashed). Prints the same as a markdown table (reached ms, target
ms, speedup reached and targeted; the loop's step and ratio). Needs matplotlib for the plot.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# Issue 17's targets: (model, layout, area) -> step ms, or a speedup over the best dense step.
TARGET_MS = {("sd15", "blob", 0.01): 0.9, ("sd15", "blob", 0.05): 1.45,
             ("sd15", "blob", 0.2): 3.6, ("sd15", "scattered", 0.05): 2.0}
TARGET_SPEEDUP = {("sdxl", "blob", 0.05): 6.0}


def target_ms(model: str, layout: str, area: float, dense_ms: float) -> float | None:
    key = (model, layout, round(area, 4))
    if key in TARGET_MS:
        return TARGET_MS[key]
    if key in TARGET_SPEEDUP:
        return dense_ms / TARGET_SPEEDUP[key]
    return None


def rows(results: list[dict]) -> list[dict]:
    table = []
    for result in results:
        dense_ms = result["dense"]["best_compiled_ms"]
        for row in result["rows"]:
            target = target_ms(result["model"], row["layout"], row["area"], dense_ms)
            table.append({"model": result["model"], "layout": row["layout"], "area": row["area"],
                          "step_ms": row["triton_ms"], "dense_ms": dense_ms, "target_ms": target,
                          "loop_ms": row.get("triton_loop_ms"),
                          "dense_loop_ms": row.get("dense_beside_loop_ms")})
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| model | layout | area | step ms | target ms | speedup | target speedup | "
             "in a loop: step ms (vs dense loop) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        target = "-" if r["target_ms"] is None else f"{r['target_ms']:.2f}"
        wanted = "-" if r["target_ms"] is None else f"{r['dense_ms'] / r['target_ms']:.1f}x"
        loop = ("-" if r["loop_ms"] is None else
                f"{r['loop_ms']:.2f} ({r['dense_loop_ms'] / r['loop_ms']:.2f}x)")
        lines.append(f"| {r['model']} | {r['layout']} | {r['area']:.0%} | {r['step_ms']:.2f} | "
                     f"{target} | {r['dense_ms'] / r['step_ms']:.2f}x | {wanted} | {loop} |")
    return "\n".join(lines)


def plot(table: list[dict], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in table})
    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models):
        mine = [r for r in table if r["model"] == model]
        for layout, marker in (("blob", "o"), ("scattered", "s")):
            points = [r for r in mine if r["layout"] == layout]
            if points:
                line, = axis.plot([100 * r["area"] for r in points],
                                  [r["step_ms"] for r in points], marker=marker,
                                  label=f"sparse step, {layout}")
            looped = [r for r in points if r["loop_ms"] is not None]
            if looped:
                axis.plot([100 * r["area"] for r in looped], [r["loop_ms"] for r in looped],
                          marker=marker, linestyle="--", color=line.get_color(),
                          label=f"sparse step in a loop, {layout}")
            targets = [r for r in points if r["target_ms"] is not None]
            if targets:
                axis.scatter([100 * r["area"] for r in targets], [r["target_ms"] for r in targets],
                             marker="x", s=60, color="red", zorder=3,
                             label="issue 17 target" if layout == "blob" else None)
        axis.axhline(mine[0]["dense_ms"], color="gray", linestyle="--",
                     label="best dense (tuned torch.compile)")
        dense_loop = [r["dense_loop_ms"] for r in mine if r["dense_loop_ms"] is not None]
        if dense_loop:
            axis.axhline(sorted(dense_loop)[len(dense_loop) // 2], color="gray", linestyle=":",
                         label="best dense in a loop (median beside the rows)")
        axis.set_xscale("log")
        axis.set_ylim(bottom=0)
        axis.set_xlabel("edit area (% of latent)")
        axis.set_ylabel("ms per U-Net call (batch 2, fp16)")
        axis.set_title(model)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def results_from_log(text: str) -> list[dict]:
    """The parts of ``results.json`` this script reads, from a bench log: per model its
    summary line (model, best compiled dense ms) and the markdown table rows that follow."""
    results = []
    for line in text.splitlines():
        summary = re.match(r"(\S+) \d+ px, batch .* best torch\.compile \(.*\) ([\d.]+) ms", line)
        if summary:
            results.append({"model": summary[1], "rows": [],
                            "dense": {"best_compiled_ms": float(summary[2])}})
            continue
        row = re.match(r"\| (blob|scattered) \| ([\d.]+)% \| ([\d.]+) \|", line)
        if row and results:
            results[-1]["rows"].append({"layout": row[1], "area": float(row[2]) / 100,
                                        "triton_ms": float(row[3])})
    return results


def load(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else results_from_log(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="bench results.json files or bench logs")
    parser.add_argument("--out", default="step_targets.png", help="the plot (PNG)")
    args = parser.parse_args(argv)
    results = [result for path in args.results for result in load(Path(path))]
    table = rows(results)
    print(markdown(table))
    if not plot(table, Path(args.out)):
        print("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
