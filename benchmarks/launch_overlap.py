"""What programmatic dependent launch saves per edit step (issue 17's launch-count lever; GPU).

An edit step is hundreds of kernels of a few microseconds each, and its time follows their
number more than their work (benchmarks/RESULTS.md, session 9). With programmatic dependent
launch (Hopper and later, ``kernels.launch_options``) each of the package's Triton kernels may
be placed on the GPU while the kernel before it still runs, and waits inside for it to finish:
the gap between two kernels shrinks, the work does not change.

In one process, per model and mask, two engines of the same U-Net and recording: one captured
with the overlap off (``kernels.set_programmatic_launch(False)``), one with it on. Their replayed
step graphs (GPU time of a step) and whole edit calls are timed in alternation, and their
outputs compared with each other (the overlap must not change a bit) and with the oracle. A
chain of 200 small Triton kernels (add + layer norm on 2 x 258 tokens of 320 channels, as at a
5% SD1.5 edit's finest level) replayed as one graph gives the saving per kernel boundary.

    python benchmarks/launch_overlap.py [--model sd15] [--json OUT]

Needs CUDA, diffusers and Triton 3.3 or later.
"""

from __future__ import annotations

import argparse
import json

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench
from fisedit_compiler.compiler import oracle
from fisedit_compiler.engine.timing import cuda_time_ms
from fisedit_compiler.execution import kernels
from fisedit_compiler.execution.kernels import tokens
from fisedit_compiler.execution.plan import scattered_mask

MASKS = (("blob", 0.01), ("blob", 0.05), ("blob", 0.2), ("scattered", 0.05))


def graph_of(fn):
    """``fn`` captured as a CUDA graph (after a warm-up call that compiles its kernels)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@torch.no_grad()
def kernel_chain(reps: int) -> dict:
    """Microseconds per kernel of 200 dependent add + layer norm launches in one graph."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2 * 258, 320, generator=gen).to("cuda", torch.float16)
    weight, bias = torch.ones(320, device="cuda", dtype=x.dtype), torch.zeros_like(x[0])
    chain = 200

    def run():
        value = x
        for _ in range(chain):
            _, value = tokens.add_layer_norm(value, x, weight, bias, 1e-5)

    result = {}
    for overlap in (False, True):
        kernels.set_programmatic_launch(overlap)
        graph = graph_of(run)
        result["on" if overlap else "off"] = 1000 * cuda_time_ms(graph.replay, reps=reps) / chain
    kernels.set_programmatic_launch(True)
    return result


@torch.no_grad()
def step_ab(model: str, reps: int, log=print) -> list[dict]:
    unet, inputs, _ = bench._setup(model, torch.float16, 2)
    config = fc.SparseConfig()
    engines = {}
    for overlap in (False, True):
        engine = fc.compile(unet, config)
        cache = bench.pass_cache(engine, inputs, bench.recorded_steps(reps))
        engines[overlap] = (engine, cache)
    size = tuple(inputs["sample"].shape[-2:])
    rows = []
    for layout, area in MASKS:
        mask = bench.placed_blob(size, area) if layout == "blob" else scattered_mask(size, area)
        edited = bench.edited_inputs(inputs, mask)
        outputs, calls, replays = {}, {}, {}
        for overlap, (engine, cache) in engines.items():
            plan = engine.plan(mask)
            kernels.set_programmatic_launch(overlap)       # read while the step is captured
            outputs[overlap] = engine.edit(cache, 0, plan=plan, **edited)
            calls[overlap] = bench.edit_pass(engine, cache, plan, edited)
            replays[overlap] = engine.captured_steps(**edited).capture(plan).replay
        kernels.set_programmatic_launch(True)
        expected = oracle.masked_dense(engines[True][0], engines[True][0].plan(mask), inputs,
                                       edited)
        times = {key: [] for key in ("replay_off", "replay_on", "call_off", "call_on")}
        for _ in range(3):                      # alternate, so drift hits both alike
            for overlap in (False, True):
                suffix = "on" if overlap else "off"
                times[f"replay_{suffix}"].append(cuda_time_ms(replays[overlap], reps=reps))
                times[f"call_{suffix}"].append(cuda_time_ms(calls[overlap], reps=reps))
        row = {"model": model, "layout": layout, "area": area,
               **{key: sorted(values)[1] for key, values in times.items()},
               "identical": bool(torch.equal(outputs[False], outputs[True])),
               "error": bench.relative_error(outputs[True], expected)}
        rows.append(row)
        log(f"{model} {layout:9s} {area:4.0%}  replay {row['replay_off']:.3f} -> "
            f"{row['replay_on']:.3f} ms  call {row['call_off']:.3f} -> {row['call_on']:.3f} ms"
            f"  identical {row['identical']}  error {row['error']:.1e}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(bench.RESOLUTION))
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("launch_overlap.py measures GPU kernels and needs a CUDA device")
    result = {"environment": bench.environment(), "chain_us_per_kernel": kernel_chain(args.reps)}
    print(f"kernel chain: {result['chain_us_per_kernel']['off']:.2f} -> "
          f"{result['chain_us_per_kernel']['on']:.2f} us per kernel", flush=True)
    result["rows"] = [row for model in args.model or ["sd15"]
                      for row in step_ab(model, args.reps, lambda text: print(text, flush=True))]
    print("\n| model | layout | area | replay off ms | replay on ms | saved | call off ms | "
          "call on ms | identical | oracle error |\n|---|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['model']} | {row['layout']} | {row['area']:.0%} | {row['replay_off']:.3f} "
              f"| {row['replay_on']:.3f} | {1 - row['replay_on'] / row['replay_off']:.1%} | "
              f"{row['call_off']:.3f} | {row['call_on']:.3f} | {row['identical']} | "
              f"{row['error']:.1e} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
