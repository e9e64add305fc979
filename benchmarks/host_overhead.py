"""Where the host time of one CUDA-graph edit call goes (GPU only).

    python benchmarks/host_overhead.py [--model sd15] [--area 0.05]

``fisedit-compiler bench --profile-area`` splits an edit call into the replayed graph and the
host time of the call; this script splits the host time further, piece by piece, in the order
``SparseEngine.edit`` runs them: the program lookup, the timestep check, the step's cache
lookup, the pass constants' values (computed for a new text, compared with the last pass's and
kept for the same text, kept on a pass's later steps), the copy of the inputs into the graph's
static buffers and the static store's load of the recorded step
(``CapturedSteps.stand_for``: the values not read in place, and the recorded shift; beside it
the whole-step copy it replaced, for comparison), both by host launch time and GPU time, the
replay launch and the output clone. Medians of perf_counter timings
from an idle GPU; GPU times by CUDA events. Prints a table and the CUDA kernels launched
outside the graph, from a profile of one edit call.

``--whole-step-copy`` compiles the engine as before session 23 for an A/B in one run: no
kernel reads at a recorded shift, so the whole step is copied before each replay (it empties
``lower_kernels``' table of shifted arguments).

``--new-masks N`` then times N edits with *new* masks (seeded squares of 1-20% at new
places): planning the mask (``engine.plan``), the first edit with it, a second one (each the
first step of an edit pass) and the pass's next step. After
``engine.prepare`` a first edit costs what a second does (its bucket's graph is captured);
without it, a first edit of a new bucket pays that bucket's capture.
"""

from __future__ import annotations

import argparse
import itertools

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.engine import timing
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.engine.engine import check_finite_inputs
from fisedit_compiler.passes import lower_kernels


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--area", type=float, default=0.05)
    parser.add_argument("--new-masks", type=int, default=0, metavar="N")
    parser.add_argument("--whole-step-copy", action="store_true")
    args = parser.parse_args(argv)
    if args.whole_step_copy:
        lower_kernels._SHIFTED_ARGUMENTS.clear()
    latent = bench.RESOLUTION[args.model] // 8
    unet = zoo.unet(args.model, dtype=torch.float16, device="cuda")
    inputs = zoo.example_inputs(unet, batch=2, seed=0, height=latent, width=latent)
    engine = fc.compile(unet)
    cache = bench.pass_cache(engine, inputs, bench.recorded_steps(20))
    mask = bench.placed_blob((latent, latent), args.area)
    plan = engine.plan(mask)
    edited = bench.edited_inputs(inputs, mask)
    edit = bench.edit_pass(engine, cache, plan, edited)    # successive steps of one pass
    edit()
    captured = engine.captured_steps(**edited)
    flat = flatten_inputs(edited)
    store = cache.store_on(0, torch.device("cuda"))
    slots = store.layout.slots
    dtypes = sorted({str(dtype).removeprefix("torch.") for _, dtype, *_ in slots})
    mib = store.buffer.numel() / 2**20

    program = engine.program(edited)

    def copy_inputs():                  # those the step reads (not those of pass constants)
        for name in captured.read & flat.keys():
            captured.inputs[name].copy_(flat[name])

    # Two texts in turn: each call's first step brings other bits than the last computation's.
    negated = dict(flat, encoder_hidden_states=-flat["encoder_hidden_states"])
    texts = itertools.cycle([flat, negated])
    stand_for = lambda: captured.stand_for(store)  # noqa: E731
    whole_step = torch.empty_like(store.buffer)    # what the static store was before
    whole_copy = lambda: whole_step.copy_(store.buffer)  # noqa: E731
    graph = captured.capture(plan)
    host, gpu = timing.host_time_ms, timing.cuda_time_ms
    rows = [
        ("whole edit call (host)", host(edit), gpu(edit)),
        ("program lookup", host(lambda: engine.program(edited)), None),
        ("flatten inputs", host(lambda: flatten_inputs(edited)), None),
        ("timestep check", host(lambda: engine._check_timestep(cache, 0, flat)), None),
        ("U-Net state check, per step", host(lambda: engine._check_unchanged(cache, full=False)),
         None),
        ("U-Net state check, first step of an edit",
         host(lambda: engine._check_unchanged(cache, full=True)), None),
        ("the same with the weights' values",
         host(lambda: engine._check_unchanged(cache, full=True, contents=True)), None),
        ("inputs finite, first step of an edit", host(lambda: check_finite_inputs(flat)), None),
        ("pass constants, new text (first step)",
         host(lambda: engine._values_for(program, next(texts), cache, True)),
         gpu(lambda: engine._values_for(program, next(texts), cache, True))),
        ("pass constants, same text (first step)",
         host(lambda: engine._values_for(program, flat, cache, True)),
         gpu(lambda: engine._values_for(program, flat, cache, True))),
        ("cache store_on", host(lambda: cache.store_on(0, torch.device("cuda"))), None),
        ("pass constants, kept",
         host(lambda: engine._values_for(program, flat, cache, False)), None),
        ("copy inputs", host(copy_inputs), gpu(copy_inputs)),
        ("load the recorded step", host(stand_for), gpu(stand_for)),
        ("(copy the whole step)", host(whole_copy), gpu(whole_copy)),
        ("plan a new mask", host(lambda: engine.plan(mask.roll(3, dims=1))), None),
        ("refill the bucket's tables", host(lambda: graph.plan.refill(plan)),
         gpu(lambda: graph.plan.refill(plan))),
        ("graph replay", host(graph.replay), gpu(graph.replay)),
        ("output clone", host(lambda: graph.output.clone()), None),
    ]
    print(f"{args.model} {latent * 8} px, {args.area:.0%} blob, cache: {len(slots)} tensors in "
          f"one {mib:.1f} MiB buffer, dtypes {dtypes}; {captured._copied_bytes / 2**20:.1f} MiB "
          "copied before a replay, the rest read in place")
    print(f"{'piece':28s} {'host ms':>8s} {'GPU ms':>8s}")
    for name, host, gpu in rows:
        print(f"{name:28s} {host:8.3f} {'' if gpu is None else f'{gpu:8.3f}':>8s}")
    # A pipeline calls the U-Net step after step: where nothing synchronises, the host part of
    # one call overlaps the GPU work of the one before.
    calls = 20
    loop_ms = 1e3 * timing.synchronized_s(lambda: [edit() for _ in range(calls)]) / calls
    print(f"{calls} edit calls back to back: {loop_ms:.3f} ms per call (one call from an idle "
          f"GPU: {rows[0][2]:.3f} ms)")

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        edit()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    if args.new_masks:
        new_mask_costs(engine, cache, edited, mask, args.new_masks)


