"""What one recorded step's values are read for: bytes of the step by the edit graph's op
that reads them (CPU is enough; no timing).

    python benchmarks/recorded_reads.py [--model sd15] [--dtype float16]

This splits a step's bytes by the ops that read each recorded value (a sparse conv reads its
input only around the active tiles, a self-attention its K/V in full), and prints how much
the CUDA-graph path copies into its static store before each replay: the values not read in
place at the recorded shift (``IN_PLACE_KEYS``; until session 23 the whole step was copied).
The edit graph is lowered to the Triton ops as on a GPU (``SparseConfig(kernels="triton")``,
which the CPU allows under ``TRITON_INTERPRET=1``; nothing runs a kernel here). Records one
step of the model at its benchmark resolution (``bench.RESOLUTION``), batch 2.
"""

from __future__ import annotations

import argparse
import collections
import os

# The Triton-lowered edit graph on the CPU (before triton is first imported); nothing here
# runs a kernel, the interpreter only lets the engine lower to the Triton ops.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import fisedit_compiler as fc  # noqa: E402
from fisedit_compiler import bench, zoo  # noqa: E402
from fisedit_compiler.execution import sparse_ops  # noqa: E402
from fisedit_compiler.graph_keys import IN_PLACE_KEYS  # noqa: E402


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(bench.RESOLUTION))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    unet = zoo.unet(args.model, dtype=getattr(torch, args.dtype))
    latent = bench.RESOLUTION[args.model] // 8
    inputs = zoo.example_inputs(unet, batch=2, seed=0, height=latent, width=latent)
    engine = fc.compile(unet, fc.SparseConfig(kernels="triton"))
    cache = engine.new_cache(1)
    engine.record(cache, 0, **inputs)
    key_bytes = cache.breakdown()       # of the one recorded step
    edit = engine.program(inputs).edit
    nbytes, reads = collections.Counter(), collections.Counter()
    for node in edit.graph.nodes:
        if node.op == "call_function" and node.target is sparse_ops.cache_read:
            readers = ", ".join(sorted({getattr(user.target, "__name__", str(user.target))
                                        for user in node.users}))
            nbytes[readers] += key_bytes[node.args[1]]
            reads[readers] += 1
    print(f"{args.model} {latent * 8} px, batch 2, {args.dtype}: "
          f"{sum(nbytes.values()) / 2**20:.1f} MiB a recorded step")
    print(f"{'MiB':>9s} {'reads':>6s}  read by")
    for readers, size in nbytes.most_common():
        print(f"{size / 2**20:9.1f} {reads[readers]:6d}  {readers}")
    copied = cache.steps[0].layout.span_without(edit.meta[IN_PLACE_KEYS])
    print(f"copied before each CUDA-graph replay: {copied / 2**20:.1f} MiB (the rest is read in "
          "place)")


if __name__ == "__main__":
    main()
