"""The split-K GEMM (``kernels/gemm.py``) against cuBLAS at every GEMM shape of a sparse step:
where it is faster, with which launch configuration, and what the step's GEMMs take with
the shipped rule (``gemm.launch_config``) against cuBLAS alone.

Logs the GEMMs of one later step of a blob edit pass (``micro_step_gemms.step_gemms``, with
the runtime's split-K GEMM turned off so that every GEMM is cuBLAS's and logged), then per
distinct shape times cuBLAS, the rule's configuration and a sweep of tile shapes x splits.
Each timed call reads operands of its own (a ring of copies larger than L2), replayed from one
CUDA graph, as a step reads every weight once from DRAM. Last, the step's GEMMs in order, each
on operands of its own, in one graph: all cuBLAS, the rule, and per shape the faster of
cuBLAS and the sweep's best.

The GEMMs alone: the conv epilogue the kernel fuses (one launch fewer per conv with a time
embedding or residual) is not in these timings; the step's bench shows it.

    python benchmarks/micro_gemm.py [--model sd15] [--area 0.05] [--json OUT]   (CUDA only)
"""
import argparse
import json
import math
import time

import torch

from micro_step_gemms import step_gemms
from micro_text_attention import RING_BYTES, time_ms

from fisedit_compiler.execution.kernels import gemm

TILES = [(m, n, 64) for m in (16, 32, 64, 128) for n in (32, 64, 128)] + [
    (16, 64, 128), (32, 64, 128), (16, 128, 128), (32, 128, 128)]
SPLITS = (1, 2, 4, 8, 16)


def sweep_configs(m, k):
    """The sweep's configurations for an ``[m, k]`` operand: row tiles up to the rows (at
    least 16), splits that leave each split at least one K step."""
    rows = max(16, 1 << (m - 1).bit_length())
    for block_m, block_n, block_k in TILES:
        if block_m > rows:
            continue
        warps = 8 if block_m * block_n >= 128 * 64 else 4
        stages = 3 if block_k == 128 else 4
        for splits in SPLITS:
            if splits * block_k <= k:
                yield gemm.GemmConfig(block_m, block_n, block_k, splits, warps, stages)


def gemm_of(key):
    """(M, K, N, has bias) of a logged ``mm`` / ``addmm``."""
    op, operands, _ = key
    matrices = [shape for shape, _, _ in operands if len(shape) == 2]
    (m, k), (_, n) = matrices
    return m, k, n, op == "addmm"


def operands_for(key, copies):
    """``copies`` sets of the logged call's operands (its strides kept)."""
    def make(shape, stride, dtype):
        extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride))
        return (torch.randn(extent, device="cuda").mul_(0.05).to(dtype)
                .as_strided(shape, stride))

    return [[make(*o) for o in key[1]] for _ in range(copies)]


def cublas_call(key, operands):
    op, _, (beta, alpha) = key
    if op == "addmm":
        return lambda: torch.addmm(*operands, beta=beta, alpha=alpha)
    return lambda: torch.mm(*operands)


def triton_call(key, operands, config):
    if key[0] == "addmm":
        bias, a, b = operands
    else:
        (a, b), bias = operands, None
    return lambda: gemm.gemm(a, b, bias, config=config)


def ring_copies(key):
    nbytes = sum(math.prod(shape) * 2 for shape, _, _ in key[1])
    return max(4, math.ceil(RING_BYTES / nbytes))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--area", type=float, default=0.05)
    parser.add_argument("--json")
    args = parser.parse_args()
    shipped_rule = gemm.launch_config
    gemm.launch_config = lambda *a, **k: None           # log every GEMM as cuBLAS's
    calls = [c for c in step_gemms(args.model, args.area) if c[0] in ("mm", "addmm")]
    gemm.launch_config = shipped_rule
    keys = list(dict.fromkeys(calls))
    device = torch.device("cuda")
    print(f"{args.model} at a {args.area:.0%} blob: {len(calls)} GEMMs a step, {len(keys)} "
          f"distinct; {torch.cuda.get_device_name()}", flush=True)
    started = time.perf_counter()
    keys.sort(key=lambda key: -calls.count(key) * math.prod(gemm_of(key)[:3]))
    shapes = []
    for key in keys:
        m, k, n, has_bias = gemm_of(key)
        dtype = key[1][-1][2]
        ring = operands_for(key, ring_copies(key))
        entry = {"m": m, "k": k, "n": n, "bias": has_bias, "calls": calls.count(key),
                 "cublas_us": 1000 * time_ms([cublas_call(key, o) for o in ring])}
        rule = gemm.launch_config(m, n, k, dtype, device)
        entry["rule"] = None if rule is None else list(rule)
        if rule is not None:
            entry["rule_us"] = 1000 * time_ms([triton_call(key, o, rule) for o in ring])
        sweep = []
        for config in sweep_configs(m, k):
            us = 1000 * time_ms([triton_call(key, o, config) for o in ring])
            sweep.append((list(config), us))
        entry["sweep"] = sweep
        best = min(sweep, key=lambda s: s[1])
        entry["best"], entry["best_us"] = best
        expected = torch.mm(ring[0][-2].float(), ring[0][-1].float())
        if has_bias:
            expected += ring[0][0].float()
        got = triton_call(key, ring[0], gemm.GemmConfig(*best[0]))().float()
        entry["best_error"] = float((got - expected).abs().max() / expected.abs().max())
        shapes.append(entry)
        del ring
        rule_text = f"{entry['rule_us']:7.2f} {tuple(rule)}" if rule else "   cuBLAS"
        print(f"{m:5d} x {k:6d} x {n:5d} {'+b' if has_bias else '  '} x{entry['calls']:3d}: "
              f"cuBLAS {entry['cublas_us']:7.2f}  rule {rule_text}  best {best[1]:7.2f} "
              f"{tuple(best[0])}  err {entry['best_error']:.1e}", flush=True)
    print(f"sweep took {time.perf_counter() - started:.0f} s")

    by_key = dict(zip(keys, shapes))

    def total(choice):
        return sum(s["calls"] * choice(s) for s in shapes) / 1000

    cublas_sum = total(lambda s: s["cublas_us"])
    rule_sum = total(lambda s: s.get("rule_us", s["cublas_us"]))
    best_sum = total(lambda s: min(s["cublas_us"], s["best_us"]))

    def sequence(pick):
        bound = []
        for key in calls:
            operands = operands_for(key, 1)[0]
            config = pick(by_key[key])
            bound.append(cublas_call(key, operands) if config is None
                         else triton_call(key, operands, gemm.GemmConfig(*config)))
        return time_ms(bound, replays=20) * len(calls)

    result = {"model": args.model, "area": args.area, "gemms_per_step": len(calls),
              "distinct": len(keys), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "sum_cublas_ms": cublas_sum, "sum_rule_ms": rule_sum,
              "sum_best_ms": best_sum,
              "sequence_cublas_ms": sequence(lambda s: None),
              "sequence_rule_ms": sequence(lambda s: s["rule"]),
              "sequence_best_ms": sequence(
                  lambda s: s["best"] if s["best_us"] < s["cublas_us"] else None),
              "shapes": shapes}
    print(f"shapes alone, summed over the step: cuBLAS {cublas_sum:.3f} ms, rule "
          f"{rule_sum:.3f} ms, per-shape best of both {best_sum:.3f} ms")
    print(f"the step's GEMMs in one graph: cuBLAS {result['sequence_cublas_ms']:.3f} ms, rule "
          f"{result['sequence_rule_ms']:.3f} ms, per-shape best {result['sequence_best_ms']:.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
