"""Microbenchmark of issue 17's token-path levers: what grouping the attention projections and
hoisting the text K/V out of the step would save, per U-Net step, at a 5% edit (fp16, batch 2).

The profile of a 5% step (RESULTS.md session 6) spends 28% (SD1.5) and 47% (SDXL) of its
kernel time in cuBLAS GEMMs on few rows. Per transformer block the edit step runs the
self-attention's Q, K and V projections of the active tokens (three GEMMs on one input) and the
cross-attention's K and V projections of the 77 text tokens (two GEMMs on one input, the same
values at every step of an edit). Three ways, each timed as the whole model's sequence of those
projections (every transformer block at its level's active token count) replayed in a CUDA
graph (``triton.testing.do_bench_cudagraph``, median):

* ``separate``: today: 3 + 2 GEMMs per block;
* ``grouped``: one GEMM over the concatenated Q/K/V weights and one over K/V (``[3C, C]`` and
  ``[2C, C_text]``), their outputs split as views;
* ``grouped, text K/V hoisted``: the grouped Q/K/V GEMM only (text K/V computed once per
  prompt, outside the step).

    python benchmarks/micro_token_gemms.py [--area 0.05] [--json OUT]

Needs CUDA and torch (no diffusers, no Triton kernels of the package).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

BATCH, TEXT_TOKENS, DTYPE = 2, 77, torch.float16
# model -> (text width, [(latent side of the level, channels, transformer blocks at it)])
MODELS = {
    "sd15": (768, [(64, 320, 5), (32, 640, 5), (16, 1280, 5), (8, 1280, 1)]),
    "sdxl": (2048, [(64, 640, 10), (32, 1280, 60)]),
}


def blocks(model: str, area: float, device) -> list[dict]:
    """Random inputs and weights of every transformer block of ``model`` at edit ``area``."""
    text_width, levels = MODELS[model]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.05).to(device, DTYPE)

    out = []
    for side, channels, count in levels:
        tokens = BATCH * max(1, round(side * side * area))
        for _ in range(count):
            q, k, v = (rand(channels, channels) for _ in range(3))
            tk, tv = rand(channels, text_width), rand(channels, text_width)
            out.append({"x": rand(tokens, channels), "text": rand(BATCH * TEXT_TOKENS, text_width),
                        "q": q, "k": k, "v": v, "tk": tk, "tv": tv,
                        "qkv": torch.cat([q, k, v]), "tkv": torch.cat([tk, tv])})
    return out


def separate(model_blocks):
    for b in model_blocks:
        F.linear(b["x"], b["q"]), F.linear(b["x"], b["k"]), F.linear(b["x"], b["v"])
        F.linear(b["text"], b["tk"]), F.linear(b["text"], b["tv"])


def grouped(model_blocks):
    for b in model_blocks:
        F.linear(b["x"], b["qkv"]).chunk(3, -1)
        F.linear(b["text"], b["tkv"]).chunk(2, -1)


def grouped_hoisted(model_blocks):
    for b in model_blocks:
        F.linear(b["x"], b["qkv"]).chunk(3, -1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--area", type=float, default=0.05)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    rows = []
    for model in MODELS:
        model_blocks = blocks(model, args.area, device)
        row = {"model": model, "area": args.area, "blocks": len(model_blocks)}
        for name, fn in (("separate", separate), ("grouped", grouped),
                         ("grouped, text K/V hoisted", grouped_hoisted)):
            fn(model_blocks)
            row[f"{name}_ms"] = do_bench_cudagraph(lambda: fn(model_blocks), rep=50,
                                                   return_mode="median")
        rows.append(row)
        print(f"{model} at {args.area:.0%}, {row['blocks']} blocks: " + ", ".join(
            f"{name} {row[f'{name}_ms']:.3f} ms" for name in
            ("separate", "grouped", "grouped, text K/V hoisted")), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
