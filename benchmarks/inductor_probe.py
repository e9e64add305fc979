"""Can Inductor compile the compact edit graph, how much does it fuse, and is it faster?

    python benchmarks/inductor_probe.py [--model sd15-tiny] [--latent 32] [--dynamic]
    python benchmarks/inductor_probe.py --device cuda   (sd15, 64x64 latent, fp16, 5% and 20%)

Issue 17's first lever is Inductor over the compact edit graph. This probe answers the
questions that come before any GPU timing, on the torch reference path (the ops'
specification; on the GPU the product graph calls Triton kernels instead, which Inductor would
see as custom ops):

- whether Dynamo traces the edit graph, with the plan and the recorded step as inputs, and
  where it breaks (the derived weight copies' lookup does; ``tune_dense.bake_derived_copies``
  turns them into buffers first);
- whether the compiled step matches the eager one;
- how many kernels it runs: aten ops of one eager step (each a launch on the GPU) against the
  fused functions Inductor calls plus the calls it leaves to libraries (GEMMs, convs), read
  from its output code, and the loop kernels it generated (the C++ backend packs several
  into one function, where Triton on the GPU launches each group it fuses: the GPU count
  would lie between the two);
- what a mask of another capacity costs (two blobs, 5% and 12% of a 32x32 latent: 9 and 16
  active tiles of 64, both sparse): a recompile where shapes are static per plan; with
  ``--dynamic`` (``torch.compile(dynamic=True)``), whether symbolic sizes avoid it.

Prints a short table; on the CPU, compile times are CPU times and say nothing of the GPU's.

``--device cuda`` (issue 17's first lever, timed; defaults: sd15 at 512 px, fp16, batch 2,
blobs of 5% and 20%) compiles the same graph on the GPU and times, in a loop of steps as a
pipeline calls them: the torch ops eager, Inductor's compiled step, that step replayed in a
CUDA graph, and the product path (Triton kernels in the engine's CUDA graphs) beside them,
with each one's kernels per step (profiler) and error against the oracle. Inductor sees the
reference path's ops (gathers, SDPA, cuDNN convs), not the product's Triton kernels: what it
would fuse around them as custom ops is the glue it fuses here.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import time

import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.compiler.capture import flatten_inputs
from fisedit_compiler.graph_keys import CACHE_INPUT, PLAN_INPUT
from fisedit_compiler.passes.tune_dense import bake_derived_copies


class CountOps(TorchDispatchMode):
    """Counts the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _baked(program) -> fx.GraphModule:
    """A copy of ``program``'s edit graph whose derived weight copies are buffers (their
    lookup reads version counters, which Dynamo does not trace)."""
    edit = fx.GraphModule(program.edit, copy.deepcopy(program.edit.graph))
    bake_derived_copies(edit)
    edit.graph.eliminate_dead_code()
    edit.recompile()
    return edit


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default=None, help="sd15-tiny on the CPU, sd15 on the GPU")
    parser.add_argument("--latent", type=int, default=None,
                        help="latent side (default 32 on the CPU, the model's on the GPU)")
    parser.add_argument("--areas", default=None,
                        help="CPU: two blob areas whose plans are sparse at different "
                             "capacities (0.05,0.12); GPU: the areas timed (0.05,0.2)")
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        _gpu(args)
        return
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    args.model = args.model or "sd15-tiny"
    args.latent = args.latent or 32
    unet = zoo.unet(args.model)
    inputs = zoo.example_inputs(unet, batch=2, seed=0, height=args.latent, width=args.latent)
    areas = [float(area) for area in (args.areas or "0.05,0.12").split(",")]
    # The whole step in one graph (no pass constants apart), as the probe's rows count it.
    engine = fc.compile(unet, fc.SparseConfig(kernels="torch", cuda_graphs=False,
                                              hoist_pass_constants=False))
    cache = engine.new_cache()
    engine.record(cache, 0, **inputs)
    program = engine.program(inputs)
    size = tuple(inputs["sample"].shape[-2:])
    store = cache.store_on(0, inputs["sample"].device)

    def step_inputs(area):
        mask = bench.blob_mask(size, area)
        return {**flatten_inputs(bench.edited_inputs(inputs, mask)),
                PLAN_INPUT: engine.plan(mask), CACHE_INPUT: store}

    first, second = step_inputs(areas[0]), step_inputs(areas[1])
    first_plan, second_plan = first[PLAN_INPUT], second[PLAN_INPUT]
    if first_plan.full or second_plan.full or first_plan.fractions() == second_plan.fractions():
        raise SystemExit(f"pick two areas whose plans are sparse at different capacities; got "
                         f"{first_plan} and {second_plan}")
    eager = program.edit(**first)
    counter = CountOps()
    with counter:
        program.edit(**first)
    breaks_as_built = torch._dynamo.explain(program.edit)(**first).graph_break_count
    edit = _baked(program)
    breaks_baked = torch._dynamo.explain(edit)(**first).graph_break_count
    torch._dynamo.reset()
    metrics.reset()
    compiled = torch.compile(edit, dynamic=args.dynamic or None)
    started = time.perf_counter()
    result, sources = run_and_get_code(compiled, **first)
    compile_s = time.perf_counter() - started
    loop_kernels = metrics.generated_kernel_count
    code = "\n".join(sources)
    fused = len(re.findall(r"^\s+cpp_fused_\w+\(", code, flags=re.M))
    library = len(re.findall(r"^\s+\w+ = extern_kernels\.\w+\(|^\s+extern_kernels\.\w+\(", code,
                             flags=re.M))
    fallback = len(re.findall(r"torch\.ops\.aten\.\w+\.\w+\(", code))
    started = time.perf_counter()
    second_result = compiled(**second)
    second_s = time.perf_counter() - started
    second_error = (second_result - program.edit(**second)).abs().max().item()
    rows = [
        ("aten ops of one eager step", counter.count),
        ("graph breaks: edit graph as built / derived copies baked",
         f"{breaks_as_built} / {breaks_baked}"),
        ("Inductor: fused C++ functions + library calls + aten fallbacks called per step",
         f"{fused} + {library} + {fallback}"),
        ("Inductor: loop kernels generated (several per C++ function)", loop_kernels),
        ("compiled vs eager, max abs difference", f"{(result - eager).abs().max().item():.1e}"),
        ("first compile (CPU)", f"{compile_s:.0f} s"),
        (f"a mask of another capacity ({second_plan.fractions()[0]:.1%} of level 0's tiles "
         f"after {first_plan.fractions()[0]:.1%}): call time (CPU), max abs difference",
         f"{second_s:.0f} s, {second_error:.1e}"),
    ]
    print(f"| {args.model}, {args.latent}x{args.latent} latent, {areas[0]:.0%} blob, "
          f"torch reference ops, CPU{', dynamic=True' if args.dynamic else ''} | |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def _kernels_per_call(call, calls: int = 3) -> float:
    """GPU activities (kernels, copies) of ``call``, per call, counted as
    ``bench.profile_step`` counts the product's."""
    return len(bench.gpu_events(call, calls)) / calls


def _graphed(call):
    """``call`` captured in a CUDA graph (warmed up on a side stream first): its replay, or
    the reason it cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            output = call()
    except Exception as error:      # reported in the table: why Inductor's step is not graphed
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return (lambda: graph.replay() or output), None


def _gpu(args) -> None:
    """Issue 17's Inductor lever on the GPU: the torch-ops edit graph eager, compiled by
    Inductor, and compiled then replayed in a CUDA graph, against the product path, timed in
    a loop of steps of one edit pass at each area; one table row per variant and area."""
    from fisedit_compiler import oracle
    from fisedit_compiler.engine.pass_values import PassValues
    from fisedit_compiler.engine.timing import loop_time_ms
    from fisedit_compiler.graph_keys import PASS_VALUES_INPUT

    reps = 20
    model = args.model or "sd15"
    unet = zoo.unet(model, dtype=torch.float16, device="cuda")
    latent = args.latent or unet.config.sample_size
    inputs = zoo.example_inputs(unet, batch=2, seed=0, height=latent, width=latent)
    size = tuple(inputs["sample"].shape[-2:])
    product = fc.compile(unet)                      # Triton kernels in CUDA graphs
    torch_ops = product.with_config(dataclasses.replace(product.config, kernels="torch",
                                                        cuda_graphs=False))
    program = torch_ops.program(inputs)
    steps = bench.recorded_steps(reps)
    product_cache = bench.pass_cache(product, inputs, steps)
    store = bench.pass_cache(torch_ops, inputs, 1).store_on(0, inputs["sample"].device)
    compiled = torch.compile(_baked(program), dynamic=args.dynamic or None)
    print(f"| {model}, {latent}x{latent} latent, fp16, batch 2, blob, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__} | ms per step in a loop "
          f"| kernels per step | error vs oracle | notes |", flush=True)
    print("|---|---|---|---|---|", flush=True)
    for area in [float(area) for area in (args.areas or "0.05,0.2").split(",")]:
        mask = bench.placed_blob(size, area)
        edited = bench.edited_inputs(inputs, mask)
        flat = torch_ops.flat(edited)
        plan = torch_ops.plan(mask)
        step_inputs = {**flat, PLAN_INPUT: plan, CACHE_INPUT: store}
        if program.pass_constants is not None:
            step_inputs[PASS_VALUES_INPUT] = PassValues(program.pass_constants)(flat, None, True)
        product_plan = product.plan(mask)
        expected = oracle.masked_dense(product, product_plan, inputs, edited)

        def row(name, call, kernels, notes=""):
            error = bench.relative_error(call(), expected)
            print(f"| {area:.0%}: {name} | {loop_time_ms(call, calls=reps):.2f} | {kernels} | "
                  f"{error:.1e} | {notes} |", flush=True)

        eager = lambda: program.edit(**step_inputs)        # noqa: E731
        row("torch ops, eager", eager, f"{_kernels_per_call(eager):.0f}")
        started = time.perf_counter()
        inductor = lambda: compiled(**step_inputs)          # noqa: E731
        inductor()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - started
        row("torch ops, Inductor", inductor, f"{_kernels_per_call(inductor):.0f}",
            f"compiled in {compile_s:.0f} s")
        replay, why_not = _graphed(inductor)
        if replay is None:
            print(f"| {area:.0%}: torch ops, Inductor, CUDA graph | - | - | - | {why_not} |")
        else:
            row("torch ops, Inductor, CUDA graph", replay, "as above")
        kernels = bench.profile_step(product, inputs, product_plan, edited)["kernels_per_step"]
        row("product (Triton kernels, CUDA graph)",
            bench.edit_pass(product, product_cache, product_plan, edited), f"{kernels:.0f}")
        torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
