"""Microbenchmark of issue 17's untried GEMM lever: would GEMMs tuned per shape beat cuBLAS on
the few-row GEMMs of a sparse step?

The 5% SD1.5 profile (RESULTS.md, sessions 9-11) spends 1.28 ms of 2.76 ms of kernel time in
195 cuBLAS GEMMs (the gather convs' and the token path's), ~6.6 us each where their weights
read in a fraction of that. This logs every GEMM one eager sparse step runs (a later step of
an edit pass, ``TorchDispatchMode``: op, shapes, strides, dtype), then times, each replayed
in one CUDA graph:

* ``cublas``: the step's GEMMs in the step's order, each on weights of its own (the step
  reads every weight once, from DRAM: the sequence holds more than L2), as the step calls them;
* ``cublaslt``: the same under ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
* ``tuned``: the same sequence with each distinct shape compiled by ``torch.compile`` in
  ``max-autotune-no-cudagraphs`` (Inductor benchmarks its Triton GEMM templates, split-K
  ones among them, against cuBLAS and keeps the fastest), for the shapes with the most
  cuBLAS time until ``--autotune-seconds`` of compiling is spent; the rest stay cuBLAS.

and per distinct shape its calls, cuBLAS time alone and tuned time alone. Each tuned shape's
result is compared with cuBLAS's (relative error). Prints a table; ``--json`` writes it all.

    python benchmarks/micro_step_gemms.py [--model sd15] [--area 0.05] [--json OUT]

Needs CUDA, diffusers (the zoo U-Net) and the package.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from triton.testing import do_bench_cudagraph

import fisedit_compiler as fc
from fisedit_compiler import bench

aten = torch.ops.aten
GEMMS = {aten.mm.default: "mm", aten.mm.out: "mm", aten.addmm.default: "addmm",
         aten.addmm.out: "addmm", aten.bmm.default: "bmm", aten.bmm.out: "bmm"}


class GemmLog(TorchDispatchMode):
    """Every GEMM dispatched while active, in order: ``(op, operands, scalars)`` where the
    operands are ``(shape, stride, dtype)`` of the tensors the GEMM reads (not ``out``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in GEMMS:
            operands = tuple((tuple(a.shape), tuple(a.stride()), a.dtype) for a in args
                             if isinstance(a, torch.Tensor))
            scalars = (kwargs.get("beta", 1), kwargs.get("alpha", 1))
            self.calls.append((GEMMS[func], operands, scalars))
        return func(*args, **kwargs)


def step_gemms(model: str, area: float) -> list[tuple]:
    """The GEMMs of one later step of an edit pass at a blob mask of ``area``."""
    import dataclasses

    unet, inputs, _ = bench._setup(model, torch.float16, 2)
    engine = fc.compile(unet)
    eager = engine.with_config(dataclasses.replace(engine.config, cuda_graphs=False))
    mask = bench.placed_blob(tuple(inputs["sample"].shape[-2:]), area)
    plan = eager.plan(mask)
    run = bench.edit_pass(eager, bench.pass_cache(eager, inputs, 3), plan,
                          bench.edited_inputs(inputs, mask))
    run()                                   # the pass's first step: its constants, not timed
    run()
    torch.cuda.synchronize()
    log = GemmLog()
    with log:
        run()
    torch.cuda.synchronize()
    del unet, engine, eager, run
    torch.cuda.empty_cache()
    return log.calls


def operand(shape, stride, dtype) -> torch.Tensor:
    """A tensor of ``shape`` and ``stride`` with small random values (fp16 sums stay finite)."""
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride))
    base = torch.randn(extent, device="cuda", dtype=torch.float32).mul_(0.05).to(dtype)
    return base.as_strided(shape, stride)


def gemm_function(op: str, scalars):
    """The functional GEMM of a logged call: its operands in, a new tensor out."""
    beta, alpha = scalars
    if op == "addmm":
        return lambda bias, a, b: torch.addmm(bias, a, b, beta=beta, alpha=alpha)
    if op == "bmm":
        return lambda a, b: torch.bmm(a, b)
    return lambda a, b: torch.mm(a, b)


