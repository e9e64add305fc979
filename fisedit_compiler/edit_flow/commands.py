"""The ``edit`` and ``demo`` subcommands (registered by cli.py, like its own ``add_*`` functions).

Each ``add_*_command(subparsers)`` adds a parser and sets ``run`` to a handler
``(args) -> int``; a FiseditError raised by the handler is reported by cli.main.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

from ..checks import check_guidance_scale, check_int, check_seed
from ..compiler.capture import configured_latent_size
from ..errors import FiseditError
from ..execution.plan import mask_from_box, mask_to_latent, parse_box, read_mask_png
from ..pipeline_files import read_json_object, read_saved_folder
from .device_clock import DeviceClock
from .mask import DEFAULT_ESTIMATOR, ESTIMATORS
from .session import (MAX_SIZE_FACTOR, SUPPORTED_SCHEDULERS, check_mask_choice,
                      check_pipeline_class, check_step_count, plan_note, recomputed_nothing,
                      size_multiple)

# The demo runs the trained "shapes" pipeline (fisedit_compiler.shapes, shipped with the
# package) by default: its scene and colour edit come from there, at its native 64 px, with
# the settings of benchmarks/edit_quality.py (20 DDIM steps, guidance 5).
DEMO_MODEL = "shapes"
SHAPES_DEFAULTS = dict(steps=20, guidance_scale=5.0, size=None)
# Any other zoo pipeline (--model) has random weights: a generic prompt edit, fewer steps.
RANDOM_PROMPT, RANDOM_EDIT = "a red circle on a white table", "a blue circle on a white table"
RANDOM_DEFAULTS = dict(steps=8, guidance_scale=7.5, size=128)
# Random weights give predictions without spatial structure, so the automatic mask cannot
# localise the change: the estimators find it spread over the whole latent and plan the edit
# global (dense). A random-weight demo edits this box instead, to show a real sparse edit.
DEMO_BOX = "0.4,0.4,0.6,0.6"


def add_edit_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "edit", help="generate an image with a saved pipeline, then edit it sparsely",
        description="Generate --prompt densely with the pipeline saved in --pipeline, edit it "
                    "towards --edit (automatic mask from --mask-estimator, or --mask), and "
                    "write original.png, edit.png, mask.png, overlay.png and "
                    "report.json (dense regeneration time vs edit time, MACs, mask area).")
    parser.add_argument("--pipeline", metavar="DIR", required=True,
                        help="a folder holding a StableDiffusion(XL)Pipeline saved with "
                             "save_pretrained")
    parser.add_argument("--prompt", required=True, help="the original prompt")
    parser.add_argument("--edit", required=True, help="the edited prompt")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder")
    add_scheduler_option(parser)
    _add_common(parser, steps=50, size=None)
    parser.set_defaults(run=run_edit)


def add_scheduler_option(parser) -> None:
    """``--scheduler`` of the commands that load a saved pipeline (edit, app)."""
    parser.add_argument("--scheduler", choices=SUPPORTED_SCHEDULERS, default=None,
                        help="run the saved pipeline with this scheduler, built from its saved "
                             "scheduler's config (default: the saved one; needed where that "
                             "is one EditSession does not drive, such as SD 1.5's PNDM)")


def add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="generate and edit offline with the shipped 'shapes' model",
        description="Generate a scene with the small trained 'shapes' pipeline shipped with "
                    "the package (64 px scenes of coloured shapes), edit its prompt (a colour "
                    "change), and write original.png, edit.png, mask.png, overlay.png and "
                    "report.json. Offline; on CPU about 12 s in all, under a second of it the "
                    "edit. --model NAME uses a zoo "
                    "pipeline with random weights instead (noise-like images; without --mask "
                    f"or --mask-box it edits the box {DEMO_BOX}).")
    parser.add_argument("--model", default=DEMO_MODEL,
                        help="'shapes' (default: the trained model) or a zoo pipeline name "
                             "(random weights, e.g. sd15-tiny, sd15)")
    parser.add_argument("--out", metavar="DIR", default="fisedit-demo",
                        help="output folder (default: fisedit-demo)")
    parser.add_argument("--prompt", default=None,
                        help="the original prompt (default: the model's demo scene)")
    parser.add_argument("--edit", default=None,
                        help="the edited prompt (default: the model's demo edit)")
    _add_common(parser, steps=None, size=None, guidance_scale=None)
    parser.set_defaults(run=run_demo)


def _add_common(parser, steps: int | None, size: int | None,
                guidance_scale: float | None = 7.5) -> None:
    """The options shared by edit and demo; a default of None means "the model's" (demo)."""
    def default(value):
        return "the model's" if value is None else value

    parser.add_argument("--mask", metavar="PNG",
                        help="a user mask (white = edit), at image or latent resolution")
    parser.add_argument("--mask-box", metavar="x0,y0,x1,y1",
                        help="a user mask as a box in fractions of the width and height")
    # None: not given, i.e. "replace"; given without a user mask it would be ignored, so
    # _check_args refuses it then.
    parser.add_argument("--mask-mode", choices=("replace", "intersect"), default=None,
                        help="a user mask (--mask or --mask-box) replaces the automatic one "
                             "or intersects it (default: replace)")
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"denoising steps (default: {default(steps)})")
    # None: not given, i.e. the default estimator; given where nothing is estimated (a user
    # mask with --mask-mode replace) it would be ignored, so _check_args refuses it then.
    parser.add_argument("--mask-estimator", choices=tuple(ESTIMATORS), default=None,
                        help="how the automatic mask is estimated (default: "
                             f"{DEFAULT_ESTIMATOR}; see fisedit_compiler.edit_flow.mask)")
    parser.add_argument("--probe-steps", type=int, default=None,
                        help="dense steps before the sparse ones (default: the estimator's: "
                             "a fifth of the steps for probe, which measures its mask on them, "
                             "else 0)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--guidance-scale", type=float, default=guidance_scale,
                        help="classifier-free guidance scale (default: "
                             f"{default(guidance_scale)})")
    parser.add_argument("--size", type=int, default=size,
                        help="image height and width (default: the pipeline's)"
                        if size is None else f"image height and width (default: {size})")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")


def run_edit(args) -> int:
    scheduler_config = read_saved_config(args.pipeline, "scheduler", "scheduler_config.json")
    _check_args(args, read_saved_config(args.pipeline, "vae"),
                read_saved_config(args.pipeline, "unet"), scheduler_config)
    check_saved_pipeline_class(args.pipeline)
    check_saved_scheduler(args.pipeline, scheduler_config, args.scheduler)
    pipe = load_with_scheduler(args.pipeline, args.scheduler)
    report = _generate_and_edit(pipe, args)
    print(json.dumps(_summary(report), indent=2))
    _say_plan_note(report)
    print(f"wrote {', '.join(OUTPUT_FILES)} to {args.out}")
    return 0


def run_demo(args) -> int:
    from .. import zoo

    trained = args.model == DEMO_MODEL
    if trained:
        from .. import shapes

        prompt, edit, defaults = shapes.DEMO_PROMPT, shapes.DEMO_EDIT, SHAPES_DEFAULTS
        vae_config = read_saved_config(shapes.WEIGHTS, "vae")
        unet_config = read_saved_config(shapes.WEIGHTS, "unet")
        scheduler_config = read_saved_config(shapes.WEIGHTS, "scheduler", "scheduler_config.json")
    else:
        prompt, edit, defaults = RANDOM_PROMPT, RANDOM_EDIT, RANDOM_DEFAULTS
        # An unknown name has none; zoo.pipeline then refuses it, naming the known ones.
        known = args.model in zoo.PIPELINE_CONFIGS
        vae_config = zoo.PIPELINE_CONFIGS[args.model][1] if known else None
        unet_config = zoo.CONFIGS[args.model][1] if known else None
        scheduler_config = zoo.PIPELINE_CONFIGS[args.model][3] if known else None
    args.prompt = prompt if args.prompt is None else args.prompt
    args.edit = edit if args.edit is None else args.edit
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if trained:
        shapes.check_caption("--prompt", args.prompt)
        shapes.check_caption("--edit", args.edit)
    box_instead = not trained and args.mask is None and args.mask_box is None
    if box_instead:
        args.mask_box = DEMO_BOX
    _check_args(args, vae_config, unet_config, scheduler_config, default_box=box_instead)
    pipe = zoo.pipeline(args.model)
    if trained:
        print(f"demo with the trained {DEMO_MODEL!r} pipeline: {args.prompt!r} -> {args.edit!r}")
    else:
        print(f"demo with zoo pipeline {args.model!r} (random weights: the images are "
              "noise-like)")
        if box_instead:
            print(f"random weights give the automatic mask nothing to localise (the "
                  f"prediction difference has no spatial structure, so it would cover the "
                  f"whole latent), so the demo edits --mask-box {DEMO_BOX}; pass "
                  f"--mask or --mask-box to change it")
    report = _generate_and_edit(pipe, args, warm_repeat=True, model=args.model)
    print(json.dumps(_summary(report), indent=2))
    _say_plan_note(report)
    print(f"wrote {', '.join(OUTPUT_FILES)} to {args.out}")
    return 0


OUTPUT_FILES = ("original.png", "edit.png", "mask.png", "overlay.png", "report.json")


def _check_args(args, vae_config: dict | None, unet_config: dict | None,
                scheduler_config: dict | None, *, default_box: bool = False) -> None:
    """Every argument, before any pipeline is loaded (minutes at SD size): a typo in the mask,
    a mask of the wrong size, a NaN guidance scale or a missing CUDA device is reported at
    once. ``vae_config``, ``unet_config`` and ``scheduler_config`` are the pipeline's, read
    without loading it (None where unknown: loading then reports why), for the rule on --size,
    the size of the user mask and the most --steps. Sets ``args.mask_pixels`` (the --mask PNG
    read), ``args.user_mask`` (the user mask at latent size; None without one, or where the
    configs do not tell the size: then it is made after loading), ``args.mask_mode``
    ("replace" when not given) and ``args.device`` (a torch.device). Creates nothing: the
    output folder is made when the outputs are written. ``default_box``: --mask-box is the
    random-weight demo's own, not the user's (messages say so)."""
    for flag, value in (("--mask", args.mask), ("--mask-box", args.mask_box)):
        if value is not None and not value.strip():
            # An empty value is false below and would run the automatic mask without a word.
            raise FiseditError(f"{flag} is empty; give {flag} a value, or leave {flag} out "
                               "for the automatic mask")
    if args.mask is not None and args.mask_box is not None:
        raise FiseditError("give either --mask or --mask-box, not both")
    if args.edit == args.prompt:
        # EditSession would run the whole generation, then find nothing to edit.
        raise FiseditError(f"--edit is --prompt ({args.prompt!r}), so the edit would change "
                           "nothing; give --edit the changed prompt")
    args.mask_pixels = read_mask_png(args.mask) if args.mask else None
    if args.mask_box:
        parse_box(args.mask_box)
    check_int("--steps", args.steps, minimum=1)
    if scheduler_config is not None:
        # diffusers' default where a config leaves it out.
        check_step_count("--steps", args.steps,
                         scheduler_config.get("num_train_timesteps", 1000),
                         scheduler_config.get("_class_name", "the pipeline's scheduler"))
    user_mask = (f"--mask {args.mask}" if args.mask is not None else
                 f"--mask-box {args.mask_box}" if args.mask_box is not None else None)
    if default_box:
        user_mask = (f"the demo's own {user_mask}, which it edits where a random-weight model "
                     "gives the automatic mask nothing to localise")
    # EditSession.edit's own rules, in the command line's words (the session checks them again).
    check_mask_choice(mask_estimator=args.mask_estimator, probe_steps=args.probe_steps,
                      num_steps=args.steps, user_mask=user_mask, mask_mode=args.mask_mode,
                      cli=True)
    args.mask_mode = "replace" if args.mask_mode is None else args.mask_mode
    check_guidance_scale("--guidance-scale", args.guidance_scale)
    check_seed("--seed", args.seed)
    scale = _vae_scale_factor(vae_config)
    if args.size is not None:
        check_int("--size", args.size, minimum=1)
        # The bound first: a multiple suggested past it would be refused in turn.
        default = _image_shape(None, scale, unet_config)
        largest = None if default is None else MAX_SIZE_FACTOR * max(default)
        if largest is not None and args.size > largest:
            # A typo's extra digit would otherwise load the pipeline and run until memory
            # runs out (minutes), as diffusers takes any size.
            raise FiseditError(
                f"--size {args.size} is more than {MAX_SIZE_FACTOR}x the pipeline's default "
                f"{max(default)} px (its U-Net's sample_size); pass at most --size {largest}")
        multiple = None if scale is None else size_multiple(scale)
        if multiple is not None and args.size % multiple:
            lower = max(multiple, args.size - args.size % multiple)
            higher = lower + multiple
            also = "" if largest is not None and higher > largest else f" or --size {higher}"
            raise FiseditError(f"--size {args.size} is not a multiple of {multiple} (whole "
                               f"latent pixels of {scale}x{scale} pixels, and the pipeline "
                               f"takes multiples of 8); pass e.g. --size {lower}{also}")
    shape = _image_shape(args.size, scale, unet_config)
    args.user_mask = None if shape is None else _user_mask(args, shape, scale)
    args.device = torch_device(args.device)
    check_output_folder("--out", args.out, OUTPUT_FILES)


def _image_shape(size: int | None, scale: int | None, unet_config: dict | None
                 ) -> tuple[int, int] | None:
    """The images' (height, width): --size square, else the pipeline's default (the U-Net's
    sample_size times the VAE factor, as diffusers and EditSession take it); None where the
    configs do not tell it or the VAE factor (the latent size needs both)."""
    if scale is None:
        return None
    if size is not None:
        return size, size
    latent = None if unet_config is None else configured_latent_size(unet_config)
    return None if latent is None else (latent[0] * scale, latent[1] * scale)


def _user_mask(args, shape: tuple[int, int], scale: int) -> torch.Tensor | None:
    """The user mask (--mask or --mask-box) at the latent size of images of ``shape``
    (height, width); None without one."""
    if not args.mask_box and args.mask_pixels is None:
        return None
    height, width = shape
    latent_size = (height // scale, width // scale)
    if args.mask_box:
        return mask_from_box(args.mask_box, latent_size)
    try:
        return mask_to_latent(args.mask_pixels, latent_size, f"the mask {args.mask}", scale)
    except FiseditError as error:
        given = f"--size {args.size}" if args.size is not None else "the pipeline's default size"
        raise FiseditError(f"{error}; the images are {width}x{height} pixels here ({given}), "
                           f"so draw the mask at {width}x{height}") from None


def check_saved_pipeline_class(folder) -> None:
    """Refuse the pipeline saved in ``folder`` from its model index, before loading it (minutes
    at SD size), where its class is not one EditSession drives (img2img, inpainting, ...)."""
    name = read_saved_folder(folder).get("_class_name")
    if isinstance(name, str):          # without one, loading says what is wrong
        check_pipeline_class(name, f" in {folder}")


def check_saved_scheduler(folder, scheduler_config: dict | None, chosen: str | None) -> None:
    """Refuse, before loading, a saved pipeline whose scheduler EditSession does not drive
    (SD 1.5 is saved with PNDM), unless ``--scheduler`` (``chosen``) replaces it."""
    name = None if scheduler_config is None else scheduler_config.get("_class_name")
    if chosen is None and isinstance(name, str) and name not in SUPPORTED_SCHEDULERS:
        raise FiseditError(
            f"the pipeline in {folder} is saved with {name}, which EditSession does not drive "
            f"(it takes {', '.join(SUPPORTED_SCHEDULERS)}); pass --scheduler "
            f"{SUPPORTED_SCHEDULERS[1]} (or another of those) to run it with that scheduler, "
            "built from the saved one's config")


def load_with_scheduler(folder, chosen: str | None):
    """The pipeline saved in ``folder``, with its scheduler replaced by ``chosen`` (a
    diffusers class name, built from the saved scheduler's config) where given."""
    from .. import zoo

    pipe = zoo.load_pipeline(folder)
    if chosen is not None:
        import diffusers

        pipe.scheduler = getattr(diffusers, chosen).from_config(pipe.scheduler.config)
    return pipe


def read_saved_config(folder, component: str, file: str = "config.json") -> dict | None:
    """The config of a component ("vae", "unet"; "scheduler" in scheduler_config.json) of the
    pipeline saved in ``folder``, read without loading it; None when it has none readable
    (loading the pipeline then reports what is wrong)."""
    return read_json_object(Path(folder) / component / file)


def _vae_scale_factor(vae_config: dict | None) -> int | None:
    """Pixels per latent pixel, as diffusers computes ``pipe.vae_scale_factor`` from the
    VAE's config (EditSession takes sizes that are multiples of it); None where unknown."""
    channels = None if vae_config is None else vae_config.get("block_out_channels")
    return 2 ** (len(channels) - 1) if isinstance(channels, (list, tuple)) and channels else None


def check_output_folder(option: str, path, files: tuple[str, ...] = ()) -> None:
    """``path`` can be the output folder: an existing folder, or one that can be created
    there, where none of the output ``files`` is a folder. Checked before any work; the
    commands create the folder only when they write their outputs, so that a failed command
    leaves no folder behind."""
    if not str(path).strip():
        # Path("") is the current folder: the outputs would land there without a word.
        raise FiseditError(f"{option} is empty; pass the folder for the outputs (e.g. {option} "
                           "out), new or existing")
    folder = Path(path).absolute()
    if folder.exists() and not folder.is_dir():
        raise FiseditError(f"{option} {path} is a file, not a folder; pass a folder (new or "
                           "existing) for the outputs")
    existing = next(place for place in (folder, *folder.parents) if place.exists())
    if not existing.is_dir():
        raise FiseditError(f"{option} {path} cannot be created: {existing} is a file, not a "
                           "folder; pass a folder path under an existing folder")
    check_writable(option, path, existing, "created or written")
    taken = [name for name in files if (folder / name).is_dir()]
    if taken:
        raise FiseditError(f"{option} {path} holds a folder named {', '.join(taken)}, where "
                           "the command writes a file of that name; move it, or pass another "
                           f"{option}")


def write_outputs(option: str, path, outputs: dict) -> None:
    """Write each ``outputs`` file (name -> a function that writes to the path it is given)
    into the folder ``path`` (made here), all or none: each goes to a temporary file first,
    and they replace the old ones only once every one is written, so that a failure (a full
    disk) leaves no mix of new files and an earlier run's, and no folder it made. A new file
    gets the mode of any new file (the umask's), a replaced one keeps its own."""
    folder = Path(path).absolute()
    written: list[str] = []
    missing: list[Path] = []
    done = False
    try:
        missing = [place for place in (folder, *folder.parents) if not place.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        for name, write in outputs.items():
            temporary = _new_temporary_file(folder / name)
            written.append(temporary)
            write(temporary)
        for name, temporary in zip(outputs, written):
            os.replace(temporary, folder / name)
        done = True
    except OSError as error:
        raise FiseditError(f"{option} {path}: {', '.join(outputs)} could not be written "
                           f"({error.strerror or error}); nothing was written there") from None
    finally:
        for temporary in written:
            if os.path.exists(temporary):
                os.remove(temporary)
        if not done and missing:
            shutil.rmtree(missing[-1], ignore_errors=True)     # the folders made here


def _new_temporary_file(target: Path) -> str:
    """An empty file beside ``target``, of a name no other file has, made with the mode
    ``target`` has (else that of any new file: the OS applies the umask, which tempfile's
    owner-only files ignore)."""
    replaced = target.is_file()
    mode = stat.S_IMODE(target.stat().st_mode) if replaced else 0o666
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}{target.suffix}")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    if replaced:
        os.chmod(temporary, mode)       # the umask may have taken bits the old file had
    return str(temporary)


def check_writable(option: str, path, folder: Path, what: str = "written") -> None:
    """Refuse ``path`` (the ``option``'s value) unless a file can be made in ``folder``.
    Tried, not asked (os.access): as root it says yes to read-only places such as /proc, and
    the command would then fail only when it writes, after all its work."""
    try:
        probe, probe_path = tempfile.mkstemp(dir=folder, prefix=".fisedit-write-check-")
        os.close(probe)
        os.remove(probe_path)
    except OSError as error:
        raise FiseditError(f"{option} {path} cannot be {what}: {folder} is not writable "
                           f"({error.strerror}); pass a place you can write to") from None


def torch_device(name: str | None) -> torch.device:
    """The device of a ``--device`` option: the named one, or cuda when available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)       # raises when the device is absent (no CUDA)
    except (RuntimeError, AssertionError) as error:
        # The first sentence: torch appends its whole dispatcher table to some.
        why = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() \
            else type(error).__name__
        raise FiseditError(f"--device {name!r} cannot be used here ({why}); leave --device "
                           "out to use cuda when available, else cpu") from None
    if device.type == "meta":
        raise FiseditError(f"--device {name!r} holds tensor shapes but no data, so no image "
                           "can be generated on it; pass cpu or cuda, or leave --device out to "
                           "use cuda when available, else cpu")
    return device


def _generate_and_edit(pipe, args, *, warm_repeat: bool = False,
                       model: str | None = None) -> dict:
    """Generate, edit, time a plain dense generation of the edit prompt, write the outputs.

    The first edit also builds the engine's programs for its plan; ``warm_repeat`` (the demo,
    whose model is small enough for it to cost well under a second) runs the same edit again
    and reports that warm time as ``warm_edit_s``, the speed an interactive session sees from
    its second edit on; the speedup is then computed from it."""
    from .session import EditSession

    pipe.to(args.device)
    session = EditSession(pipe)
    # The user mask at latent size, made by _check_args unless the saved configs did not tell
    # the size; then now, before the generation (minutes at SD size) runs.
    mask = args.user_mask
    if mask is None:
        scale = pipe.vae_scale_factor
        mask = _user_mask(args, _image_shape(args.size, scale, pipe.unet.config), scale)
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  height=args.size, width=args.size)
    pipe.set_progress_bar_config(desc="generate")
    original = session.generate(args.prompt, seed=args.seed, output_type="pil", **common)[0]
    edit_args = dict(mask=mask, probe_steps=args.probe_steps,
                     mask_estimator=args.mask_estimator, mask_mode=args.mask_mode)
    pipe.set_progress_bar_config(desc="edit")
    result = session.edit(args.edit, output_type="pil", **edit_args)
    edited = result.images[0]
    warm_s = None
    if warm_repeat:
        pipe.set_progress_bar_config(desc="edit again (warm)")
        again = session.edit(args.edit, output_type="latent", **edit_args)
        warm_s = again.report["timings_s"]["edit_s"]

    # The dense baseline: the edit prompt regenerated from scratch, without the session.
    pipe.set_progress_bar_config(desc="dense regeneration (baseline)")
    clock = DeviceClock(pipe.unet.device)
    start = clock.mark()
    pipe(args.edit, generator=torch.Generator("cpu").manual_seed(args.seed),
         output_type="latent", **common)
    dense_s = clock.seconds(start, clock.mark())

    report = dict(result.report)
    report["timings_s"] = dict(report["timings_s"], dense_regeneration_s=dense_s)
    if warm_s is not None:
        report["timings_s"]["warm_edit_s"] = warm_s
    # Against the warm edit where there is one: both then output latents and have their
    # programs built, so the ratio is the editing speed, not first-call setup or decoding.
    basis = "edit_s" if warm_s is None else "warm_edit_s"
    if recomputed_nothing(report):
        report["speedup_vs_dense_regeneration"] = None
        report["speedup_basis"] = "none: the edit recomputed nothing"
    else:
        report["speedup_vs_dense_regeneration"] = dense_s / report["timings_s"][basis]
        report["speedup_basis"] = f"dense_regeneration_s / {basis}"
    report["figures"] = FIGURES
    report["image_difference_outside_mask"] = _outside_difference(original, edited,
                                                                  result.region)
    report["cache_nbytes"] = session.cache_nbytes()
    report["prompt"], report["edit"] = args.prompt, args.edit
    if model is not None:
        report["model"] = model
    # Made only now, so that a command failing earlier leaves no folder (checked writable by
    # _check_args before anything ran). The overlay shows the region the edit may change
    # (the mask grown by the dilation), outside of which the report's image difference is
    # measured.
    text = json.dumps(report, indent=2)
    write_outputs("--out", args.out, {
        "original.png": original.save,
        "edit.png": edited.save,
        "mask.png": _mask_image(result.mask, original.size).save,
        "overlay.png": _overlay(edited, _mask_image(result.region, original.size)).save,
        "report.json": lambda path: Path(path).write_text(text, encoding="utf-8")})
    return report


def _say_plan_note(report: dict) -> None:
    note = plan_note(report)
    if note:
        print(note)


def _mask_image(mask: torch.Tensor, size: tuple[int, int]):
    from PIL import Image

    pixels = (mask.cpu().numpy().astype(np.uint8) * 255)
    return Image.fromarray(pixels, mode="L").resize(size, Image.NEAREST)


def _overlay(image, mask_image):
    """The edited image with ``mask_image``'s region tinted red."""
    from PIL import Image

    red = Image.new("RGB", image.size, (255, 0, 0))
    alpha = mask_image.point(lambda v: 110 if v else 0)
    return Image.composite(red, image.convert("RGB"), alpha)


