"""Microbenchmark of the attention, group-norm and token kernels at SD1.5 sizes (fp16, batch 2).

Each row times the Triton kernel against the torch path the runtime would otherwise take on the
same compact inputs, and where it applies the dense torch op over the whole level, two ways:

* GPU time: replays of a CUDA graph of the call (triton.testing.do_bench_cudagraph, median),
  which is what a captured sparse step pays (docs/design.md, "Kernels");
* eager time: wall clock per uncaptured call, Python and kernel launches included.

Errors are max |result - reference| against the module's ``*_reference`` (fp32 math):

* attention, self-attention of a level with a fraction of its queries active: Triton mixed-K/V
  attention vs scatter into a clone of the recorded K/V + F.scaled_dot_product_attention (what
  ``sparse_ops.sparse_attention`` does) vs dense SDPA over every query;
* group norm + SiLU of a level with a fraction of its tiles active (incremental statistics),
  on the channel-fast compact tensor the runtime passes: the one-launch Triton kernel vs the
  torch reference vs dense F.group_norm + F.silu;
* add_layer_norm and GEGLU on the compact tokens: Triton vs the unfused torch ops.

    python benchmarks/micro_attention_norm.py [--ops attention,group_norm,tokens] [--json OUT]

Needs CUDA, torch and triton (no diffusers).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench_cudagraph

from fisedit_compiler.execution.kernels import attention as ka
from fisedit_compiler.execution.kernels import group_norm as kg
from fisedit_compiler.execution.kernels import tokens as kt
from fisedit_compiler.execution.sparse_ops import group_norm_stats

BATCH = 2
DTYPE = torch.float16
FRACTIONS = (0.01, 0.05, 0.2, 1.0)
ATTENTION_LEVELS = ((64, 8, 40), (32, 8, 80), (16, 8, 160))       # side, heads, head dim
NORM_LEVELS = ((320, 64, 8), (640, 32, 4), (1280, 16, 2), (2560, 8, 1))  # channels, side, tile
TOKEN_LEVELS = ((64, 320), (32, 640), (16, 1280))                   # side, channels
TOKEN_FRACTIONS = (0.05, 1.0)
GROUPS, EPS = 32, 1e-5


def timings(prefix, fn, calls=50) -> dict:
    """``{prefix}_ms``: GPU time per call from CUDA-graph replays; ``{prefix}_eager_ms``: wall
    clock per eager call. Call ``fn`` once before, so autotuning stays out of both."""
    gpu = do_bench_cudagraph(fn, rep=20, return_mode="median")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return {f"{prefix}_ms": gpu, f"{prefix}_eager_ms": (time.perf_counter() - start) * 1e3 / calls}


def max_error(actual, expected) -> float:
    return (actual.float() - expected.float()).abs().max().item()


def randn(*shape):
    return torch.randn(*shape, dtype=DTYPE, device="cuda")


def heads_view(length, heads, dim):
    """[B, H, L, D] as attention processors make it: a transposed view of [B, L, H, D]."""
    return randn(BATCH, length, heads, dim).transpose(1, 2)


def centred_square(side, fraction):
    """Row-major pixel indices of a centred square covering ``fraction`` of a side x side level."""
    edge = min(side, max(1, round(math.sqrt(fraction * side * side))))
    start = (side - edge) // 2
    rows = torch.arange(start, start + edge, device="cuda")
    return (rows[:, None] * side + rows[None, :]).flatten()


def bench_attention():
    rows = []
    for side, heads, dim in ATTENTION_LEVELS:
        count = side * side
        q_all, k_all, v_all = (heads_view(count, heads, dim) for _ in range(3))
        k_recorded, v_recorded = heads_view(count, heads, dim), heads_view(count, heads, dim)
        dense = timings("dense", lambda: F.scaled_dot_product_attention(q_all, k_all, v_all))
        for fraction in FRACTIONS:
            pixels = centred_square(side, fraction)
            q, k, v = (t[:, :, pixels] for t in (q_all, k_all, v_all))
            position = torch.full((count,), -1, dtype=torch.int64, device="cuda")
            position[pixels] = torch.arange(pixels.numel(), device="cuda")
            args = (q, k, v, None, k_recorded, v_recorded, position)

            def scatter_sdpa():
                keys = k_recorded.clone().index_copy_(2, pixels, k)
                values = v_recorded.clone().index_copy_(2, pixels, v)
                return F.scaled_dot_product_attention(q, keys, values)

            expected = ka.attention_reference(*args)
            rows.append(dict(
                op="attention", shape=f"{side}x{side} {heads}x{dim}", fraction=fraction,
                active=pixels.numel(), error=max_error(ka.attention(*args), expected),
                torch_error=max_error(scatter_sdpa(), expected),
                **timings("triton", lambda: ka.attention(*args)),
                **timings("torch", scatter_sdpa), **dense))
    return rows


def bench_group_norm():
    rows = []
    for channels, side, tile in NORM_LEVELS:
        recorded = randn(BATCH, channels, side, side)
        stats = group_norm_stats(recorded, GROUPS, tile, (side, side))
        weight, bias = randn(channels), randn(channels)
        count = channels // GROUPS * side * side
        full = randn(BATCH, channels, side * side)
        dense = timings("dense", lambda: F.silu(F.group_norm(full, GROUPS, weight, bias, EPS)))
        tiles = stats["tile_sum"].shape[-1]
        for fraction in FRACTIONS:
            n_active = max(1, round(fraction * tiles))
            active_tiles = torch.randperm(tiles, device="cuda")[:n_active].sort().values
            x = randn(BATCH, n_active * tile * tile, channels).transpose(1, 2)
            args = (x, stats, active_tiles, count, GROUPS, weight, bias, EPS, "incremental")

            def fused():
                return kg.group_norm(*args, silu=True)

            def reference():
                return kg.group_norm_reference(*args, silu=True)

            rows.append(dict(
                op="group_norm+silu", shape=f"{channels}x{side}x{side} t{tile}",
                fraction=fraction, active=x.shape[-1], error=max_error(fused(), reference()),
                **timings("triton", fused), **timings("torch", reference), **dense))
    return rows


def bench_tokens():
    rows = []
    for side, channels in TOKEN_LEVELS:
        for fraction in TOKEN_FRACTIONS:
            length = max(1, round(fraction * side * side))
            x, residual = randn(BATCH, length, channels), randn(BATCH, length, channels)
            weight, bias = randn(channels), randn(channels)
            args = (x, residual, weight, bias, EPS)
            fused, expected = kt.add_layer_norm(*args), kt.add_layer_norm_reference(*args)
            rows.append(dict(
                op="add_layer_norm", shape=f"{length}x{channels}", fraction=fraction,
                active=length, error=max(max_error(a, b) for a, b in zip(fused, expected)),
                **timings("triton", lambda: kt.add_layer_norm(*args)),
                **timings("torch", lambda: kt.add_layer_norm_reference(*args))))
            gated = randn(BATCH, length, 8 * channels)
            rows.append(dict(
                op="geglu", shape=f"{length}x{8 * channels}", fraction=fraction, active=length,
                error=max_error(kt.geglu(gated), kt.geglu_reference(gated)),
                **timings("triton", lambda: kt.geglu(gated)),
                **timings("torch", lambda: kt.geglu_reference(gated))))
    return rows


BENCHES = {"attention": bench_attention, "group_norm": bench_group_norm, "tokens": bench_tokens}


def print_table(rows):
    """GPU times (graph replays) with Triton's speedups, then eager wall clock per call."""
    columns = [("triton_ms", "triton"), ("torch_ms", "torch"), ("dense_ms", "dense"),
               ("torch/triton", "x torch"), ("dense/triton", "x dense"),
               ("triton_eager_ms", "tri eager"), ("torch_eager_ms", "tor eager"),
               ("error", "max err")]
    header = f"{'op':<16}{'shape':<20}{'frac':>5}{'active':>7}" + "".join(
        f"{title:>10}" for _, title in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = []
        for key, _ in columns:
            if "/" in key:
                top, bottom = key.split("/")
                value = row.get(f"{top}_ms", math.nan) / row[f"{bottom}_ms"]
                cells.append(f"{value:>10.2f}")
            elif key == "error":
                cells.append(f"{row[key]:>10.1e}")
            else:
                cells.append(f"{row.get(key, math.nan):>10.4f}")
        print(f"{row['op']:<16}{row['shape']:<20}{row['fraction']:>5.0%}{row['active']:>7}"
              + "".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows and the environment to this file")
    parser.add_argument("--ops", default=",".join(BENCHES),
                        help=f"which ops to time, comma-separated (default: all of {list(BENCHES)})")
    args = parser.parse_args()
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(BENCHES))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(BENCHES)}")
    if not torch.cuda.is_available():
        raise SystemExit("micro_attention_norm needs a CUDA device")
    torch.manual_seed(0)
    with torch.no_grad():
        rows = [row for op in ops for row in BENCHES[op]()]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "dtype": str(DTYPE), "batch": BATCH,
                       "rows": rows}, handle, indent=1)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, {DTYPE}, batch {BATCH}. Times in ms; triton/torch/dense: GPU "
          f"time (CUDA-graph replay); x torch / x dense: Triton's GPU-time speedup; eager: wall "
          f"clock per uncaptured call")
    print_table(rows)


if __name__ == "__main__":
    main()