def sequence_ms(calls: list[tuple], functions: dict) -> float:
    """The step's GEMMs in order, each on operands of its own, replayed in one CUDA graph."""
    bound = [(functions[key], [operand(*o) for o in key[1]]) for key in calls]

    def step():
        for function, operands in bound:
            function(*operands)

    return do_bench_cudagraph(step, rep=200)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--area", type=float, default=0.05)
    parser.add_argument("--autotune-seconds", type=float, default=240.0)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch._inductor.config as inductor

    inductor.compile_threads = max(1, min(16, torch.get_num_threads()))
    # Every shape compiles the same lambda again: without room, Dynamo would stop compiling
    # it after its default limit and run the rest eagerly, as cuBLAS.
    torch._dynamo.config.recompile_limit = 10_000
    torch._dynamo.config.accumulated_recompile_limit = 100_000
    calls = step_gemms(args.model, args.area)
    keys = list(dict.fromkeys(calls))
    print(f"{args.model} at a {args.area:.0%} blob: {len(calls)} GEMMs a step, "
          f"{len(keys)} distinct", flush=True)
    cublas = {key: gemm_function(key[0], key[2]) for key in keys}
    shapes = []
    for key in keys:
        operands = [operand(*o) for o in key[1]]
        alone = do_bench_cudagraph(lambda: cublas[key](*operands), rep=50)
        shapes.append({"key": key, "calls": calls.count(key), "cublas_us": 1000 * alone})
    shapes.sort(key=lambda s: -s["calls"] * s["cublas_us"])
    tuned = dict(cublas)
    started = time.perf_counter()
    for entry in shapes:
        if time.perf_counter() - started > args.autotune_seconds:
            break
        key = entry["key"]
        operands = [operand(*o) for o in key[1]]
        compiled = torch.compile(gemm_function(key[0], key[2]), dynamic=False, fullgraph=True,
                                 mode="max-autotune-no-cudagraphs")
        expected = cublas[key](*operands).float()
        error = (compiled(*operands).float() - expected).abs().max() / expected.abs().max()
        entry["tuned_us"] = 1000 * do_bench_cudagraph(lambda: compiled(*operands), rep=50)
        entry["tuned_error"] = float(error)
        if entry["tuned_us"] < entry["cublas_us"]:
            tuned[key] = compiled
    autotune_s = time.perf_counter() - started
    covered = sum(s["calls"] * s["cublas_us"] for s in shapes if "tuned_us" in s)
    total = sum(s["calls"] * s["cublas_us"] for s in shapes)
    result = {"model": args.model, "area": args.area, "gemms_per_step": len(calls),
              "distinct": len(keys), "autotune_s": autotune_s,
              "tuned_share_of_cublas_time": covered / total,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cublas_sequence_ms": sequence_ms(calls, cublas)}
    torch.backends.cuda.preferred_blas_library("cublaslt")
    result["cublaslt_sequence_ms"] = sequence_ms(calls, cublas)
    torch.backends.cuda.preferred_blas_library("cublas")
    result["tuned_sequence_ms"] = sequence_ms(calls, tuned)
    print(f"{'op':6} {'operands':58} {'calls':>5} {'cuBLAS us':>9} {'tuned us':>9} {'err':>8}")
    for s in shapes:
        op, operands, _ = s["key"]
        text = " ".join("x".join(map(str, shape)) + ("T" if stride[-1] != 1 else "")
                        for shape, stride, _ in operands)
        tuned_text = f"{s['tuned_us']:9.2f} {s['tuned_error']:8.1e}" if "tuned_us" in s else ""
        print(f"{op:6} {text:58} {s['calls']:5d} {s['cublas_us']:9.2f} {tuned_text}")
    print(f"sum of shapes alone: cuBLAS {total / 1000:.3f} ms; tuned shapes cover "
          f"{covered / total:.0%} of it (autotuned in {autotune_s:.0f} s)")
    print(f"the step's GEMMs in one graph: cuBLAS {result['cublas_sequence_ms']:.3f} ms, "
          f"cuBLASLt {result['cublaslt_sequence_ms']:.3f} ms, "
          f"tuned {result['tuned_sequence_ms']:.3f} ms")
    if args.json:
        for s in shapes:
            op, operands, scalars = s.pop("key")
            s.update(op=op, operands=[[list(shape), list(stride), str(dtype)]
                                      for shape, stride, dtype in operands],
                     scalars=list(scalars))
        result["shapes"] = shapes
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