# What each timing of the report is, written into report.json beside them.
FIGURES = {
    "edit_s": "the first edit, from the call's entry: its argument and weight checks, probe "
              "steps, mask, sparse steps, decode and composite, including building its "
              "programs and plan",
    "warm_edit_s": "(demo) the same edit again, latents out: the speed of every later edit",
    "dense_regeneration_s": "the pipeline run from scratch on the edit prompt, latents out: "
                            "what editing replaces",
    "speedup_vs_dense_regeneration": "dense_regeneration_s divided by the edit time named in "
                                     "speedup_basis; above 1 the edit is faster",
    "image_difference_outside_mask": "how far the written edit.png differs from original.png "
                                     "outside the edit's region (the mask grown by the "
                                     "engine's dilation): 0 when the background is kept",
}


def _outside_difference(original, edited, region: torch.Tensor) -> dict:
    """Decoded-image difference outside ``region`` (bool, latent size): the mask the edit may
    change, whatever region its plan computed. The session composites the original's pixels
    outside it (``background_composited`` in the report), so this is 0; it is kept as an end
    to end check of the written images."""
    a = np.asarray(original, dtype=np.float32)
    b = np.asarray(edited, dtype=np.float32)
    scale = a.shape[0] // region.shape[0]
    outside = ~np.kron(region.cpu().numpy(), np.ones((scale, scale), dtype=bool))
    difference = np.abs(a - b)[outside]
    return {"max": float(difference.max()) if difference.size else 0.0,
            "mean": float(difference.mean()) if difference.size else 0.0,
            "units": "uint8 pixel values, outside the edit's region (its mask grown by the "
                     "engine's dilation) upscaled to pixels"}


