"""What one recorded step's values are read for: bytes of the step by the edit graph's op
that reads them (CPU is enough; no timing).

    python benchmarks/recorded_reads.py [--model sd15] [--dtype float16]

The CUDA-graph path copies a whole recorded step into the graphs' static buffer before each
replay; this splits that step's bytes by the ops that read each recorded value (a sparse
conv reads its input only around the active tiles, a self-attention its K/V in full), the
sizes a copy of only what a plan reads would start from. Records one step of the model at
its benchmark resolution (``bench.RESOLUTION``), batch 2.
"""

from __future__ import annotations

import argparse
import collections

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo
from fisedit_compiler.execution import sparse_ops


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", choices=sorted(bench.RESOLUTION))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    unet = zoo.unet(args.model, dtype=getattr(torch, args.dtype))
    latent = bench.RESOLUTION[args.model] // 8
    inputs = zoo.example_inputs(unet, batch=2, seed=0, height=latent, width=latent)
    engine = fc.compile(unet)
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


if __name__ == "__main__":
    main()
