"""The ``edit`` and ``demo`` subcommands (registered by cli.py, like its own ``add_*`` functions).

Each ``add_*_command(subparsers)`` adds a parser and sets ``run`` to a handler
``(args) -> int``; a FiseditError raised by the handler is reported by cli.main.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import FiseditError
from ..runtime.plan import load_mask_png, mask_from_box

DEMO_PROMPT, DEMO_EDIT = "a red circle on a white table", "a blue circle on a white table"
# Random weights give latents without spatial structure, so the automatic mask comes out
# empty; the random-weight demo edits this box instead, to show a real sparse edit.
DEMO_BOX = "0.4,0.4,0.6,0.6"


def add_edit_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit", help="generate an image with a saved pipeline, then edit it sparsely",
        description="Generate --prompt densely with the pipeline saved in --pipeline, edit it "
                    "towards --edit (automatic mask from --probe-steps dense probe steps, or "
                    "--mask), and write original.png, edit.png, mask.png, overlay.png and "
                    "report.json (dense regeneration time vs edit time, MACs, mask area).")
    parser.add_argument("--pipeline", metavar="DIR", required=True,
                        help="a folder holding a StableDiffusion(XL)Pipeline saved with "
                             "save_pretrained")
    parser.add_argument("--prompt", required=True, help="the original prompt")
    parser.add_argument("--edit", required=True, help="the edited prompt")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder")
    _add_common(parser, steps=50, probe_steps=10, size=None)
    parser.set_defaults(run=run_edit)


def add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="generate and edit with an offline zoo pipeline (random weights)",
        description="Build an offline zoo pipeline (random weights, so images look like "
                    "noise), generate, edit and write the images and report.json.")
    parser.add_argument("--model", default=None,
                        help="zoo pipeline name (default: sd15 with CUDA, else sd15-tiny)")
    parser.add_argument("--out", metavar="DIR", default="fisedit-demo",
                        help="output folder (default: fisedit-demo)")
    parser.add_argument("--prompt", default=DEMO_PROMPT, help="the original prompt")
    parser.add_argument("--edit", default=DEMO_EDIT, help="the edited prompt")
    _add_common(parser, steps=8, probe_steps=3, size=128)
    parser.set_defaults(run=run_demo)


def _add_common(parser, steps: int, probe_steps: int, size: int | None) -> None:
    parser.add_argument("--mask", metavar="PNG",
                        help="a user mask (white = edit), at image or latent resolution")
    parser.add_argument("--mask-box", metavar="x0,y0,x1,y1",
                        help="a user mask as a box in fractions of the width and height")
    parser.add_argument("--mask-mode", choices=("replace", "intersect"), default="replace",
                        help="a user mask replaces the automatic one or intersects it")
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"denoising steps (default: {steps})")
    parser.add_argument("--probe-steps", type=int, default=probe_steps,
                        help=f"dense probe steps before the sparse ones (default: {probe_steps})")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--guidance-scale", type=float, default=7.5,
                        help="classifier-free guidance scale (default: 7.5)")
    parser.add_argument("--size", type=int, default=size,
                        help="image height and width (default: the pipeline's)"
                        if size is None else f"image height and width (default: {size})")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")


def run_edit(args) -> int:
    from .. import zoo

    pipe = zoo.load_pipeline(args.pipeline)
    report = _generate_and_edit(pipe, args)
    print(json.dumps(_summary(report), indent=2))
    return 0


def run_demo(args) -> int:
    from .. import zoo

    device = _device(args.device)
    name = args.model or ("sd15" if device.type == "cuda" else "sd15-tiny")
    pipe = zoo.pipeline(name)
    print(f"demo with zoo pipeline {name!r} (random weights: the images are noise-like)")
    if args.mask is None and args.mask_box is None:
        args.mask_box = DEMO_BOX
        print(f"random weights leave the automatic mask empty (the latent difference has no "
              f"spatial structure), so the demo edits --mask-box {DEMO_BOX}; pass --mask or "
              f"--mask-box to change it")
    report = _generate_and_edit(pipe, args)
    report["model"] = name
    print(json.dumps(_summary(report), indent=2))
    print(f"wrote original.png, edit.png, mask.png, overlay.png, report.json to {args.out}")
    return 0


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise FiseditError(f"--device {name!r} is not a torch device ({error})") from None


def _generate_and_edit(pipe, args) -> dict:
    """Generate, edit, time a plain dense generation of the edit prompt, write the outputs."""
    from .session import EditSession

    if args.mask and args.mask_box:
        raise FiseditError("give either --mask or --mask-box, not both")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FiseditError(f"cannot create {out}: {error.strerror}") from None
    pipe.to(_device(args.device))
    pipe.set_progress_bar_config(disable=True)
    session = EditSession(pipe)
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  height=args.size, width=args.size)
    original = session.generate(args.prompt, seed=args.seed, output_type="pil", **common)[0]
    latent_size = tuple(session.original.noise.shape[-2:])
    mask = None
    if args.mask:
        mask = load_mask_png(args.mask, latent_size)
    elif args.mask_box:
        mask = mask_from_box(args.mask_box, latent_size)
    result = session.edit(args.edit, mask=mask, probe_steps=args.probe_steps,
                          mask_mode=args.mask_mode, output_type="pil")
    edited = result.images[0]

    # The dense baseline: the edit prompt regenerated from scratch, without the session.
    start = time.perf_counter()
    pipe(args.edit, generator=torch.Generator("cpu").manual_seed(args.seed),
         output_type="latent", **common)
    dense_s = time.perf_counter() - start

    report = dict(result.report)
    report["timings_s"] = dict(report["timings_s"], dense_regeneration_s=dense_s)
    report["speedup_vs_dense_regeneration"] = dense_s / report["timings_s"]["edit_s"]
    report["image_difference_outside_mask"] = _outside_difference(
        original, edited, result.plan.levels[0].active)
    report["cache_nbytes"] = session.cache_nbytes()
    report["prompt"], report["edit"] = args.prompt, args.edit
    original.save(out / "original.png")
    edited.save(out / "edit.png")
    mask_image = _mask_image(result.mask, original.size)
    mask_image.save(out / "mask.png")
    _overlay(edited, mask_image).save(out / "overlay.png")
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _mask_image(mask: torch.Tensor, size: tuple[int, int]):
    from PIL import Image

    pixels = (mask.cpu().numpy().astype(np.uint8) * 255)
    return Image.fromarray(pixels, mode="L").resize(size, Image.NEAREST)


def _overlay(image, mask_image):
    """The edited image with the mask tinted red."""
    from PIL import Image

    red = Image.new("RGB", image.size, (255, 0, 0))
    alpha = mask_image.point(lambda v: 110 if v else 0)
    return Image.composite(red, image.convert("RGB"), alpha)


def _outside_difference(original, edited, active: torch.Tensor) -> dict:
    """Decoded-image difference outside the blend region: a measurement, not a guarantee (the
    VAE decoder is not local, so edits inside reach pixels outside)."""
    a = np.asarray(original, dtype=np.float32)
    b = np.asarray(edited, dtype=np.float32)
    scale = a.shape[0] // active.shape[0]
    outside = ~np.kron(active.cpu().numpy(), np.ones((scale, scale), dtype=bool))
    difference = np.abs(a - b)[outside]
    return {"max": float(difference.max()) if difference.size else 0.0,
            "mean": float(difference.mean()) if difference.size else 0.0,
            "units": "uint8 pixel values, outside plan.levels[0].active upscaled to pixels"}


def _summary(report: dict) -> dict:
    timings = report["timings_s"]
    macs = report["macs"]
    return {
        "dense_regeneration_s": round(timings["dense_regeneration_s"], 3),
        "edit_s": round(timings["edit_s"], 3),
        "probe_s": round(timings["probe_s"], 3),
        "sparse_s": round(timings["sparse_s"], 3),
        "edit_unet_macs": macs["edit_unet_macs"],
        "dense_unet_macs": macs["dense_unet_macs"],
        "macs_ratio": round(macs["macs_ratio"], 4),
        "mask_area_fraction": round(report["mask_area_fraction"], 4),
        "active_area_fraction": round(report["active_area_fraction"], 4),
        "image_difference_outside_mask": report["image_difference_outside_mask"],
    }
