"""Where the host time of one CUDA-graph edit call goes (GPU only).

    python benchmarks/host_overhead.py [--model sd15] [--area 0.05]

``fisedit-compiler bench --profile-area`` splits an edit call into the replayed graph and the
host time of the call; this script splits the host time further, piece by piece, in the order
``SparseEngine.edit`` runs them: the program lookup, the timestep check, the step's cache
lookup, the copies of the inputs and the cache into the graph's static buffers (host launch
time and GPU time), the replay launch and the output clone. Medians of perf_counter timings
from an idle GPU; GPU times by CUDA events. Prints a table and the CUDA kernels launched
outside the graph, from a profile of one edit call.

``--new-masks N`` then times what an edit with a *new* mask pays before its first replay, for
N masks (the square moved by 1..N latent pixels): planning the mask (``engine.plan``), the
first eager run of the edit graph under the plan (index tables, any Triton compile or
autotune a new size needs), a second eager run (the Python launch cost alone), the CUDA-graph
capture (``CapturedStep``: a warm-up run, the capture and instantiation), and a cProfile of
the last mask's capture, by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.engine.cuda_graph import CapturedStep
from fisedit_compiler.graph_keys import CACHE_INPUT, PLAN_INPUT


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--area", type=float, default=0.05)
    parser.add_argument("--new-masks", type=int, default=0, metavar="N")
    args = parser.parse_args(argv)
    latent = bench.RESOLUTION[args.model] // 8
    unet = zoo.unet(args.model, dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0, height=latent, width=latent)
    engine = fc.compile(unet)
    cache = engine.new_cache()
    engine.record(cache, 0, **inputs)
    mask = bench.blob_mask((latent, latent), args.area)
    plan = engine.plan(mask)
    edited = bench.edited_inputs(inputs, mask)
    edit = lambda: engine.edit(cache, 0, plan=plan, **edited)  # noqa: E731
    edit()
    captured = next(v for k, v in plan.memo.items() if isinstance(k, tuple))
    flat = flatten_inputs(edited)
    store = cache.store_on(0, torch.device("cuda"))
    slots = store.layout.slots
    dtypes = sorted({str(dtype).removeprefix("torch.") for _, dtype, *_ in slots})
    mib = store.buffer.numel() / 2**20

    def copy_inputs():
        for name, value in flat.items():
            captured.inputs[name].copy_(value)

    copy_cache = lambda: captured.store.buffer.copy_(store.buffer)  # noqa: E731
    host, gpu = timing.host_time_ms, timing.cuda_time_ms
    rows = [
        ("whole edit call (host)", host(edit), gpu(edit)),
        ("program lookup", host(lambda: engine.program(edited)), None),
        ("flatten inputs", host(lambda: flatten_inputs(edited)), None),
        ("timestep check", host(lambda: engine._check_timestep(cache, 0, flat)), None),
        ("cache store_on", host(lambda: cache.store_on(0, torch.device("cuda"))), None),
        ("copy inputs", host(copy_inputs), gpu(copy_inputs)),
        ("copy cache", host(copy_cache), gpu(copy_cache)),
        ("graph replay", host(captured.graph.replay), gpu(captured.graph.replay)),
        ("output clone", host(lambda: captured.output.clone()), None),
    ]
    print(f"{args.model} {latent * 8} px, {args.area:.0%} blob, cache: {len(slots)} tensors in "
          f"one {mib:.1f} MiB buffer, dtypes {dtypes}")
    print(f"{'piece':28s} {'host ms':>8s} {'GPU ms':>8s}")
    for name, host, gpu in rows:
        print(f"{name:28s} {host:8.3f} {'' if gpu is None else f'{gpu:8.3f}':>8s}")

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        edit()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    if args.new_masks:
        new_mask_costs(engine, edited, mask, store, args.new_masks)


def synchronized_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def new_mask_costs(engine, edited: dict, mask, store, count: int) -> None:
    """Per new mask: plan, first and second eager run, capture (ms); then a capture profile."""
    program = engine.program(edited)
    flat = flatten_inputs(edited)
    print(f"\nnew masks: {'shift':>5s} {'plan':>8s} {'eager 1':>8s} {'eager 2':>8s} "
          f"{'capture':>8s}  (ms)")
    for shift in range(1, count + 1):
        moved = mask.roll(shift, dims=1)
        plans = []
        plan_ms = synchronized_ms(lambda: plans.append(engine.plan(moved)))
        run = lambda: program.edit(**flat, **{PLAN_INPUT: plans[0], CACHE_INPUT: store})  # noqa
        first, second = synchronized_ms(run), synchronized_ms(run)
        capture = synchronized_ms(lambda: CapturedStep(program.edit, plans[0], flat, store))
        print(f"{'':10s} {shift:5d} {plan_ms:8.1f} {first:8.1f} {second:8.1f} {capture:8.1f}")
    plan = engine.plan(mask.roll(count + 1, dims=1))
    profiler = cProfile.Profile()
    profiler.enable()
    CapturedStep(program.edit, plan, flat, store)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
