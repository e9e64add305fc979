"""Microbenchmark of issue 17's next lever (RESULTS.md, "Session 16: issue 17's next lever"):
one persistent Triton kernel for a transformer block's token chain, with grid-wide barriers
between its dependent stages, against the per-op kernels the edit step runs today.

The chain is the part of every transformer block after its cross-attention, on the edit's
active tokens (rows), for every transformer block of the model at its level's token count
(fp16, batch 2, as ``micro_token_gemms.py``):

    h = attn @ Wo + bo + x                      (out projection with the residual)
    u = geglu(layer_norm(h) @ W1 + b1)          (GEGLU feed-forward, first half)
    y = u @ W2 + b2 + h                         (second half with the residual)

Three ways, each the whole model's chains replayed in one CUDA graph
(``triton.testing.do_bench_cudagraph``, median):

* ``torch``: plain torch ops (cuBLAS GEMMs with bias, layer_norm, gelu, adds): ~9 kernels;
* ``per-op``: what the edit step runs today: cuBLAS GEMMs and the package's fused Triton
  add + layer norm and GEGLU kernels (``execution/kernels/tokens.py``): 6 kernels;
* ``persistent``: one launch per chain; its programs (one per SM at most, all resident) walk
  the output tiles of each stage and meet at a grid-wide barrier (an atomic counter they spin
  on) before the next: stage 1 the out projection with its residual, stage 2 the layer norm as
  the first GEMM's prologue and GEGLU as its epilogue, stage 3 the second GEMM with its
  residual. Two barriers; the counters reset themselves at the kernel's end.

What it answers before anything is built into the engine: is one resident launch with two
barriers faster than six dependent launches, at the few rows of a 1-20% edit, and by how much
for a whole step (16 blocks for SD1.5, 70 for SDXL)? Each variant is checked against an fp32
torch reference of the same chain.

    python benchmarks/micro_persistent_block.py [--areas 0.01,0.05,0.2] [--json OUT]

Needs CUDA and Triton (no diffusers). Under ``TRITON_INTERPRET=1`` on the CPU, ``--check``
runs the persistent kernel with one program (its barriers pass at once) on a small chain and
compares it with the reference: the stages' arithmetic, not the barriers.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BATCH, DTYPE, EPS = 2, torch.float16, 1e-5
# model -> [(latent side of the level, channels, transformer blocks at it)]
MODELS = {
    "sd15": [(64, 320, 5), (32, 640, 5), (16, 1280, 5), (8, 1280, 1)],
    "sdxl": [(64, 640, 10), (32, 1280, 60)],
}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _grid_barrier(counter, expected):
    """Wait until ``expected`` programs have arrived at ``counter``. Every program's stores
    before the barrier are visible to every program after it: the CTA's threads synchronise,
    one atomic releases their writes, the spin acquires everyone's."""
    tl.debug_barrier()
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while arrived < expected:
        arrived = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _chain_kernel(attn, x, wo, bo, ln_w, ln_b, w1, b1, w2, b2, h, u, y, counters,
                  rows, width, hidden, eps,
                  BM: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, BN3: tl.constexpr,
                  BK: tl.constexpr):
    """The chain (module docstring) for ``rows`` x ``width`` tokens; weights [K, N] row-major
    (prepared once), ``hidden`` = 4 x width GEGLU outputs, ``w1`` [width, 2 x hidden] with
    the hidden half first. ``counters`` [3] int32, zero between launches."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    tiles_m = tl.cdiv(rows, BM)
    ks = tl.arange(0, BK)
    rm = tl.arange(0, BM)

    # Stage 1: h = attn @ wo + bo + x.
    n1 = BN1
    tiles = tiles_m * tl.cdiv(width, n1)
    for tile in range(pid, tiles, grid):
        r = (tile // tl.cdiv(width, n1)) * BM + rm
        c = (tile % tl.cdiv(width, n1)) * n1 + tl.arange(0, BN1)
        acc = tl.zeros((BM, BN1), dtype=tl.float32)
        for k in range(0, width, BK):
            a = tl.load(attn + r[:, None] * width + (k + ks)[None, :],
                        mask=(r[:, None] < rows) & ((k + ks)[None, :] < width), other=0.0)
            b = tl.load(wo + (k + ks)[:, None] * width + c[None, :],
                        mask=((k + ks)[:, None] < width) & (c[None, :] < width), other=0.0)
            acc = tl.dot(a, b, acc)
        out_mask = (r[:, None] < rows) & (c[None, :] < width)
        acc += tl.load(bo + c, mask=c < width, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(x + r[:, None] * width + c[None, :], mask=out_mask, other=0.0).to(
            tl.float32)
        tl.store(h + r[:, None] * width + c[None, :], acc.to(h.dtype.element_ty), mask=out_mask)
    _grid_barrier(counters, grid)

    # Stage 2: u = geglu(layer_norm(h) @ w1 + b1); each tile normalises its rows itself.
    tiles_n2 = tl.cdiv(hidden, BN2)
    for tile in range(pid, tiles_m * tiles_n2, grid):
        r = (tile // tiles_n2) * BM + rm
        c = (tile % tiles_n2) * BN2 + tl.arange(0, BN2)
        total = tl.zeros((BM,), dtype=tl.float32)
        for k in range(0, width, BK):
            v = tl.load(h + r[:, None] * width + (k + ks)[None, :],
                        mask=(r[:, None] < rows) & ((k + ks)[None, :] < width), other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            total += tl.sum(v, axis=1)
        mean = total / width
        squares = tl.zeros((BM,), dtype=tl.float32)
        for k in range(0, width, BK):
            in_k = (k + ks)[None, :] < width
            v = tl.load(h + r[:, None] * width + (k + ks)[None, :],
                        mask=(r[:, None] < rows) & in_k, other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            centred = tl.where(in_k, v - mean[:, None], 0.0)
            squares += tl.sum(centred * centred, axis=1)
        rstd = 1.0 / tl.sqrt(squares / width + eps)
        acc_h = tl.zeros((BM, BN2), dtype=tl.float32)
        acc_g = tl.zeros((BM, BN2), dtype=tl.float32)
        for k in range(0, width, BK):
            in_k = (k + ks) < width
            v = tl.load(h + r[:, None] * width + (k + ks)[None, :],
                        mask=(r[:, None] < rows) & in_k[None, :], other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            gamma = tl.load(ln_w + k + ks, mask=in_k, other=0.0).to(tl.float32)
            beta = tl.load(ln_b + k + ks, mask=in_k, other=0.0).to(tl.float32)
            # Rounded to the activations' dtype, as the unfused layer_norm's output is.
            a = ((v - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]).to(
                w1.dtype.element_ty)
            w_mask = in_k[:, None] & (c[None, :] < hidden)
            bh = tl.load(w1 + (k + ks)[:, None] * (2 * hidden) + c[None, :], mask=w_mask,
                         other=0.0)
            bg = tl.load(w1 + (k + ks)[:, None] * (2 * hidden) + hidden + c[None, :],
                         mask=w_mask, other=0.0)
            acc_h = tl.dot(a, bh, acc_h)
            acc_g = tl.dot(a, bg, acc_g)
        in_c = c < hidden
        acc_h += tl.load(b1 + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b1 + hidden + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
        # The GEMM's outputs rounded to fp16 before GEGLU, as the unfused ops round them.
        acc_h = acc_h.to(u.dtype.element_ty).to(tl.float32)
        acc_g = acc_g.to(u.dtype.element_ty).to(tl.float32)
        tl.store(u + r[:, None] * hidden + c[None, :], (acc_h * _gelu(acc_g)).to(
            u.dtype.element_ty), mask=(r[:, None] < rows) & in_c[None, :])
    _grid_barrier(counters + 1, grid)

    # Stage 3: y = u @ w2 + b2 + h.
    tiles_n3 = tl.cdiv(width, BN3)
    for tile in range(pid, tiles_m * tiles_n3, grid):
        r = (tile // tiles_n3) * BM + rm
        c = (tile % tiles_n3) * BN3 + tl.arange(0, BN3)
        acc = tl.zeros((BM, BN3), dtype=tl.float32)
        for k in range(0, hidden, BK):
            a = tl.load(u + r[:, None] * hidden + (k + ks)[None, :],
                        mask=(r[:, None] < rows) & ((k + ks)[None, :] < hidden), other=0.0,
                        cache_modifier=".cg")
            b = tl.load(w2 + (k + ks)[:, None] * width + c[None, :],
                        mask=((k + ks)[:, None] < hidden) & (c[None, :] < width), other=0.0)
            acc = tl.dot(a, b, acc)
        out_mask = (r[:, None] < rows) & (c[None, :] < width)
        acc += tl.load(b2 + c, mask=c < width, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(h + r[:, None] * width + c[None, :], mask=out_mask, other=0.0,
                       cache_modifier=".cg").to(tl.float32)
        tl.store(y + r[:, None] * width + c[None, :], acc.to(y.dtype.element_ty), mask=out_mask)

    # The last program out resets the counters for the next launch (every program has passed
    # both barriers once it counts itself out, so none reads them any more).
    tl.debug_barrier()
    if tl.atomic_add(counters + 2, 1, sem="acq_rel", scope="gpu") == grid - 1:
        tl.atomic_xchg(counters, 0)
        tl.atomic_xchg(counters + 1, 0)
        tl.atomic_xchg(counters + 2, 0)


def _tile_n(tiles_m: int, n: int, grid: int) -> int:
    """The widest output tile (128 down to 16 columns) that still gives every program a tile:
    few rows mean few row tiles, so the columns must be split finer to fill the GPU."""
    for bn in (128, 64, 32):
        if tiles_m * triton.cdiv(n, bn) >= grid:
            return bn
    return 16


def chain_block(rows: int, width: int, device, gen) -> dict:
    """Random activations and weights of one block's chain (nn.Linear layouts [N, K] and the
    persistent kernel's prepared [K, N] copies)."""
    def rand(*shape, scale=0.05):
        return (torch.randn(*shape, generator=gen) * scale).to(device, DTYPE)

    hidden = 4 * width
    b = {"attn": rand(rows, width, scale=1.0), "x": rand(rows, width, scale=1.0),
         "wo": rand(width, width), "bo": rand(width), "ln_w": 1 + rand(width), "ln_b": rand(width),
         "w1": rand(2 * hidden, width), "b1": rand(2 * hidden), "w2": rand(width, hidden),
         "b2": rand(width)}
    b.update(wo_t=b["wo"].t().contiguous(), w1_t=b["w1"].t().contiguous(),
             w2_t=b["w2"].t().contiguous(), h=torch.empty_like(b["x"]),
             u=torch.empty(rows, hidden, device=device, dtype=DTYPE), y=torch.empty_like(b["x"]),
             counters=torch.zeros(3, device=device, dtype=torch.int32))
    return b


