"""Microbenchmark of the Triton sparse conv against its reference and dense cuDNN.

On CUDA, fp16, batch 2 (CFG), for SD1.5's conv shapes at 512 px: for each shape, output active
fraction (one centred square) and variant (bias only, or fused: residual add and output scale
on store), time (median, ms):
* the Triton kernel (``sparse_conv2d``, weight packed once beforehand), replayed in a CUDA graph
  as the runtime runs a step (GPU time: ``triton``), and called eagerly (``eager``: includes the
  host's argument checks and launches, which bound small edits without graphs);
* its torch reference, eagerly (``sparse_conv2d_reference``: mixes, convolves the whole grid in
  fp32; it synchronizes, so it cannot be graphed);
* dense cuDNN ``F.conv2d`` over the whole fp16 input (the conv alone, no epilogue),
  in a CUDA graph;
and the kernel's max abs error against the reference. Prints the autotune winners for a few
shapes, then the table. Needs torch and triton only (no diffusers); run from the repo root:

    PYTHONPATH=. python benchmarks/micro_sparse_conv.py [--json OUT]

``--layouts contiguous,channel-fast`` also times the inputs as the runtime now passes them
(compact ``x`` and ``residual`` channel-fast, ``recorded`` channels-last), and ``--split-k
auto,1,8,32`` forces split-K factors; ``--fractions`` and ``--variants`` narrow the table.
``--methods implicit,gather`` times both of ``sparse_conv2d``'s methods: the implicit GEMM
(one Triton launch) and the gather (the mixed taps as a dense matrix, cuBLAS, the epilogue).
``weight_floor_ms`` is the weight's bytes over 3 TB/s: the time a small edit cannot beat,
since every output tile reads the whole weight.

The kernel once also fused the group norm's affine and SiLU into its loads and a nearest
upsample into its indexing; the runtime used neither (normalising in a separate pass measured
faster, benchmarks/RESULTS.md), so both were removed, with their rows here.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from fisedit_compiler.config import CONV_METHODS
from fisedit_compiler.execution.kernels import sparse_conv
from fisedit_compiler.execution.kernels.sparse_conv import (
    pack_weight, sparse_conv2d, sparse_conv2d_reference)

# name: (c_in, c_out, source grid, stride, padding)
SHAPES = {
    "320->320 64x64": (320, 320, 64, 1, (1, 1, 1, 1)),
    "640->640 32x32": (640, 640, 32, 1, (1, 1, 1, 1)),
    "1280->1280 16x16": (1280, 1280, 16, 1, (1, 1, 1, 1)),
    "1280->1280 8x8": (1280, 1280, 8, 1, (1, 1, 1, 1)),
    "2560->1280 16x16": (2560, 1280, 16, 1, (1, 1, 1, 1)),
    "320 s2 64->32": (320, 320, 64, 2, (0, 1, 0, 1)),
}
FRACTIONS = (0.01, 0.05, 0.20, 1.0)
VARIANTS = ("bias", "fused")
BATCH = 2


def centred_square(size: int, fraction: float) -> torch.Tensor:
    """Flat indices (row-major) of a centred square covering ``fraction`` of a size x size grid."""
    side = min(size, max(1, round(math.sqrt(fraction) * size)))
    start = (size - side) // 2
    rows = torch.arange(start, start + side)
    return (rows[:, None] * size + rows[None, :]).flatten()


def make_case(shape, fraction, variant, device="cuda", dtype=torch.float16,
              layout="contiguous"):
    c_in, c_out, source, stride, padding = shape
    out = (source + padding[0] + padding[1] - 3) // stride + 1
    active = centred_square(source, fraction).to(device)
    in_position = torch.full((source * source,), -1, dtype=torch.int32, device=device)
    in_position[active] = torch.arange(active.numel(), dtype=torch.int32, device=device)
    out_pixels = centred_square(out, fraction).to(device=device, dtype=torch.int32)
    weight = torch.randn(c_out, c_in, 3, 3, device=device, dtype=dtype) / math.sqrt(9 * c_in)
    args = (torch.randn(BATCH, c_in, active.numel(), device=device, dtype=dtype),
            torch.randn(BATCH, c_in, source, source, device=device, dtype=dtype),
            in_position, out_pixels, (out, out), weight,
            torch.randn(c_out, device=device, dtype=dtype))
    kwargs = dict(stride=(stride, stride), padding=padding)
    if variant == "fused":
        kwargs.update(residual=torch.randn(BATCH, c_out, out_pixels.numel(), device=device,
                                           dtype=dtype),
                      out_scale=1.0 / 1.5)
    if layout == "channel-fast":
        channel_fast = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
        args = (channel_fast(args[0]), args[1].contiguous(memory_format=torch.channels_last),
                *args[2:])
        if "residual" in kwargs:
            kwargs["residual"] = channel_fast(kwargs["residual"])
    return args, kwargs


def dense_conv(args, kwargs):
    """The dense baseline: cuDNN over the whole input, as the dense U-Net runs it."""
    recorded, weight, bias = args[1], args[5], args[6]
    top, bottom, left, right = kwargs["padding"]
    if top == bottom and left == right:
        return lambda: F.conv2d(recorded, weight, bias, kwargs["stride"], (top, left))
    padded = F.pad(recorded, (left, right, top, bottom))
    return lambda: F.conv2d(padded, weight, bias, kwargs["stride"])


def measure(name, shape, fraction, variant, layout="contiguous", split_k=None,
            method="implicit") -> dict:
    """One table row: the timings, the kernel's error and its autotune winner."""
    from triton.testing import do_bench, do_bench_cudagraph

    args, kwargs = make_case(shape, fraction, variant, layout=layout)
    packed = pack_weight(args[5])

    def kernel():
        return sparse_conv2d(*args, **kwargs, packed_weight=packed, split_k=split_k,
                             method=method)

    def reference():
        return sparse_conv2d_reference(*args, **kwargs)

    # The first call autotunes, which must happen before a graph capture.
    error = (kernel().float() - reference().float()).abs().max().item()
    config = sparse_conv._sparse_conv2d_kernel.best_config if method == "implicit" else None
    triton_ms = do_bench_cudagraph(kernel, return_mode="median")
    c_in, c_out = shape[0], shape[1]
    p_out = args[3].numel()
    return dict(shape=name, variant=variant, fraction=fraction, layout=layout, method=method,
                split_k=split_k or "auto", p_out=p_out, triton_ms=triton_ms,
                weight_floor_ms=packed.numel() * packed.element_size() / 3e12 * 1e3,
                eager_ms=do_bench(kernel, return_mode="median"),
                reference_ms=do_bench(reference, return_mode="median"),
                dense_ms=do_bench_cudagraph(dense_conv(args, kwargs), return_mode="median"),
                tflops=2 * BATCH * p_out * c_out * c_in * 9 / triton_ms / 1e9,
                max_abs_error=error,
                config=config and dict(config.kwargs, num_warps=config.num_warps,
                                       num_stages=config.num_stages))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--layouts", default="contiguous")
    parser.add_argument("--split-k", default="auto")
    parser.add_argument("--methods", default="implicit")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("micro_sparse_conv needs a CUDA device")
    import triton

    rows = []
    splits = [None if k == "auto" else int(k) for k in args.split_k.split(",")]
    methods = args.methods.split(",")
    if not set(methods) <= set(CONV_METHODS):
        parser.error(f"--methods takes {', '.join(CONV_METHODS)}, got {args.methods}")
    # (split_k, method): split-K is the implicit kernel's; cuBLAS splits the gather's GEMM.
    launches = ([(split_k, "implicit") for split_k in splits] if "implicit" in methods else []) \
        + ([(None, "gather")] if "gather" in methods else [])
    for name, shape in SHAPES.items():
        for variant in args.variants.split(","):
            for fraction in [float(f) for f in args.fractions.split(",")]:
                for layout in args.layouts.split(","):
                    for split_k, method in launches:
                        row = measure(name, shape, fraction, variant, layout, split_k, method)
                        rows.append(row)
                        print(f"{name} {variant} {fraction:.0%} {layout} {method} split "
                              f"{row['split_k']}: "
                              f"triton {row['triton_ms']:.4f}, eager {row['eager_ms']:.4f}, "
                              f"dense {row['dense_ms']:.4f}, weight floor "
                              f"{row['weight_floor_ms']:.4f} ms", flush=True)

    print("\nautotune winners (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages):")
    for row in rows:
        if row["variant"] == "bias" and row["fraction"] in (0.05, 1.0) and row["config"]:
            c = row["config"]
            print(f"  {row['shape']:18s} {row['fraction']:>5.0%}: {c['BLOCK_M']}x{c['BLOCK_N']}"
                  f"x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}")

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, fp16, batch {BATCH}; median ms; triton and dense "
          "replayed in CUDA graphs")
    header = (f"{'shape':18s} {'variant':7s} {'method':8s} {'active':>6s} {'P_out':>5s} "
              f"{'triton':>8s} "
              f"{'eager':>8s} {'ref':>8s} {'dense':>8s} {'dense/tri':>9s} {'TFLOP/s':>8s} "
              f"{'max err':>8s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['shape']:18s} {row['variant']:7s} {row['method']:8s} "
              f"{row['fraction']:>6.0%} "
              f"{row['p_out']:>5d} "
              f"{row['triton_ms']:>8.4f} {row['eager_ms']:>8.4f} {row['reference_ms']:>8.3f} "
              f"{row['dense_ms']:>8.4f} "
              f"{row['dense_ms'] / row['triton_ms']:>9.2f} {row['tflops']:>8.1f} "
              f"{row['max_abs_error']:>8.1e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, dtype="float16", batch=BATCH, rows=rows),
                      handle, indent=1)


if __name__ == "__main__":
    main()
