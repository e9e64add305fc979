"""The engine's dense path against the tuned dense module, and what each tuning adds (GPU only).

    python benchmarks/dense_paths.py [--model sd15] [--reps 20] [--json FILE] [--ablations]

An edit whose plan runs every level dense (a full mask, or calibrated thresholds sending a
large scattered edit dense), and the editing flow's probe steps, run ``SparseEngine.dense``:
the canonical graph, tuned (``passes.tune_dense``), under ``torch.compile`` with CUDA graphs. A
diffusers user tuning for speed runs the module in channels_last, with fused QKV projections
and Inductor's 1x1 convs as matmuls (``bench.tuned_unet``). "Never slower than dense" needs the
first to be as fast as the second. Rows (the engine's share one compile; every other row is a
fresh ``torch.compile`` with CUDA graphs), timed in one process:

- ``engine.dense``: what the engine runs (since session 8 the tuned dense graph,
  ``passes.tune_dense``);
- ``engine.edit, full mask``: an edit whose plan runs every level dense, as a user calls it
  (the edit call's checks, then ``engine.dense``);
- ``engine.edit, full mask, no timestep check``: the same with ``SparseEngine._check_timestep``
  patched out, to time the host synchronisation its comparison costs;
- ``module tuned``: the strongest dense setting (``bench.tuned_unet``);
- with ``--ablations`` (each one more compile), the canonical graph compiled as captured (the
  engine's dense path up to session 7), then with ``+ 1x1 as mm`` (Inductor's
  ``conv_1x1_as_mm``) and ``+ 1x1 as mm + channels_last sample`` (the sample handed over in
  channels_last, so that Inductor's layout choice starts there; session 8 run 1: no gain), and
  ``module tuned, QKV unfused`` (the tuned module without ``fuse_qkv_projections``).

Medians of CUDA-event timings; every row's output is compared with the eager module's.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.fx as fx

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.engine.timing import cuda_time_ms

REDUCE_OVERHEAD = "reduce-overhead"


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--ablations", action="store_true",
                        help="also time the canonical graph as captured, with 1x1 convs as "
                             "matmuls and with a channels_last sample, and the tuned module "
                             "without fused QKV projections")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("dense_paths.py times GPU steps; it needs a CUDA device")
    latent = bench.RESOLUTION[args.model] // 8
    unet = zoo.unet(args.model, dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0, height=latent, width=latent)
    expected = unet(**inputs)[0]
    engine = fc.compile(unet)
    canonical = engine.program(inputs).canonical
    cache = engine.new_cache()
    engine.record(cache, 0, **inputs)
    full = engine.plan(torch.ones((latent, latent), dtype=torch.bool))
    assert full.full

    def full_edit(check_timestep: bool):
        if not check_timestep:     # from here on: this row comes after the checked one
            engine._check_timestep = lambda *args: None
        return lambda: engine.edit(cache, 0, plan=full, **inputs)

    flat = flatten_inputs(inputs)
    channels_last = {**flat, "sample": flat["sample"].contiguous(memory_format=torch.channels_last)}

    def unfused_tuned():
        torch._inductor.config.conv_1x1_as_mm = True
        return torch.compile(copy.deepcopy(unet).to(memory_format=torch.channels_last),
                             mode=REDUCE_OVERHEAD)

    mm = {"conv_1x1_as_mm": True, "triton.cudagraphs": True}
    rows = [
        ("engine.dense", lambda: (lambda: engine.dense(**inputs))),
        ("engine.edit, full mask", lambda: full_edit(True)),
        ("engine.edit, full mask, no timestep check", lambda: full_edit(False)),
        ("canonical", lambda: _call(torch.compile(_fresh(canonical), mode=REDUCE_OVERHEAD),
                                    flat)),
        ("canonical + 1x1 as mm", lambda: _call(torch.compile(_fresh(canonical),
                                                              options=mm), flat)),
        ("canonical + 1x1 as mm + channels_last sample",
         lambda: _call(torch.compile(_fresh(canonical), options=mm), channels_last)),
        ("module tuned, QKV unfused", lambda: _module(unfused_tuned(), inputs)),
        ("module tuned", lambda: _module(bench.compiled_dense(unet, bench.TUNED + REDUCE_OVERHEAD),
                                         inputs)),
    ]
    if not args.ablations:
        rows = [row for row in rows if not row[0].startswith("canonical")
                and row[0] != "module tuned, QKV unfused"]
    results = []
    for name, build in rows:
        started = time.perf_counter()
        step = build()
        out = step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - started
        error = bench.relative_error(out, expected)     # before the replays overwrite it
        ms = cuda_time_ms(step, reps=args.reps)
        results.append({"path": name, "ms": ms, "compile_s": compile_s, "error": error})
        print(f"{name}: {ms:.2f} ms (compiled in {compile_s:.0f} s, error {error:.1e})",
              flush=True)
    best = min(row["ms"] for row in results if row["path"] == "module tuned")
    print(f"\n| {args.model} {latent * 8} px, fp16, batch 2 | ms | vs module tuned | error |")
    print("|---|---|---|---|")
    for row in results:
        print(f"| {row['path']} | {row['ms']:.2f} | {best / row['ms']:.2f}x | "
              f"{row['error']:.1e} |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"model": args.model, "environment": bench.environment(), "rows": results},
                      file, indent=1)


def _fresh(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A new module over the same graph and the same weight tensors (its own Dynamo cache)."""
    return fx.GraphModule(graph_module, copy.deepcopy(graph_module.graph))


def _call(compiled, flat: dict):
    return lambda: compiled(**flat)


def _module(compiled, inputs: dict):
    return lambda: compiled(**inputs)[0]


if __name__ == "__main__":
    main()
