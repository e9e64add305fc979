"""Host time per step of an EditSession edit outside the engine's step.

Why: in the e2e run (RESULTS.md session 25) the host spent ~2.4 ms per sparse step against
~3.4 ms of GPU time, so once the GPU step is below ~2.4 ms an edit waits on the host, not the
GPU. This times an edit whose engine step is replaced by its recorded answer (a dict lookup), so
what remains is the pipeline's loop (scheduler, guidance), EditSession's routing and blending
and the engine-free bookkeeping, and prints a profile of it. Runs on any device:

    python benchmarks/host_per_step.py [--model sd15-tiny] [--device cpu]
"""
import argparse
import cProfile
import io
import pstats
import warnings

import torch

import fisedit_compiler as fc
from fisedit_compiler import bench, zoo

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="sd15-tiny")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()
warnings.simplefilter("ignore")
torch.set_num_threads(1)
pipe = zoo.pipeline(args.model).to(args.device)
session = fc.EditSession(pipe)
STEPS = 50
session.generate("a red circle", seed=0, num_inference_steps=STEPS, output_type="latent")
mask = bench.blob_mask(tuple(session.original.latents[-1].shape[-2:]), 0.05)
session.edit("a blue circle", mask=mask, output_type="latent")   # warm
engine = session.engine
real_edit = engine.edit
outputs = {}


def stub(cache, step, plan=None, **inputs):
    if step not in outputs:
        outputs[step] = real_edit(cache, step, plan=plan, **inputs)
    return outputs[step]


engine.edit = stub
session.edit("a blue circle", mask=mask, output_type="latent")   # fills outputs
# The pipeline call (sparse_s, as in the e2e run) less its first sparse step (timed apart,
# synchronised around it), over the steps after it; the prompt's encoding stays in.
per_step = []
for _ in range(3):
    timings = session.edit("a blue circle", mask=mask, output_type="latent").report["timings_s"]
    per_step.append((timings["sparse_s"] - timings["first_sparse_step_s"]) / (STEPS - 1))
print(f"{args.model} on {args.device}, {STEPS} steps, engine step stubbed: "
      f"{min(per_step) * 1e3:.2f} ms of host time per step after the first")
profile = cProfile.Profile()
profile.enable()
session.edit("a blue circle", mask=mask, output_type="latent")
profile.disable()
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
print(text.getvalue())
