"""Can Inductor compile the compact edit graph, and how much does it fuse? (CPU, sd15-tiny)

    python benchmarks/inductor_probe.py [--model sd15-tiny] [--latent 32] [--dynamic]

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

Prints a short table; compile times are CPU times and say nothing of the GPU's.
"""

from __future__ import annotations

import argparse
import copy
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


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15-tiny")
    parser.add_argument("--latent", type=int, default=32, help="latent side (default 32)")
    parser.add_argument("--areas", default="0.05,0.12",
                        help="two blob areas whose plans are sparse at different capacities")
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")
    args = parser.parse_args(argv)
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    unet = zoo.unet(args.model)
    inputs = zoo.example_inputs(unet, batch=2, seed=0, height=args.latent, width=args.latent)
    areas = [float(area) for area in args.areas.split(",")]
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
    edit = fx.GraphModule(program.edit, copy.deepcopy(program.edit.graph))
    bake_derived_copies(edit)
    edit.graph.eliminate_dead_code()
    edit.recompile()
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


if __name__ == "__main__":
    main()