def chain_reference(b: dict) -> torch.Tensor:
    """The chain in fp32 (the specification every variant is checked against)."""
    f = {k: v.float() for k, v in b.items() if k in ("attn", "x", "wo", "bo", "ln_w", "ln_b",
                                                       "w1", "b1", "w2", "b2")}
    h = F.linear(f["attn"], f["wo"], f["bo"]) + f["x"]
    hidden, gate = F.linear(F.layer_norm(h, h.shape[-1:], f["ln_w"], f["ln_b"], EPS), f["w1"],
                            f["b1"]).chunk(2, -1)
    return F.linear(hidden * F.gelu(gate), f["w2"], f["b2"]) + h


def chain_torch(b: dict) -> torch.Tensor:
    h = F.linear(b["attn"], b["wo"], b["bo"]) + b["x"]
    hidden, gate = F.linear(F.layer_norm(h, h.shape[-1:], b["ln_w"], b["ln_b"], EPS), b["w1"],
                            b["b1"]).chunk(2, -1)
    return F.linear(hidden * F.gelu(gate), b["w2"], b["b2"]) + h


def chain_per_op(b: dict) -> torch.Tensor:
    from fisedit_compiler.execution.kernels.tokens import add_layer_norm, geglu

    h, normed = add_layer_norm(F.linear(b["attn"], b["wo"], b["bo"]), b["x"], b["ln_w"],
                               b["ln_b"], EPS)
    return torch.addmm(b["b2"], geglu(F.linear(normed, b["w1"], b["b1"])), b["w2"].t()).add_(h)


