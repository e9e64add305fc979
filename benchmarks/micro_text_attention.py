"""The folded cross-attention kernel (``kernels/text_attention.py``) against the path it
replaces (query GEMM, SDPA, the copy of its heads into rows), at SD1.5's cross-attention shapes
of a 5% edit (rows per level, batch 2, 8 heads, CLIP's 77 tokens), with the kernel's block
shapes swept: which launch configuration the kernel should use.

    python benchmarks/micro_text_attention.py        (CUDA only)
"""
import math

import torch
import torch.nn.functional as F

from fisedit_compiler.execution.kernels import launch_options
from fisedit_compiler.execution.kernels.text_attention import (
    _text_attention_kernel, fold_keys_reference, padded_block, row_block)

# (rows, channels, head dim, cross-attentions of this shape per SD1.5 step) at a 5% blob.
SHAPES = [(400, 320, 40, 5), (100, 640, 80, 5), (25, 1280, 160, 5), (9, 1280, 160, 1)]
# (BLOCK_M, BLOCK_C, warps, stages); the shipped kernel uses BLOCK_C 64, 4 warps, 3 stages.
CONFIGS = [(m, c, w, 3) for m in (16, 32, 64) for c in (64, 128) for w in (4, 8)]


def time_ms(fn, calls=20, replays=10):
    """GPU time per call, replayed from a CUDA graph of ``calls`` calls (as an edit step runs
    them: host launch costs left out)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (calls * replays)


def main():
    torch.manual_seed(0)
    total_unfolded, total_best, total_default = 0.0, 0.0, 0.0
    for rows, channels, head_dim, count in SHAPES:
        heads = channels // head_dim
        x = torch.randn(2, rows, channels, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(2, 77, channels, device="cuda", dtype=torch.float16)
                .reshape(2, 77, heads, head_dim).permute(0, 2, 1, 3) for _ in range(2))
        weight = torch.randn(channels, channels, device="cuda", dtype=torch.float16) / channels ** 0.5
        keys = fold_keys_reference(k, weight, None)

        def unfolded():
            q = F.linear(x, weight).reshape(2, rows, heads, head_dim).permute(0, 2, 1, 3)
            return F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).reshape(2, rows, channels)

        base = time_ms(unfolded)
        results = []
        for block_m, block_c, warps, stages in CONFIGS:
            out = torch.empty((2, rows, heads, head_dim), dtype=x.dtype, device="cuda").permute(0, 2, 1, 3)

            def folded():
                _text_attention_kernel[(math.ceil(rows / block_m), 2 * heads)](
                    x, keys, v, out, rows, 77, heads, *x.stride(), *keys.stride(), *v.stride(),
                    *out.stride(), CHANNELS=channels, HEAD_DIM=head_dim, PRECISION="tf32",
                    BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_T=128,
                    BLOCK_D=padded_block(head_dim), num_warps=warps,
                    num_stages=stages, **launch_options(x))
            try:
                results.append((time_ms(folded), block_m, block_c, warps, stages))
            except Exception as error:           # out of shared memory or registers
                results.append((float("inf"), block_m, block_c, warps, stages))
                print(f"  config {block_m, block_c, warps, stages}: {type(error).__name__}")
        results.sort()
        default = next(r[0] for r in results if r[1:] == (row_block(rows, 77, head_dim), 64, 4, 3))
        print(f"rows {rows:4d} C {channels:4d} D {head_dim:3d}: unfolded {base * 1e3:6.1f} us, "
              f"kernel as shipped {default * 1e3:6.1f} us, best {results[0][0] * 1e3:6.1f} us "
              f"(BLOCK_M, BLOCK_C, warps, stages = {results[0][1:]}); next {results[1][1:]} "
              f"{results[1][0] * 1e3:.1f} us")
        total_unfolded += count * base
        total_best += count * results[0][0]
        total_default += count * default
    print(f"per SD1.5 step (16 cross-attentions, CUDA graph replay): unfolded {total_unfolded:.3f} ms, "
          f"kernel as shipped {total_default:.3f} ms, best configs {total_best:.3f} ms")


if __name__ == "__main__":
    main()
