"""Cache bytes per step and MACs of compact edits, plus reference-path timings on a GPU.

For one zoo U-Net (default sd15 at its native 64x64 latent = 512 px), batch 2 (CFG):
* the bytes one recorded step holds (the derived minimal set) against caching every node;
* dense, sparse and ideal MACs of a centred square edit covering 1%, 5% and 20% of the latent;
* on CUDA, per-call latency of dense eager, dense torch.compile and the engine's torch
  reference path (no Triton kernels yet), and each edit's error against the oracle;
* the bytes of the weight copies the grouped projections hold (``passes.group_linears``);
* the pass constants (``passes.hoist_pass_constants``): the calls moved out of the step and
  the bytes of the weights they read, which a step no longer reads.

    python benchmarks/cache_and_macs.py --model sd15 --dtype float16 --out results.json

``--program-only`` stops after compiling (no recording, no edits): the program's facts only,
quick on a CPU even for SDXL.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import subprocess
import time

import torch

import fisedit_compiler as fc
from fisedit_compiler import zoo
from fisedit_compiler.execution.derived_weights import concatenated
from fisedit_compiler.engine.timing import cuda_time_ms

AREAS = (0.01, 0.05, 0.20)


def centred_square(size, area):
    height, width = size
    side = max(1, round(math.sqrt(area * height * width)))
    mask = torch.zeros(size, dtype=torch.bool)
    y0, x0 = (height - side) // 2, (width - side) // 2
    mask[y0:y0 + side, x0:x0 + side] = True
    return mask


def every_node_bytes(program) -> int:
    total = 0
    for node in program.canonical.graph.nodes:
        value = node.meta.get("val")
        if node.op == "call_function" and isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def grouped_weight_bytes(program) -> int:
    """Bytes of the concatenated weights and biases of the grouped projections, in the edit
    graph and its pass constants graph (where the text K/V moved)."""
    total = 0
    graphs = [program.edit] + ([program.pass_constants] if program.pass_constants else [])
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is concatenated:
                for attr in node.args[1:]:
                    tensor = operator.attrgetter(attr.target)(gm)
                    total += tensor.numel() * tensor.element_size()
    return total


def pass_constant_facts(program) -> dict:
    """Calls in the program's pass constants graph and the bytes of the weights they read
    (each tensor once): what an edit step no longer computes or reads."""
    constants = program.pass_constants
    if constants is None:
        return {"pass_constant_calls": 0, "pass_constant_weight_bytes": 0}
    weights = {}
    for node in constants.graph.nodes:
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(constants)
            if isinstance(value, torch.Tensor):
                weights[id(value)] = value.numel() * value.element_size()
    return {"pass_constant_calls": sum(node.op == "call_function"
                                       for node in constants.graph.nodes),
            "pass_constant_weight_bytes": sum(weights.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time dense torch.compile")
    parser.add_argument("--program-only", action="store_true",
                        help="compile only: report the program's facts, record nothing")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    unet = zoo.unet(args.model, dtype=dtype, device=device)
    inputs = zoo.example_inputs(unet, batch=args.batch, seed=0)
    engine = fc.compile(unet)
    started = time.perf_counter()
    program = engine.program(inputs)
    facts = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "device": device,
             "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True).stdout.strip(),
             "unet_weight_bytes": sum(t.numel() * t.element_size() for t in unet.parameters()),
             "grouped_weight_bytes": grouped_weight_bytes(program),
             **pass_constant_facts(program)}
    if args.program_only:
        print(json.dumps(facts, indent=1))
        return
    cache = engine.new_cache(1)
    engine.record(cache, 0, **inputs)
    result = {
        **facts,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "latent": list(inputs["sample"].shape[-2:]),
        "compile_and_record_s": time.perf_counter() - started,
        "cache_bytes_per_step": cache.nbytes(),
        "cache_entries": len(program.entries),
        "every_node_bytes": every_node_bytes(program),
        "edits": [],
    }
    breakdown = {}
    for entry in program.entries:
        breakdown[entry.kind] = breakdown.get(entry.kind, 0) + cache.breakdown()[entry.key]
    result["cache_by_kind"] = breakdown
    if device == "cuda":
        with torch.no_grad():
            result["dense_eager_ms"] = cuda_time_ms(lambda: unet(**inputs))
            if args.compile:
                compiled = torch.compile(unet)
                result["dense_compile_ms"] = cuda_time_ms(lambda: compiled(**inputs))
    size = tuple(inputs["sample"].shape[-2:])
    generator = torch.Generator(device="cpu").manual_seed(1)
    for area in AREAS:
        mask = centred_square(size, area)
        plan = engine.plan(mask)
        stats = engine.stats(plan)
        noise = torch.randn(inputs["sample"].shape, generator=generator).to(device, dtype)
        edited = dict(inputs, sample=torch.where(mask.to(device), inputs["sample"] + noise,
                                                 inputs["sample"]))
        row = {"area": area, "mask_fraction": stats["mask_fraction"],
               "dense_macs": stats["dense_macs"], "sparse_macs": stats["sparse_macs"],
               "ideal_macs": stats["ideal_macs"],
               "level_fractions": [round(level["fraction"], 4) for level in stats["levels"]]}
        output = engine.edit(cache, 0, plan=plan, **edited)
        expected = fc.oracle.masked_dense(engine, plan, inputs, edited)
        row["oracle_rel_error"] = ((output.float() - expected.float()).norm()
                                   / expected.float().norm()).item()
        if device == "cuda":
            row["reference_edit_ms"] = cuda_time_ms(
                lambda: engine.edit(cache, 0, plan=plan, **edited))
        result["edits"].append(row)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    print(text)
    mib = 2 ** 20
    print(f"\n{args.model} {args.dtype} batch {args.batch} on {result['gpu'] or device}")
    print(f"cache/step {result['cache_bytes_per_step'] / mib:.1f} MiB "
          f"(every node {result['every_node_bytes'] / mib:.1f} MiB); by kind "
          + ", ".join(f"{k} {v / mib:.1f} MiB" for k, v in breakdown.items()))
    for row in result["edits"]:
        print(f"area {row['area']:.0%}: GMACs dense {row['dense_macs'] / 1e9:.1f} sparse "
              f"{row['sparse_macs'] / 1e9:.1f} ideal {row['ideal_macs'] / 1e9:.1f}; "
              f"oracle err {row['oracle_rel_error']:.1e}; ref edit "
              f"{row.get('reference_edit_ms', float('nan')):.1f} ms")
    for key in ("dense_eager_ms", "dense_compile_ms"):
        if key in result:
            print(f"{key}: {result[key]:.1f}")


if __name__ == "__main__":
    main()