def chain_persistent(b: dict, grid: int, tiles: dict | None = None) -> torch.Tensor:
    rows, width = b["x"].shape
    hidden = 4 * width
    bm = 64 if rows >= 512 else 32 if rows >= 64 else 16
    tiles_m = triton.cdiv(rows, bm)
    tiles = tiles or {"BN1": _tile_n(tiles_m, width, grid), "BN2": _tile_n(tiles_m, hidden, grid),
                      "BN3": _tile_n(tiles_m, width, grid)}
    _chain_kernel[(grid,)](b["attn"], b["x"], b["wo_t"], b["bo"], b["ln_w"], b["ln_b"],
                           b["w1_t"], b["b1"], b["w2_t"], b["b2"], b["h"], b["u"], b["y"],
                           b["counters"], rows, width, hidden, EPS, BM=bm, BK=64, num_warps=4,
                           **tiles)
    return b["y"]


def model_blocks(model: str, area: float, device) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [chain_block(BATCH * max(1, round(side * side * area)), channels, device, gen)
            for side, channels, count in MODELS[model] for _ in range(count)]


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest magnitude."""
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def check_on_cpu() -> int:
    """The persistent kernel's arithmetic under the interpreter, one program (no waiting)."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for rows, width in ((5, 32), (40, 64)):
        b = chain_block(rows, width, torch.device("cpu"), gen)
        worst = max(worst, max_error(chain_persistent(b, grid=1), chain_reference(b)))
        assert torch.equal(b["counters"], torch.zeros_like(b["counters"])), "counters not reset"
    print(f"persistent chain under the interpreter: max relative error {worst:.2e}")
    return 0 if worst < 2e-2 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--areas", default="0.01,0.05,0.2")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--check", action="store_true",
                        help="check the kernel's arithmetic on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.check:
        return check_on_cpu()
    from triton.testing import do_bench_cudagraph

    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    variants = {"torch": chain_torch, "per-op": chain_per_op,
                "persistent": lambda b: chain_persistent(b, sms)}
    rows = []
    for model in MODELS:
        for area in (float(a) for a in args.areas.split(",")):
            blocks = model_blocks(model, area, device)
            row = {"model": model, "area": area, "blocks": len(blocks),
                   "tokens": sorted({b["x"].shape[0] for b in blocks})}
            for name, fn in variants.items():
                row[f"{name}_error"] = max(max_error(fn(b), chain_reference(b)) for b in blocks)
                torch.cuda.synchronize()
                row[f"{name}_ms"] = do_bench_cudagraph(
                    lambda: [fn(b) for b in blocks], rep=50, return_mode="median")
            rows.append(row)
            print(f"{model} {area:.0%} ({row['blocks']} blocks, rows {row['tokens']}): " +
                  ", ".join(f"{n} {row[f'{n}_ms']:.3f} ms (err {row[f'{n}_error']:.1e})"
                            for n in variants), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "sms": sms, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
