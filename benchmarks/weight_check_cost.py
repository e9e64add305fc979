"""What the weight-values check costs (``derived_weights.content_fingerprint``).

    python benchmarks/weight_check_cost.py [--model sd15] [--device cpu] [--dtype float32]

An edit pass's first step, a new generation's first recorded step, ``prepare`` and
EditSession before an edit read every weight's norm once, to tell writes through
``param.data`` that move no version counter. This times that read on a zoo U-Net with random
weights (the same tensors as a trained one), eagerly (``content_fingerprint``) and as the
engine reads it (``WeightFingerprint``: on a GPU a CUDA graph of the same read, captured at its
second call): the first two calls apart (cold), then the median of five. Prints two lines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fisedit_compiler import zoo
from fisedit_compiler.execution.derived_weights import WeightFingerprint, content_fingerprint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float16", "bfloat16", "float32"))
    args = parser.parse_args(argv)
    unet = zoo.unet(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    weights = [*unet.parameters(), *unet.buffers()]

    device = torch.cuda.get_device_name() if unet.device.type == "cuda" else "CPU"
    readers = {"content_fingerprint": lambda: content_fingerprint(weights),
               "WeightFingerprint": WeightFingerprint(weights)}
    for name, read in readers.items():
        def timed() -> float:
            if unet.device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            read()                          # ends with a host read: nothing left queued
            return 1000 * (time.perf_counter() - started)

        cold = [timed(), timed()]
        warm = statistics.median(timed() for _ in range(5))
        print(f"{name} {args.model} {args.dtype} on {device} "
              f"({torch.get_num_threads()} threads), {len(weights)} tensors: first calls "
              f"{cold[0]:.2f}, {cold[1]:.2f} ms, then {warm:.2f} ms (median of 5)")


if __name__ == "__main__":
    main()