def new_mask_costs(engine, cache, edited: dict, mask, count: int) -> None:
    """Per new mask (seeded blobs of new sizes and places): plan, first and second edit (ms),
    each the first step of an edit pass, then the pass's next step. A first edit slower than
    the second is capture or tuning on the edit path; a pass's first step slower than its next
    is the pass's own work (the weights' values read, the pass constants computed)."""
    gen = torch.Generator().manual_seed(1)
    size = tuple(mask.shape)
    print(f"\nnew masks: {'area':>6s} {'bucket':>6s} {'plan':>8s} {'edit 1':>8s} {'edit 2':>8s}"
          f" {'next step':>9s}  (ms)")
    for _ in range(count):
        area = 0.01 + 0.19 * float(torch.rand((), generator=gen))
        shift = [int(v) for v in torch.randint(-size[0] // 3, size[0] // 3, (2,), generator=gen)]
        moved = bench.blob_mask(size, area).roll(shift, dims=(0, 1))
        plans = []
        plan_ms = 1e3 * timing.synchronized_s(lambda: plans.append(engine.plan(moved)))
        run = lambda: engine.edit(cache, 0, plan=plans[0], **edited)  # noqa: E731
        first, second = 1e3 * timing.synchronized_s(run), 1e3 * timing.synchronized_s(run)
        following = 1e3 * timing.synchronized_s(
            lambda: engine.edit(cache, 1, plan=plans[0], **edited))
        bucket = "-" if plans[0].bucket is None else plans[0].bucket.index
        print(f"{'':10s} {area:6.1%} {bucket:>6} {plan_ms:8.2f} {first:8.2f} {second:8.2f}"
              f" {following:9.2f}")


if __name__ == "__main__":
    main()