def _summary(report: dict) -> dict:
    timings = report["timings_s"]
    macs = report["macs"]
    return {
        "dense_regeneration_s": round(timings["dense_regeneration_s"], 3),
        "edit_s": round(timings["edit_s"], 3),
        **({"warm_edit_s": round(timings["warm_edit_s"], 3)} if "warm_edit_s" in timings
           else {}),
        "speedup_vs_dense_regeneration": (None if report["speedup_vs_dense_regeneration"]
                                          is None else
                                          round(report["speedup_vs_dense_regeneration"], 3)),
        "mask_estimator": report["mask_estimator"],
        "mask_unet_evaluations": report["mask_unet_evaluations"],
        "global_change": report["global_change"],
        "mask_s": round(timings["mask_s"], 3),
        "speedup_basis": report["speedup_basis"],
        "checks_s": round(timings["checks_s"], 3),
        "probe_s": round(timings["probe_s"], 3),
        "sparse_s": round(timings["sparse_s"], 3),
        "edit_unet_macs": macs["edit_unet_macs"],
        "dense_unet_macs": macs["dense_unet_macs"],
        "macs_ratio": round(macs["macs_ratio"], 4),
        "mask_area_fraction": round(report["mask_area_fraction"], 4),
        "active_area_fraction": round(report["active_area_fraction"], 4),
        "background_composited": report["background_composited"],
        "image_difference_outside_mask": report["image_difference_outside_mask"],
    }
