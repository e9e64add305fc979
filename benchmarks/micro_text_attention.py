"""The folded cross-attention kernel (``kernels/text_attention.py``) against the path it
replaces (query GEMM, SDPA, the copy of its heads into rows), at a model's cross-attention
shapes of a blob edit (rows per level, batch 2, CLIP's 77 tokens), with the kernel's block
shapes swept: which launch configuration the kernel should use, and where folding pays at all.

Each timed call reads tensors of its own (a ring of copies larger than the L2 cache), as a
step does: every cross-attention reads its own query weight, or folded keys, from DRAM.

    python benchmarks/micro_text_attention.py [--model sd15|sdxl] [--area 0.05]   (CUDA only)
"""
import argparse
import math

import torch
import torch.nn.functional as F

from fisedit_compiler.execution.kernels import launch_options
from fisedit_compiler.execution.kernels.text_attention import (
    _text_attention_kernel, device_limits, fold_keys_reference, launch_shape, padded_block)

# Per model: (level side, channels, head dim, cross-attentions per step) of each level with
# cross-attention.
MODELS = {
    "sd15": [(64, 320, 40, 5), (32, 640, 80, 5), (16, 1280, 160, 5), (8, 1280, 160, 1)],
    "sdxl": [(64, 640, 64, 10), (32, 1280, 64, 60)],
}
# (BLOCK_M, BLOCK_C, warps, stages); the shipped kernel's pick (``launch_shape``) is among them.
CONFIGS = [(m, c, w, 3) for m in (16, 32, 64, 128) for c in (64, 128) for w in (4, 8)]
TOKENS = 77
# Bytes each ring of copies must exceed so that no call finds its inputs in L2 (H100: 50 MB,
# H200: 60 MB).
RING_BYTES = 256 * 2 ** 20


def time_ms(calls, replays=10):
    """GPU time per call of the functions ``calls``, all of them replayed from one CUDA graph
    (as an edit step runs them: host launch costs left out)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls[:3]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (len(calls) * replays)


def operands(rows, channels, head_dim):
    """One cross-attention's tensors: rows, text keys and values (heads), the query weight
    and the folded keys."""
    heads = channels // head_dim
    x = torch.randn(2, rows, channels, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(2, TOKENS, channels, device="cuda", dtype=torch.float16)
            .reshape(2, TOKENS, heads, head_dim).permute(0, 2, 1, 3) for _ in range(2))
    weight = (torch.randn(channels, channels, device="cuda", dtype=torch.float16)
              / channels ** 0.5)
    return x, k, v, weight, fold_keys_reference(k, weight, None)


def unfolded_call(x, k, v, weight, keys):
    batch, rows, channels = x.shape
    heads, head_dim = k.shape[1], k.shape[3]

    def call():
        q = F.linear(x, weight).reshape(batch, rows, heads, head_dim).permute(0, 2, 1, 3)
        return (F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3)
                .reshape(batch, rows, channels))
    return call


def folded_call(config, x, k, v, weight, keys):
    block_m, block_c, warps, stages = config
    batch, rows, channels = x.shape
    heads, head_dim = k.shape[1], k.shape[3]
    out = torch.empty((batch, rows, heads, head_dim), dtype=x.dtype,
                      device="cuda").permute(0, 2, 1, 3)

    def call():
        _text_attention_kernel[(math.ceil(rows / block_m), batch * heads)](
            x, keys, v, out, rows, TOKENS, heads, *x.stride(), *keys.stride(), *v.stride(),
            *out.stride(), CHANNELS=channels, HEAD_DIM=head_dim, PRECISION="tf32",
            BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_T=padded_block(TOKENS),
            BLOCK_D=padded_block(head_dim), num_warps=warps, num_stages=stages,
            **launch_options(x))
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd15")
    parser.add_argument("--area", type=float, default=0.05,
                        help="the active share of each level (the plan's, tiles included)")
    args = parser.parse_args()
    torch.manual_seed(0)
    total_unfolded, total_best, total_default = 0.0, 0.0, 0.0
    for side, channels, head_dim, count in MODELS[args.model]:
        rows = max(1, round(args.area * side * side))
        one = operands(rows, channels, head_dim)
        set_bytes = sum(t.numel() * t.element_size() for t in one)
        ring = [one] + [operands(rows, channels, head_dim)
                        for _ in range(min(63, math.ceil(RING_BYTES / set_bytes)))]
        base = time_ms([unfolded_call(*tensors) for tensors in ring])
        results = []
        for config in CONFIGS:
            try:
                results.append((time_ms([folded_call(config, *tensors) for tensors in ring]),
                                *config))
            except Exception as error:           # out of shared memory or registers
                results.append((float("inf"), *config))
                print(f"  config {config}: {type(error).__name__}")
        results.sort()
        shipped = launch_shape(rows, 2 * (channels // head_dim), channels, TOKENS, head_dim, 2,
                               *device_limits(torch.device("cuda", 0)))
        default = next(r[0] for r in results if r[1:] == (*shipped, 3))
        print(f"rows {rows:4d} C {channels:4d} D {head_dim:3d} x{count:2d}: unfolded "
              f"{base * 1e3:6.1f} us, kernel as shipped {shipped} {default * 1e3:6.1f} us, best "
              f"{results[0][0] * 1e3:6.1f} us (BLOCK_M, BLOCK_C, warps, stages = "
              f"{results[0][1:]}); next {results[1][1:]} {results[1][0] * 1e3:.1f} us")
        total_unfolded += count * base
        total_best += count * results[0][0]
        total_default += count * default
    print(f"per {args.model} step at {args.area:.0%} (batch 2, CUDA graph replay, inputs from "
          f"DRAM): unfolded {total_unfolded:.3f} ms, kernel as shipped {total_default:.3f} ms, "
          f"best configs {total_best:.3f} ms")


if __name__ == "__main__":
    main()
