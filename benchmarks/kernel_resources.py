"""The group-norm kernel's compiled size for a GPU, without a GPU (CPU, seconds).

Why: where the device is short, what a kernel change does to its machine code can still be
read: registers per thread, local memory (spills) and SASS instruction, global-load and
barrier counts of ``kernels.group_norm._group_norm_kernel`` compiled by Triton's own compiler
for a target (fp16, incremental statistics, padded plan, every option on, 8 warps). Static
counts, not time: a kernel's loops count once.

    python benchmarks/kernel_resources.py [--arch 90]
    PYTHONPATH=.device/base python benchmarks/kernel_resources.py    # an earlier tree's
"""
import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)      # compile for the GPU, not the interpreter

import triton                                              # noqa: E402
from triton.backends.compiler import GPUTarget             # noqa: E402
from triton.compiler import ASTSource                      # noqa: E402

from fisedit_compiler.execution.kernels import group_norm  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (H100: 90)")
args = parser.parse_args()

kernel = group_norm._group_norm_kernel
pointers = {"x": "*fp16", "out": "*fp16", "weight": "*fp16", "bias": "*fp16", "add": "*fp16",
            "add_bias": "*fp16", "mean": "*fp32", "variance": "*fp32", "tile_sum": "*fp32",
            "tile_sum_sq": "*fp32", "active_tiles": "*i64", "active_counts": "*i32"}
# Every constexpr either tree's kernel takes (BLOCK_C / BLOCK_P: before session 29's rewrite,
# as it launched SD1.5's 10-channel groups).
constexprs = dict(INCREMENTAL=True, COUNTED=True, HAS_WEIGHT=True, HAS_BIAS=True, HAS_ADD=True,
                  HAS_ADD_BIAS=True, SILU=True, CHANNEL_FAST=True, BLOCK=4096, BLOCK_T=128,
                  BLOCK_C=16, BLOCK_P=256, PDL=True)
signature, values = {}, {}
for index, name in enumerate(kernel.arg_names):
    if name in constexprs:
        signature[name], values[(index,)] = "constexpr", constexprs[name]
    else:
        signature[name] = pointers.get(name, "fp32" if name == "eps" else "i32")
compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=values),
                          target=GPUTarget("cuda", args.arch, 32), options={"num_warps": 8})
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
    cubin.write(compiled.asm["cubin"])
    cubin.flush()
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin.name],
                           capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin.name],
                          capture_output=True, text=True, check=True).stdout
registers = re.search(r"REG:(\d+)", usage).group(1)
local = re.search(r"LOCAL:(\d+)", usage).group(1)
# Instruction lines, less the NOPs that pad the code to its alignment.
lines = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(\S+)", sass, re.MULTILINE)
instructions = sum(line != "NOP;" for line in lines)
print(f"{group_norm.__file__} for sm_{args.arch}, Triton {triton.__version__}: "
      f"{registers} registers, {local} bytes local, {instructions} instructions, "
      f"{sass.count('LDG')} LDG, {sass.count('BAR.SYNC')} barriers")
