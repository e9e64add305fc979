"""EditSession: FISEdit-style editing over a stock diffusers Stable Diffusion (XL) pipeline.

``generate`` runs the pipeline densely and records, through ``SparseEngine.record``, every
step's U-Net call plus the per-step latents and scheduler history. ``edit`` estimates the edit
mask (``mask.ESTIMATORS``: by default from one batched U-Net call contrasting the new prompt's
noise predictions with the recorded ones, before step 0; FISEdit's probe steps as the
baseline), blends latents and scheduler history with the recorded ones outside the plan's
active region after its dense steps (none by default), and runs the remaining steps sparsely
through ``SparseEngine.edit``.
Because sparse U-Net calls return the recorded output outside the active region and every
supported scheduler is elementwise (dynamic thresholding, which is not, is refused), the final latents outside that region equal the original's
bit for bit. The decoded images would not (the VAE decoder has global group norms and a
mid-block attention, so an edit shifts every pixel a little), so ``edit`` composites: outside
that region, upsampled to pixels, its images take the original's decoded pixels.

The pipeline is not forked: U-Net calls are routed by temporarily replacing the instance's
``forward`` (always restored), and per-step work runs in ``callback_on_step_end``.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch

from ..checks import (check_bool, check_choice, check_float, check_guidance_scale, check_int,
                      check_no_cross_attention_kwargs, check_optional_int, check_prompt,
                      check_seed, guides)
from ..compiler.capture import check_unet, latent_size
from ..config import SparseConfig
from ..engine.engine import EditCache, SparseEngine
from ..errors import FiseditError
from ..execution.derived_weights import WeightFingerprint, version_counters
from ..execution.plan import MaskPlan, validate_mask, warn_if_marks_nothing
from . import mask as tac
from .attention import (CrossAttentionControl, TokenAttentionMaps, changed_tokens,
                        shared_tokens)
from .device_clock import DeviceClock

# With a ControlNet, pass the control image (``image=``) to generate and to every edit: the
# ControlNet runs densely on each step's latents, and its residuals count inside the region only.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline",
                       "StableDiffusionControlNetPipeline")
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler")
MASK_MODES = ("replace", "intersect")
# Why the session refuses the pipeline arguments it sets itself (``_SESSION_KWARGS``).
_NOISE = ("an edit keeps the generation's noise (its background is the recording, made with "
          "that noise); drop them, or generate again with seed=, generator= or latents= for "
          "other noise")
_STEP_CALLBACK = ("EditSession runs the pipeline's step callback itself, to blend and record "
                  "the latents at each step; drop them (generate and edit return when every "
                  "step is done)")
_PROMPT_TEXT = ("EditSession encodes the prompts itself from their text (the automatic mask "
                "and the unchanged-edit check read the words, and the pipeline would drop "
                "pooled embeddings given without the others); pass the text as prompt / "
                "new_prompt and negative_prompt")
_DEPRECATED_CALLBACK = (_STEP_CALLBACK + " (callback and callback_steps: diffusers' deprecated "
                        "per-step callback)")
# Pipeline arguments the session sets itself or cannot take, and why. Diffusers' deprecated
# per-step callback (callback, callback_steps) goes through the pipelines' **kwargs, so the
# spelling check would call it a typo.
_SESSION_KWARGS = {
    "seed": _NOISE, "generator": _NOISE, "latents": _NOISE,
    "callback_on_step_end": _STEP_CALLBACK, "callback_on_step_end_tensor_inputs": _STEP_CALLBACK,
    "callback": _DEPRECATED_CALLBACK, "callback_steps": _DEPRECATED_CALLBACK,
    "num_images_per_prompt": "a session records one image per prompt (every edit has the "
                             "recording's batch); drop it and use one EditSession per image",
    "prompt_embeds": _PROMPT_TEXT, "negative_prompt_embeds": _PROMPT_TEXT,
    "pooled_prompt_embeds": _PROMPT_TEXT, "negative_pooled_prompt_embeds": _PROMPT_TEXT,
    "return_dict": "EditSession reads the pipeline's output itself (generate returns the "
                   "images, edit an EditResult); drop it",
    # Only edit can receive it here (generate's first parameter is prompt).
    "prompt": "an edit's prompt is its first argument, new_prompt; pass the text there",
}
# Pipeline arguments whose non-default values act on the whole image at every step, so that a
# change inside the region would move the background: their default (0.0), and why not others.
_WHOLE_IMAGE_KWARGS = {
    "guidance_rescale": "rescales each guided prediction by the standard deviation of the "
                        "whole image",
    "eta": "adds fresh noise to the whole image at every DDIM step",
}
# Pipeline arguments that replace the scheduler's schedule by a custom one, or cut it short
# (SDXL's denoising_end, for an ensemble of expert denoisers): the session sizes its recording
# by num_inference_steps and edits must follow the recorded timesteps, all of them.
_SCHEDULE_KWARGS = ("timesteps", "sigmas", "denoising_end")
# The largest image side taken, in multiples of the pipeline's default side (the U-Net's
# sample_size in pixels).
MAX_SIZE_FACTOR = 8
# The U-Net arguments a ControlNet adds (one tensor per down block; one for the middle block).
_RESIDUAL_INPUTS = ("down_block_additional_residuals", "mid_block_additional_residual")
# U-Net arguments the engine's recorded graphs take; others must be None.
_UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs",
                *_RESIDUAL_INPUTS)
# SDXL's second text encoder's prompts and the prompts they default to (Trajectory fields).
_SECOND_PROMPTS = {"prompt_2": "prompt", "negative_prompt_2": "negative_prompt"}
# The pipelines' output types (diffusers' VaeImageProcessor.postprocess); others are refused
# because diffusers silently maps them to "np", which the background compositing must know.
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_ABSENT = object()     # no instance attribute (``_routed_unet``)


@dataclass
class Trajectory:
    """One denoising run: per step, the U-Net's inputs (and output), latents and scheduler history.

    ``latents[i]`` and ``history[i]`` are taken after step ``i`` (after any blend); ``history``
    is the multistep solver's ``model_outputs`` (empty for single-step schedulers).
    ``blend_steps`` are the steps after which the latents were blended, i.e. where they are not
    the scheduler's continuation of the previous step. ``images`` are the run's output images
    as returned for ``output_type`` (a private copy, composited for an edit): edits composite
    their background against the original's. ``pipeline_kwargs`` are the pipeline's own further
    arguments the run was made with (a ControlNet's ``image`` and ``control_guidance_end``, ...).
    ``flagged``: the pipeline's safety checker flagged the run's images (and blacked them out).
    ``decoder``: the VAE that decoded them (``EditSession._decoder_identity``), which edits
    composite with.
    """
    prompt: str
    negative_prompt: str | None
    guidance_scale: float
    height: int
    width: int
    num_steps: int
    noise: torch.Tensor
    unet_inputs: list[dict] = field(default_factory=list)
    unet_outputs: list[torch.Tensor] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    history: list[list] = field(default_factory=list)
    blend_steps: set[int] = field(default_factory=set)
    output_type: str | None = None
    images: object = None
    pipeline_kwargs: dict = field(default_factory=dict)
    flagged: bool = False
    decoder: tuple | None = None


@dataclass
class EditResult:
    """An edit: ``images`` (the pipeline's output for the requested ``output_type``, with the
    original's pixels outside the edited region unless ``composite_background=False``),
    ``mask`` (bool, latent resolution: the mask the plan was built from), ``plan``, ``latents``
    (final; equal to the original's outside ``region``), ``report`` (timings, MACs, areas,
    whether the background was composited) and ``region`` (bool, latent resolution: ``mask``
    grown by the config's dilation, what the edit may change; the final latents are the
    original's outside it, and the images are composited outside it).
    """
    images: object
    mask: torch.Tensor
    plan: MaskPlan
    latents: torch.Tensor
    report: dict
    region: torch.Tensor
    _trajectory: Trajectory = field(repr=False)
    _generation: int = field(repr=False)
    _session: "EditSession" = field(repr=False)   # only the session that made it accepts it


class EditSession:
    """Generate once densely, then edit repeatedly and sparsely; see the module docstring.

    ``pipe.unet`` must stay the U-Net the session was made with, running its class's own
    forward: generate, edit and accept refuse, before any work, a replaced ``pipe.unet`` and an
    instance-level forward (accelerate's offloading hooks, a wrapper)."""

    def __init__(self, pipe, config: SparseConfig | None = None, *,
                 cache_budget_bytes: int | None = None, engine: SparseEngine | None = None):
        """``engine``: a SparseEngine of ``pipe.unet`` to share with other sessions of the same
        pipeline (one capture and compile for all; their calls must not overlap), instead of a
        new one built from ``config``."""
        _check_pipeline(pipe)
        if engine is not None and not isinstance(engine, SparseEngine):
            raise FiseditError(
                "engine must be a SparseEngine of this pipeline's U-Net (another session's "
                f"session.engine, or fc.compile(pipe.unet)), got {type(engine).__name__}; "
                "or leave it out for a new engine")
        if engine is not None and (engine.unet is not pipe.unet or config is not None):
            raise FiseditError("pass either config= or engine= (an engine of this pipeline's "
                               "U-Net, whose config it keeps), not both or another U-Net's")
        self.pipe = pipe
        self.engine = SparseEngine(pipe.unet, config) if engine is None else engine
        # Recorded steps beyond this many bytes on the device go to pinned host memory and are
        # prefetched one step ahead during edits (EditCache); None keeps every step on it.
        self.cache_budget_bytes = check_optional_int("cache_budget_bytes", cache_budget_bytes,
                                                     minimum=0)
        self.cache: EditCache | None = None
        self.original: Trajectory | None = None
        self.generate_time_s: float | None = None
        self.prepare_report: dict | None = None   # engine.prepare's, after generate
        # The scheduler class and config of the generation: an edit under another one (say
        # another prediction_type) would leave the recorded background behind.
        self._scheduler: tuple | None = None
        self.seed: int | None = None    # the seed of the generation's noise (None: given)
        self._generation = 0   # bumped by generate and accept; results of older ones are stale
        self._decoder_values: WeightFingerprint | None = None   # the VAE's, _decoder_identity
        self._forward_params = inspect.signature(type(pipe.unet).forward).parameters

    # -- public API -----------------------------------------------------------------------
    def generate(self, prompt: str, seed: int | None = 0, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, *, negative_prompt: str | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", **pipeline_kwargs):
        """Run the pipeline densely, recording every step; returns the pipeline's images.

        The initial noise comes from one of ``latents`` (a tensor of the latent shape),
        ``generator`` (one ``torch.Generator``) or ``seed`` (``0 <= seed < 2**64``); it is kept
        so that edits start from the same noise. ``seed=None`` draws a fresh random seed, kept
        in ``session.seed``. A ``seed`` other than the default 0 together with ``latents`` or
        ``generator``, or both of those, is refused: only one of them can choose the noise.
        ``num_inference_steps`` is at most the scheduler's ``num_train_timesteps`` (each step
        takes one of its timesteps). ``guidance_scale`` is at least 0: diffusers guides only
        above 1, every scale from 0 to 1 means no classifier-free guidance, and then a
        ``negative_prompt`` (or another ``negative_*`` pipeline argument) would be ignored, so
        it is refused. The previous generation (and its cache) is replaced only when this call
        succeeds.
        """
        self._check_unet()
        check_prompt("prompt", prompt)
        check_prompt("negative_prompt", negative_prompt, optional=True)
        _warn_if_truncated(self.pipe, "prompt", prompt)
        _warn_if_truncated(self.pipe, "negative_prompt", negative_prompt)
        num_inference_steps = check_int("num_inference_steps", num_inference_steps, minimum=1)
        guidance_scale = check_guidance_scale("guidance_scale", guidance_scale)
        self._check_kwargs(pipeline_kwargs, "generate")
        _check_negative_arguments(guidance_scale, negative_prompt, pipeline_kwargs, self.pipe)
        _check_output_type(output_type)
        self._check_scheduler()
        # Past the scheduler's training timesteps diffusers runs (and we record) every step and
        # only then fails with an IndexError, or refuses in set_timesteps (DDIM).
        check_step_count("num_inference_steps", num_inference_steps,
                         self.pipe.scheduler.config.num_train_timesteps,
                         type(self.pipe.scheduler).__name__)
        _check_first_timestep_once(self.pipe.scheduler, num_inference_steps)
        height, width = self._size(height, width)
        seed = self._seed(seed, generator, latents)
        noise = self._noise(seed, generator, latents, height, width)
        trajectory = Trajectory(prompt, negative_prompt, guidance_scale, height, width,
                                num_inference_steps, noise, output_type=output_type,
                                pipeline_kwargs=_own_copy(pipeline_kwargs))
        cache = self.engine.new_cache(num_inference_steps, self.cache_budget_bytes)

        def unet_call(step, inputs):
            trajectory.unet_inputs.append(_detach(inputs))
            output = self.engine.record(cache, step, **inputs)
            # Kept for the mask estimators, which contrast a new prompt's predictions with them.
            trajectory.unet_outputs.append(output.detach().clone())
            return output

        def on_step_end(step, latents_):
            trajectory.latents.append(latents_.clone())
            trajectory.history.append(_history(self.pipe.scheduler))
            return latents_

        start = time.perf_counter()
        images, trajectory.flagged = self._run(trajectory, unet_call, on_step_end, output_type,
                                               pipeline_kwargs)
        trajectory.decoder = self._decoder_identity()
        generate_time_s = time.perf_counter() - start
        # Checked before it is installed: no estimate or blend can start from NaN or inf.
        if not bool(torch.isfinite(trajectory.latents[-1]).all()):
            raise FiseditError(
                "the generation's latents are not finite (NaN or inf), so there is nothing to "
                f"edit: the pipeline overflowed (guidance_scale was {guidance_scale:g}; a very "
                "large one does that, as do float16 weights past their range"
                f"{_zero_snr_cause(self.pipe.scheduler)}); lower guidance_scale or run in "
                "float32. The session keeps its previous generation")
        # Compile now what edits would otherwise compile on their way (the dense graph of the
        # probe steps, one captured sparse step per capacity bucket), so that the first edit
        # runs at the speed of later ones; a one-time cost, reported apart. Before the new
        # generation replaces the old one: a failure here (out of memory while capturing)
        # leaves the session as it was.
        report = self.engine.prepare(cache, 0, **trajectory.unet_inputs[0])
        report["prepare_s"] += self._prepare_contrast_call(trajectory)
        report["prepare_s"] += self._prepare_decoder_read(trajectory)
        # A private copy: edits composite against it, and the caller may change the returned
        # arrays in place.
        trajectory.images = _own_copy(images)
        self.cache, self.original = cache, trajectory
        self._scheduler = _scheduler_identity(self.pipe.scheduler)
        self.seed = seed
        self._generation += 1
        self.generate_time_s, self.prepare_report = generate_time_s, report
        if trajectory.flagged:
            warnings.warn("the pipeline's safety checker flagged the generated image and "
                          "returned it blacked out; edits of this generation return their own "
                          "decode, not composited onto it", UserWarning, stacklevel=2)
        return images

    def _decoder_identity(self) -> tuple:
        """The pipeline's VAE (the object), its weights' version counters and their values
        (``content_fingerprint``'s bits, read by a ``WeightFingerprint`` kept while the VAE's
        tensors are the same objects: on a GPU a CUDA graph of the read, ~1 ms less at each
        generate and edit for SD1.5's VAE, an estimate), and a copy of its config (the
        pipeline decodes with its ``scaling_factor`` and ``shift_factor``): what tells that
        the decoder of later images is not the one of earlier ones. Not their storages:
        SDXL's pipeline casts an fp16 VAE to fp32 for each decode and back (``force_upcast``),
        new storages for the same values (read eagerly each time, as before)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            return (None,)
        weights = [*vae.parameters(), *vae.buffers()]
        reader = self._decoder_values
        if reader is None or len(reader.tensors) != len(weights) or \
                any(kept is not weight for kept, weight in zip(reader.tensors, weights)):
            reader = self._decoder_values = WeightFingerprint(weights)
        config = copy.deepcopy(dict(getattr(vae, "config", {})))
        return (vae, version_counters(weights), reader(), config)

    def _prepare_decoder_read(self, trajectory: Trajectory) -> float:
        """Capture the VAE's values read (``_decoder_identity``) now, where a reader would
        capture at its second read, the first edit's: the first edit then paid it (its time
        outside the run was ~10 ms above later edits', RESULTS.md session 33, of which this
        capture is one part, not timed on its own). Nothing where this generation read no VAE.
        Returns the seconds it took."""
        started = time.perf_counter()
        if trajectory.decoder[0] is not None:
            self._decoder_values.prepare()
        return time.perf_counter() - started

    def _prepare_contrast_call(self, trajectory: Trajectory) -> float:
        """Compile the default estimator's U-Net call (its own input signature: one row per
        contrast step, each at its timestep) with the original's text, so that the first
        edit does not compile it; returns the seconds it took (0 where nothing compiles)."""
        if not (self.engine.config.cuda_graphs and trajectory.noise.is_cuda):
            return 0.0
        started = time.perf_counter()
        batch = contrast_batch(trajectory, trajectory.unet_inputs[0],
                               tac.contrast_steps(trajectory.num_steps), _guided(trajectory))
        batch["return_dict"] = False            # as _EditRun._estimate calls it
        for _ in range(3):      # torch.compile's CUDA graphs record on a later call
            self.engine.dense(**batch)
        torch.cuda.synchronize(trajectory.noise.device)
        return time.perf_counter() - started

    def edit(self, new_prompt: str, mask=None, probe_steps: int | None = None, *,
             mask_estimator: str | None = None,
             mask_mode: str = "replace", mask_dilation: int = 0,
             cross_attention_control: bool = False,
             negative_prompt: str | None = None, guidance_scale: float | None = None,
             num_inference_steps: int | None = None, height: int | None = None,
             width: int | None = None, output_type: str = "pil",
             composite_background: bool = True, **pipeline_kwargs) -> EditResult:
        """Edit the recorded generation towards ``new_prompt``.

        The mask comes from ``mask_estimator``, one of ``edit_flow.mask.ESTIMATORS`` (see
        there; None: ``mask.DEFAULT_ESTIMATOR``): every estimator but ``"probe"`` reads one
        batched U-Net call on the recorded trajectory with the new prompt before step 0;
        ``"probe"`` (FISEdit) runs the first ``probe_steps`` steps densely and takes their
        latent difference to the recorded trajectory. A change that spreads over the image
        (``mask.contrast_is_global``: background, style, lighting) is planned dense and
        ``report["global_change"]`` says so. A user ``mask`` (bool ``[H, W]`` at latent
        resolution) replaces the estimate (``mask_mode="replace"``) or intersects it
        (``"intersect"``, which needs a mask); ``mask_dilation`` grows the estimate by that many
        latent pixels. Nothing is estimated when a user mask replaces the estimate, so there a
        ``mask_estimator`` or a ``mask_dilation`` is refused rather than ignored (grow the mask
        yourself: ``mask.dilate(mask, 2 * n + 1)``); these rules are ``check_mask_choice``'s,
        which the command line shares. A user mask that marks nothing is honoured (the result
        is the recording) with a warning. An edit that changes nothing (its step-0 U-Net call is
        the recorded one bit for bit: a prompt that encodes like the original's, the same or
        one that differs only past the tokenizer's limit, and the same negative prompt) gets
        the empty estimate without the estimator's U-Net call, so its latents are the
        original's. Where the negative prompt, the ControlNet's control or another pipeline
        argument than the prompt changed, which a one-call estimator's contrast of
        conditional predictions cannot see and which may act anywhere (alone or beside a
        prompt change), the estimate is all of the latent (``report["global_change"]``),
        without its U-Net call, whichever the estimator (the probe's cut would keep only
        where such a change shows most); pass a ``mask`` to confine such an edit.

        Steps ``0..probe_steps-1`` run densely with the new prompt from the recorded noise
        (default: the estimator's ``dense_steps``: a fifth of the steps for the probe, FISEdit's
        10 of 50, else 0, which runs sparse from the first step). After step
        ``probe_steps - 1`` the latents and the scheduler history are blended with the recorded
        ones outside ``plan.levels[0].active``; the remaining steps run sparsely, and the final
        latents are the original's outside the region (the mask grown by the config's
        dilation), where the images are composited: the plan computes whole tiles. The recorded
        generation is never changed by an edit. ``cross_attention_control`` reuses, during the
        dense steps, the recorded generation's cross-attention probabilities for the tokens
        both prompts share (see ``attention``; it costs one extra dense U-Net call per dense
        step); it is refused when no step runs dense (``probe_steps`` 0, the default of every
        estimator but the probe).

        ``negative_prompt``, ``guidance_scale``, ``num_inference_steps``, ``height`` and
        ``width`` default (None) to the generation's: an edit that left the negative prompt out
        would change the unconditional branch, hence the image, inside the region. So do the
        further pipeline arguments the generation was given (SDXL's ``prompt_2`` and size
        conditions, ``clip_skip``, a ControlNet's ``image``): pass one to change it. A
        ``prompt_2`` (``negative_prompt_2``) the generation gave equal to its prompt (negative
        prompt) follows the edit's, as one left out does. Pass another
        string to change it, or ``negative_prompt=""`` for none (for SD 1.x/2.x the same as no
        negative prompt; SDXL pipelines with ``force_zeros_for_empty_prompt`` zero the
        unconditional text only when there is no negative prompt at all, which an edit of a
        generation with one cannot ask for). Without classifier-free guidance (a guidance
        scale <= 1) there is no unconditional branch, so a ``negative_prompt`` (or another
        ``negative_*`` argument) is refused there. The guidance scale, step count and size
        must stay the recorded ones (the pipeline combines the background's recorded U-Net
        outputs with the scale; any two scales <= 1 are the same: no guidance). The U-Net's
        weights must be the generation's too: after an in-place change (a LoRA fused) the
        edit is refused before any U-Net call; generate again.

        ``composite_background`` (default True) makes the background of the decoded images
        exact: outside ``result.region`` (the mask grown by ``SparseConfig.dilation``: what
        the edit may change, whatever region the plan computed) upsampled to pixels (each
        latent pixel covers a ``vae_scale_factor``-square block) the images take the original's
        pixels, inside the edit's. Why: outside the region the final latents already equal the
        original's bit for bit, but the VAE decoder is not local (global group norms, a
        mid-block attention), so the raw decode shifts background pixels too. Cost: nothing on
        the GPU side (no extra decode), a few ms on the host for "pil". Seam risk: pixels just
        outside the region come from the original, so a change that bleeds beyond the dilated
        mask is cut at its edge. It needs the original's images in the same
        form: the edit's ``output_type`` must be the one of the generation (or accepted edit)
        it edits, else FiseditError before any step runs; ``"latent"`` output needs nothing
        (it is the latents, exact already). ``composite_background=False`` returns the raw
        decode. ``report["background_composited"]`` says whether compositing happened and
        ``report["composite_area_fraction"]`` the fraction of pixels taken from the edit.
        """
        original = self._require_generation()
        # The report's edit_s starts here: the checks and setup below (the U-Net's and the
        # VAE's weights read among them) are the edit's time too. Timed from the run's start,
        # edit_s lay 5-8 ms under an SD1.5 edit's synchronised wall time (H100, RESULTS.md
        # session 33).
        clock = DeviceClock(original.noise.device)
        entry = clock.mark()
        self._check_unet()
        check_prompt("new_prompt", new_prompt)
        check_prompt("negative_prompt", negative_prompt, optional=True)
        _warn_if_truncated(self.pipe, "new_prompt", new_prompt)
        _warn_if_truncated(self.pipe, "negative_prompt", negative_prompt)
        mask_dilation = check_int("mask_dilation", mask_dilation, minimum=0)
        self._check_kwargs(pipeline_kwargs, "edit")
        # The further pipeline arguments default to the generation's, as the negative prompt
        # does: SDXL's prompt_2 and size conditions, clip_skip or a ControlNet's image left out
        # would otherwise change the conditioning, hence the image, inside the region.
        pipeline_kwargs = {**_carried_arguments(original, new_prompt, negative_prompt),
                           **pipeline_kwargs}
        _check_output_type(output_type)
        self._check_scheduler()
        self._check_same_scheduler()
        check_bool("cross_attention_control", cross_attention_control)
        check_bool("composite_background", composite_background)
        steps = original.num_steps if num_inference_steps is None else \
            check_int("num_inference_steps", num_inference_steps, minimum=1)
        height = original.height if height is None else check_int("height", height, minimum=1)
        width = original.width if width is None else check_int("width", width, minimum=1)
        if (height, width) != (original.height, original.width) or steps != original.num_steps:
            raise FiseditError(
                f"the generation was recorded at {original.height}x{original.width} with "
                f"{original.num_steps} steps but the edit asks for {height}x{width} with {steps} "
                "steps; edits keep the recorded resolution and step count (call generate again "
                "to change them)")
        latent_size = tuple(original.noise.shape[-2:])
        user_mask = None
        if mask is not None:
            user_mask = validate_mask(mask, latent_size)
            marked = int(user_mask.count_nonzero())     # before the move: no device sync
            user_mask = user_mask.to(original.noise.device)
            warn_if_marks_nothing(marked, stacklevel=2,
                                  remedy="mark the region to edit (True), or leave mask out to "
                                         "estimate it from the prompts")
        # The default mask_mode ("replace") cannot be told from a given one, so only a given
        # "intersect" is refused without a user mask (the command line refuses either); None is
        # no mode here (check_mask_choice's None is the command line's "not given").
        check_choice("mask_mode", mask_mode, MASK_MODES)
        estimator, dense_steps = check_mask_choice(
            mask_estimator=mask_estimator, probe_steps=probe_steps, num_steps=steps,
            user_mask=None if user_mask is None else "mask=",
            mask_mode=None if mask_mode == "replace" else mask_mode,
            mask_dilation=mask_dilation)
        if cross_attention_control and dense_steps == 0:
            why = " (the estimator's default)" if probe_steps is None else ""
            raise FiseditError(
                "cross_attention_control acts during the dense steps, but this edit runs none: "
                f"probe_steps=0{why}; pass probe_steps >= 1, or leave cross_attention_control "
                "out")
        guidance = (original.guidance_scale if guidance_scale is None
                    else check_guidance_scale("guidance_scale", guidance_scale))
        negative = original.negative_prompt if negative_prompt is None else negative_prompt
        # The pipeline combines the U-Net's outputs with the scale on every step, and outside
        # the region those are the recorded ones: another scale would move the background
        # (and guidance turned on or off changes the U-Net batch). Every scale <= 1 is none.
        if guidance != original.guidance_scale and (guides(guidance)
                                                    or guides(original.guidance_scale)):
            raise FiseditError(
                f"the generation used guidance_scale={original.guidance_scale} and the edit "
                f"asks for {guidance}; edits keep the recorded guidance scale, since the "
                "pipeline combines the recorded background's U-Net outputs with it (another "
                "scale would change every pixel); leave guidance_scale out, or call generate "
                "again to change it")
        _check_negative_arguments(guidance, negative, pipeline_kwargs, self.pipe)
        # Last of the argument checks, still before any pipeline step: compositing selects
        # pixels of the original's images, so they must exist in the requested form ("latent"
        # output is the latents themselves, exact outside the region already).
        composite = composite_background and output_type != "latent"
        if composite and original.output_type != output_type:
            raise FiseditError(
                f"composite_background needs the original's decoded images as {output_type!r}, "
                f"but the original (the last generate or accepted edit) was produced with "
                f"output_type={original.output_type!r}; generate (or accept an edit made) with "
                f"output_type={output_type!r}, or pass composite_background=False to get the "
                "raw decode (its background is close to, not equal to, the original's)")
        decoder = self._decoder_identity()      # the VAE this edit decodes with
        if composite and decoder != original.decoder:
            raise FiseditError(
                "pipe.vae was replaced, or its weights or config (scaling_factor, "
                "shift_factor, force_upcast) changed, since the generation: the background "
                "would be the old VAE's decode around the new one's; generate "
                "again, restore pipe.vae, or pass composite_background=False (the raw decode) "
                "or output_type='latent'")
        # The recorded outputs (and the background they made) came from the generation's
        # weights: after an in-place change the engine would refuse only at its first sparse
        # step, after the estimator's or the probe steps' dense U-Net calls. Its own check,
        # after the argument checks: it reads every weight.
        self.engine._check_unchanged(self.cache, contents=True)

        trajectory = Trajectory(new_prompt, negative, guidance, height, width, steps,
                                original.noise, output_type=output_type,
                                pipeline_kwargs=_own_copy(pipeline_kwargs))
        control = None
        if cross_attention_control:
            control = CrossAttentionControl(*shared_tokens(self.pipe.tokenizer, original.prompt,
                                                           new_prompt))
        run = _EditRun(self, trajectory, estimator, user_mask, mask_dilation, dense_steps,
                       control, clock, entry)
        # The U-Net was compared in full above, weights' values included, and nothing of the
        # caller's runs from there to the first sparse step (callbacks are refused): that
        # step need not read the values again.
        self.cache.weight_values_checked = True
        try:
            images, trajectory.flagged = self._run(trajectory, run.unet_call, run.on_step_end,
                                                   output_type, pipeline_kwargs)
        finally:
            self.cache.weight_values_checked = False
        trajectory.decoder = decoder
        run_end = clock.mark()
        if composite and (trajectory.flagged or original.flagged):
            # A blacked-out image composited onto the original (or the edit onto a blacked-out
            # original) would be neither the pipeline's answer nor the edit.
            composite = False
            warnings.warn(
                f"the pipeline's safety checker flagged the "
                f"{'edit' if trajectory.flagged else 'original'} and blacked it out; the edit's "
                "images are its own decode, not composited onto the original "
                "(report['nsfw_content_detected'], report['original_nsfw_content_detected'])",
                UserWarning, stacklevel=2)
        region = run.region
        composite_area = None
        if composite:
            images, composite_area = self._composite(images, original.images, output_type,
                                                     region)
        end = clock.mark()
        # The edit's own images (composited), kept apart from the caller's: accept makes them
        # the next edits' original.
        trajectory.images = _own_copy(images)
        report = self._report(run, steps, user_mask, mask_mode)
        # Read last, so that the host work above overlaps the steps still queued on a GPU.
        run.read_timings(run_end, end)
        report["timings_s"]["generate_s"] = self.generate_time_s
        report["timings_s"]["prepare_s"] = self.prepare_report["prepare_s"]   # once, at generate
        report["background_composited"] = composite
        report["nsfw_content_detected"] = trajectory.flagged
        report["original_nsfw_content_detected"] = original.flagged
        report["composite_area_fraction"] = composite_area
        report["cross_attention_control"] = control is not None
        if control is not None:
            report["shared_token_positions"] = int(control.new_positions.numel())
        # The final latents cloned, as the images are copied: a caller's in-place change of
        # result.latents must not reach the trajectory that accept makes the original.
        return EditResult(images, run.mask, run.plan, trajectory.latents[-1].clone(), report,
                          region, trajectory, self._generation, self)

    def accept(self, result: EditResult) -> None:
        """Make ``result`` the new original generation, so that later edits build on it.

        The edit's U-Net calls are re-recorded: ``engine.record`` runs densely on each step's
        recorded edit inputs (cost: one dense U-Net call per step, like a generation without
        text encoding and decoding, and a second cache in memory until the swap). The recorded
        output of each step is then replaced by the output the edit actually used, so that the
        next edit's sparse calls return, outside their region, what produced the accepted
        latents; the accepted latents and scheduler history become the recorded ones, and its
        images (composited unless it was made with ``composite_background=False``) the
        original images later edits composite against, in its ``output_type``. The session
        changes only if every step records. Refused, before any step records, when the U-Net's
        weights changed in place since the generation (the edit's outputs came from the old
        weights and would be mixed with a recording of the new ones), and for an edit whose
        mask is empty although it changes the prompt or settings (its result is the original,
        which would be recorded as the new prompt's).
        """
        # What the result is first: another session's result is not made acceptable by
        # generating here, which a missing generation's message would advise.
        if not isinstance(result, EditResult):
            raise FiseditError(f"accept takes an EditResult from session.edit, got "
                               f"{type(result).__name__}")
        if result._session is not self:
            raise FiseditError("this EditResult was made by another EditSession; accept it in "
                               "the session that made it, or edit again in this one")
        self._require_generation()
        self._check_unet()
        if result._generation != self._generation:
            raise FiseditError("accept takes an EditResult of the current generation (from this "
                               "session's latest generate or accept); edit again and accept that")
        if not result.report["unchanged"] and not bool(result.mask.any()):
            raise FiseditError(
                "this edit's mask is empty (the estimated and the user mask share no pixel, or "
                "the user mask marks none), so its result is the original: accepting it would "
                "record the original image as the new prompt's, and a later edit to that "
                "prompt would change nothing; edit with a mask that covers the change, then "
                "accept")
        self.engine._check_unchanged(self.cache, contents=True)   # as edit: its own check
        trajectory = result._trajectory
        cache = self.engine.new_cache(trajectory.num_steps, self.cache_budget_bytes)
        for step, inputs in enumerate(trajectory.unet_inputs):
            self.engine.record(cache, step, **inputs)
            key = self.engine.program(inputs).output_key
            cache.replace(step, key, trajectory.unet_outputs[step].clone())
        accepted = Trajectory(trajectory.prompt, trajectory.negative_prompt,
                              trajectory.guidance_scale, trajectory.height, trajectory.width,
                              trajectory.num_steps, trajectory.noise,
                              unet_inputs=trajectory.unet_inputs,
                              unet_outputs=trajectory.unet_outputs, latents=trajectory.latents,
                              history=trajectory.history,
                              blend_steps=set(trajectory.blend_steps),
                              output_type=trajectory.output_type,
                              images=trajectory.images,
                              pipeline_kwargs=trajectory.pipeline_kwargs,
                              flagged=trajectory.flagged, decoder=trajectory.decoder)
        self.cache, self.original = cache, accepted
        self._generation += 1

    def cache_nbytes(self) -> int:
        """Bytes held by the engine cache of the current generation (0 before generate)."""
        return 0 if self.cache is None else self.cache.nbytes()

    # -- pipeline driving -----------------------------------------------------------------
    def _run(self, trajectory: Trajectory, unet_call, on_step_end, output_type,
             pipeline_kwargs):
        """Run the pipeline once with U-Net calls sent to ``unet_call(step, inputs)`` and
        ``on_step_end(step, latents) -> latents`` called after every scheduler step; returns
        its images and whether its safety checker flagged any of them."""
        counter = {"calls": 0}

        def callback(pipe, step, timestep, callback_kwargs):
            if counter["calls"] != step + 1:
                raise FiseditError(
                    f"the pipeline called the U-Net {counter['calls']} times by the end of step "
                    f"{step}; the session needs exactly one (batched) U-Net call per step")
            return {"latents": on_step_end(step, callback_kwargs["latents"])}

        def routed(inputs):
            step = counter["calls"]
            counter["calls"] += 1
            return unet_call(step, inputs)

        with self._routed_unet(routed):
            output = self.pipe(
                trajectory.prompt, negative_prompt=trajectory.negative_prompt,
                num_inference_steps=trajectory.num_steps,
                guidance_scale=trajectory.guidance_scale, height=trajectory.height,
                width=trajectory.width, latents=trajectory.noise.clone(),
                output_type=output_type, callback_on_step_end=callback,
                callback_on_step_end_tensor_inputs=["latents"], **pipeline_kwargs)
        if counter["calls"] != trajectory.num_steps:
            # diffusers' interrupt flag skips the remaining steps' U-Net calls and returns
            # the partly denoised latents decoded as if the run had ended.
            raise FiseditError(
                f"the pipeline called the U-Net for {counter['calls']} of its "
                f"{trajectory.num_steps} steps (an interrupt, such as pipe._interrupt set from "
                "another thread, skipped the rest); a session records and edits whole runs: "
                "clear the interrupt and call again. The session is unchanged")
        flags = getattr(output, "nsfw_content_detected", None)     # None: no checker ran
        return output.images, bool(flags is not None and any(flags))

    @contextmanager
    def _routed_unet(self, handler):
        """Replace ``pipe.unet.forward`` by a router to ``handler(inputs) -> sample`` and always
        restore what was there. The instance attribute is removed while the handler runs, so
        the engine's graph capture and dense calls see the U-Net's own forward. (An instance
        forward of the caller's is refused before any run, by ``_check_unet``; restoring it
        all the same means no path can destroy one.)"""
        unet = self.pipe.unet
        kept = unet.__dict__.get("forward", _ABSENT)

        def routed(*args, **kwargs):
            inputs, return_dict = self._unet_inputs(args, kwargs)
            del unet.forward
            try:
                sample = handler(inputs)
            finally:
                unet.forward = routed
            if return_dict:
                from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
                return UNet2DConditionOutput(sample=sample)
            return (sample,)

        unet.forward = routed
        try:
            yield
        finally:
            if kept is _ABSENT:
                unet.__dict__.pop("forward", None)
            else:
                unet.forward = kept

    def _unet_inputs(self, args, kwargs) -> tuple[dict, bool]:
        """The engine's keyword inputs from a pipeline's U-Net call; refuses extra conditioning
        the recorded graph does not take."""
        bound = inspect.Signature(list(self._forward_params.values())[1:]).bind(*args, **kwargs)
        inputs = {}
        for name, value in bound.arguments.items():
            if name in _UNET_INPUTS:
                if value is not None:
                    inputs[name] = value
            elif name == "cross_attention_kwargs":
                check_no_cross_attention_kwargs(value)     # the rule of the session's checks
            elif name != "return_dict" and value is not None:
                raise FiseditError(
                    f"the pipeline passed {name} to the U-Net; EditSession supports only "
                    f"{', '.join(_UNET_INPUTS)} (no T2I-Adapter, LoRA scales or guidance "
                    "embeddings)")
        inputs["return_dict"] = False
        return inputs, bool(bound.arguments.get("return_dict", True))

    def _dense(self, inputs: dict, *, module: bool = False) -> torch.Tensor:
        """A dense U-Net call: the engine's fastest dense path, or the module itself when its
        attention processors must run (cross-attention control hooks into them)."""
        with torch.no_grad():
            return self.pipe.unet(**inputs)[0] if module else self.engine.dense(**inputs)

    def _blend(self, latents: torch.Tensor, step: int, plan: MaskPlan) -> torch.Tensor:
        """Outside the plan's level-0 active region, take the recorded latents and scheduler
        history of ``step``: from there on the sparse steps reproduce the recorded trajectory
        there exactly."""
        active = plan.levels[0].active.to(latents.device)
        scheduler = self.pipe.scheduler
        recorded = self.original.history[step]
        if hasattr(scheduler, "model_outputs"):
            for index, (current, old) in enumerate(zip(scheduler.model_outputs, recorded)):
                if current is not None and old is not None:
                    scheduler.model_outputs[index] = torch.where(active, current, old)
        return torch.where(active, latents, self.original.latents[step])

    def _composite(self, images, original_images, output_type: str, active: torch.Tensor):
        """The edit's ``images`` with the original's pixels outside ``active`` (bool latent
        [h, w]) upsampled to pixels by nearest neighbour; returns them and the fraction of
        pixels taken from the edit. Pure selection, no arithmetic: outside, the result is the
        original's bytes (uint8 for "pil")."""
        scale = self.pipe.vae_scale_factor
        inside = active.cpu().repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        height, width = inside.shape
        fraction = float(inside.float().mean())

        def check(edited_shape, original_shape, hw):
            # Cannot happen with a supported pipeline (same size, batch 1, same output_type);
            # checked so that a mismatch is an error, not a silently broadcast composite.
            if tuple(edited_shape) != tuple(original_shape) or tuple(hw) != (height, width):
                raise FiseditError(
                    f"cannot composite the background: the edit's images have shape "
                    f"{tuple(edited_shape)} and the original's {tuple(original_shape)}, for a "
                    f"{height}x{width} pixel region; pass composite_background=False")

        if output_type == "pil":
            # On the uint8 arrays: the background is then the original's bytes exactly.
            edited = [np.asarray(image) for image in images]
            kept = [np.asarray(image) for image in original_images]
            check((len(edited),) + edited[0].shape, (len(kept),) + kept[0].shape,
                  edited[0].shape[:2])
            where = inside.numpy()
            where = where[..., None] if edited[0].ndim == 3 else where   # RGB, or L
            composited = [PIL.Image.fromarray(np.where(where, a, b)) for a, b in zip(edited, kept)]
            return composited, fraction
        if output_type == "np":        # [B, H, W, C]
            check(images.shape, original_images.shape, images.shape[1:3])
            return np.where(inside.numpy()[None, :, :, None], images, original_images), fraction
        # "pt": [B, C, H, W]
        check(images.shape, original_images.shape, images.shape[-2:])
        where = inside.to(images.device)[None, None]
        return torch.where(where, images, original_images.to(images.device)), fraction

    # -- checks and helpers ---------------------------------------------------------------
    def _check_unet(self) -> None:
        """First check of generate, edit and accept: ``pipe.unet`` must still be the U-Net the
        session's engine compiled and recorded, with its class's own forward."""
        if self.pipe.unet is not self.engine.unet:
            raise FiseditError(
                "pipe.unet was replaced since this session was made: the session's engine and "
                "recording are of the old U-Net, and its sparse steps would run that one; "
                "restore it (pipe.unet = session.engine.unet) or make a new EditSession(pipe)")
        _check_unet_forward(self.pipe.unet)

    def _require_generation(self) -> Trajectory:
        if self.original is None or self.cache is None:
            raise FiseditError("nothing to edit yet: call session.generate(prompt, seed) first")
        return self.original

    def _check_kwargs(self, pipeline_kwargs: dict, call: str) -> None:
        """Pipeline keywords must be ones the pipeline takes and the session does not set.
        Diffusers pipelines take ``**kwargs`` and drop names they do not know, so a typo would
        otherwise be ignored without a word. A custom schedule (``timesteps``, ``sigmas``) or
        one cut short (``denoising_end``) is refused too: the recording has one step per
        timestep of the scheduler's own schedule for ``num_inference_steps``, and edits must
        follow those timesteps, all of them."""
        refused = sorted(set(pipeline_kwargs) & set(_SESSION_KWARGS))
        if refused:
            why = _SESSION_KWARGS[refused[0]]
            names = [name for name in refused if _SESSION_KWARGS[name] == why]
            raise FiseditError(f"EditSession.{call} cannot take "
                               f"{', '.join(names)}: {why}")
        for name, why in _WHOLE_IMAGE_KWARGS.items():
            # A number, None included: diffusers compares it with 0.0 (None crashes there).
            value = pipeline_kwargs[name] if name in pipeline_kwargs else 0.0
            if check_float(name, value) == 0.0:
                continue
            if name == "eta" and "eta" not in inspect.signature(
                    self.pipe.scheduler.step).parameters:
                raise FiseditError(
                    f"eta={value} would be ignored: diffusers passes eta only to schedulers "
                    f"whose step takes it (DDIM's), and this pipeline's "
                    f"{type(self.pipe.scheduler).__name__} does not; leave eta out")
            raise FiseditError(
                f"{name}={value} {why}, so a change inside the edit region would move the "
                f"background; leave {name} out (or 0) for edits with an exact background")
        # None is each schedule argument's default (the scheduler's own schedule).
        schedule = sorted(name for name in set(pipeline_kwargs) & set(_SCHEDULE_KWARGS)
                          if pipeline_kwargs[name] is not None)
        if schedule:
            raise FiseditError(
                f"EditSession records and edits on the scheduler's own whole schedule for "
                f"num_inference_steps, not a custom or shortened one (an edit of a shortened "
                f"generation would not keep its background); drop {', '.join(schedule)} and pass "
                "num_inference_steps= to generate (the spacing of the timesteps is the "
                "scheduler's config, e.g. timestep_spacing)")
        params = inspect.signature(type(self.pipe).__call__).parameters
        accepted = {name for name, param in params.items()
                    if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)}
        unknown = sorted(set(pipeline_kwargs) - accepted)
        if unknown:
            raise FiseditError(
                f"unknown keyword(s) {', '.join(unknown)}: neither EditSession nor "
                f"{type(self.pipe).__name__} takes them; check the spelling")
        check_no_cross_attention_kwargs(pipeline_kwargs.get("cross_attention_kwargs"))
        _check_pipeline_values(self.pipe, pipeline_kwargs)

    def _check_same_scheduler(self) -> None:
        recorded, current = self._scheduler, _scheduler_identity(self.pipe.scheduler)
        if recorded[0] != current[0]:
            raise FiseditError(
                f"the generation was recorded with {recorded[0]} but the pipeline now has "
                f"{current[0]}; edits must use the recorded scheduler (or call generate again)")
        changed = sorted(key for key in set(recorded[1]) | set(current[1])
                         if not _identical(recorded[1].get(key), current[1].get(key)))
        if changed:
            raise FiseditError(
                f"the scheduler's config changed since the generation ({', '.join(changed)}); "
                "edits must use the recorded scheduler config, since the recorded background "
                "follows it (restore it, or call generate again)")
        if not _identical(recorded[2], current[2]):     # both on the host
            raise FiseditError(
                "the scheduler's noise schedule (alphas_cumprod) changed since the generation, "
                "though its config did not; edits must use the recorded schedule, since the "
                "recorded background follows it (restore it, or call generate again)")

    def _check_scheduler(self) -> None:
        scheduler = self.pipe.scheduler
        name = type(scheduler).__name__
        if name not in SUPPORTED_SCHEDULERS:
            raise FiseditError(
                f"EditSession supports the schedulers {', '.join(SUPPORTED_SCHEDULERS)}, but "
                f"the pipeline has {name}; set one, e.g. pipe.scheduler = "
                f"DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)")
        algorithm = getattr(scheduler.config, "algorithm_type", None)
        if name == "DPMSolverMultistepScheduler" and algorithm not in ("dpmsolver++",
                                                                      "dpmsolver"):
            raise FiseditError(
                f"DPMSolverMultistepScheduler with algorithm_type={algorithm!r} adds noise at "
                "every step, which breaks the exact background; use 'dpmsolver++'")
        # Dynamic thresholding clamps each image by a quantile of all its pixels, so a change
        # inside the region moves the background; at sample_max_value <= 1 the bound is
        # always 1 and the clamp is per pixel.
        config = scheduler.config
        if getattr(config, "thresholding", False) and \
                getattr(config, "sample_max_value", 1.0) > 1.0:
            raise FiseditError(
                f"{name} with thresholding=True and sample_max_value="
                f"{config.sample_max_value} clamps each image by a quantile over all its "
                "pixels, so an edit inside the region would move the background; set "
                "thresholding=False, or sample_max_value=1.0 (a per-pixel clamp), e.g. "
                f"pipe.scheduler = {name}.from_config(pipe.scheduler.config, "
                "thresholding=False)")

    def _size(self, height, width) -> tuple[int, int]:
        scale = self.pipe.vae_scale_factor
        multiple = size_multiple(scale)
        # The pipeline's default: the U-Net's sample_size (an int or a pair) in pixels.
        default_height, default_width = (side * scale for side in latent_size(self.pipe.unet))
        # A typo's extra digit would otherwise run until memory runs out (minutes), or fail
        # to allocate the noise, as diffusers takes any size.
        largest = MAX_SIZE_FACTOR * max(default_height, default_width)
        height = default_height if height is None else check_int(
            "height", height, minimum=multiple, maximum=largest)
        width = default_width if width is None else check_int(
            "width", width, minimum=multiple, maximum=largest)
        if height % multiple or width % multiple:
            raise FiseditError(f"height and width must be multiples of {multiple}, got "
                               f"{height}x{width}")
        return height, width

    @staticmethod
    def _seed(seed, generator, latents) -> int | None:
        """The generation's seed: None when ``latents`` or ``generator`` give the noise, else
        ``seed`` checked (a fresh random one for None). Only one of them may choose the noise:
        another would be ignored without a word. (``seed`` cannot tell an explicit 0 from its
        default, so 0 passes with the others.)"""
        if latents is not None and generator is not None:
            raise FiseditError("latents= and generator= both choose the initial noise (the "
                               "generator would be ignored); pass one of them")
        if latents is not None or generator is not None:
            if not (type(seed) is int and seed == 0):     # a bool is no seed: False == 0
                given = "latents=" if latents is not None else "generator="
                raise FiseditError(
                    f"seed={seed!r} and {given} both choose the initial noise (the seed would "
                    f"be ignored); pass one of them: leave seed out when passing {given}")
            return None
        if seed is None:
            return torch.Generator().seed()
        return check_seed("seed", seed)

    def _noise(self, seed, generator, latents, height, width) -> torch.Tensor:
        """The unscaled initial noise the pipeline receives as ``latents=``: ``latents``
        checked and copied, else drawn from ``generator`` or ``seed``."""
        unet = self.pipe.unet
        shape = (1, unet.config.in_channels, height // self.pipe.vae_scale_factor,
                 width // self.pipe.vae_scale_factor)
        device, dtype = unet.device, unet.dtype
        if generator is not None and not isinstance(generator, torch.Generator):
            raise FiseditError(
                "generator must be one torch.Generator, e.g. "
                f"torch.Generator('cpu').manual_seed(0), got {type(generator).__name__}; for a "
                "seed, pass seed= instead")
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                hint = (" (from numpy: torch.from_numpy(latents))"
                        if isinstance(latents, np.ndarray) else "")
                raise FiseditError(f"latents must be a torch.Tensor of shape {shape}{hint}, got "
                                   f"{type(latents).__name__}")
            if latents.device.type == "meta":
                raise FiseditError("latents is on the meta device, which holds no values; pass "
                                   "the noise itself (on any device: it is moved to the "
                                   f"U-Net's, {device})")
            if not latents.is_floating_point():
                raise FiseditError(f"latents must be a floating-point tensor (the initial "
                                   f"noise), got {latents.dtype}; convert it with .float()")
            if tuple(latents.shape) != shape:
                raise FiseditError(f"latents must have shape {shape} for {height}x{width}, got "
                                   f"{tuple(latents.shape)}")
            finite = torch.isfinite(latents)
            if not bool(finite.all()):
                raise FiseditError(
                    f"latents holds {int((~finite).sum())} NaN or infinite value(s) of "
                    f"{latents.numel()}: every step and the decoded image would come out NaN; "
                    f"pass finite noise, e.g. torch.randn({shape})")
            return latents.to(device=device, dtype=dtype).clone()
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, device=generator.device,
                           dtype=dtype).to(device)

    def _report(self, run: _EditRun, steps: int, user_mask, mask_mode) -> dict:
        plan = run.plan
        # An edit that is the generation runs no step (nor an estimator call): all recorded.
        dense_steps = 0 if run.unchanged else run.dense_steps
        sparse_steps = 0 if run.unchanged else steps - dense_steps
        stats = self.engine.stats(plan)
        dense, sparse = stats["dense_macs"], stats["sparse_macs"]
        # The probe's evaluations are its dense steps, counted once; the one-call estimators'
        # come on top of the steps; cross-attention control runs two calls a dense step (the
        # original prompt's, whose attention it captures, and the edit's).
        extra = 0.0 if run.estimator is None or not run.estimator.before_step_zero \
            else run.mask_unet_evaluations
        calls = 2 if run.control is not None else 1
        edit_macs = (dense_steps * calls + extra) * dense + sparse_steps * sparse
        source = "auto" if user_mask is None else ("user" if mask_mode == "replace"
                                                   else "auto&user")
        return {
            "num_inference_steps": steps,
            "probe_steps": dense_steps,
            "sparse_steps": sparse_steps,
            "mask_source": source,
            "mask_estimator": None if run.estimator is None else run.estimator.name,
            "mask_unet_evaluations": run.mask_unet_evaluations,
            "unchanged": run.unchanged,
            "global_change": run.global_change,
            "unseen_change": run.unseen_change,
            "mask_area_fraction": float(run.mask.float().mean()),
            "active_area_fraction": plan.levels[0].fraction,
            "timings_s": run.timings,
            "macs": {
                "unet_call": stats,
                "edit_unet_macs": edit_macs,
                "dense_unet_macs": steps * dense,
                "macs_ratio": edit_macs / (steps * dense) if dense else 1.0,
            },
        }


class _EditRun:
    """One edit while the pipeline runs: its per-step hooks (``unet_call``, ``on_step_end``),
    the mask and plan they decide, and the timings.

    The plan exists before the first sparse step: from the user mask (``replace``) at once,
    from a one-call estimator inside step 0's U-Net call (it needs the pipeline's encoding of
    the new prompt), from the probe after the last dense step. Where the estimators' evidence
    can only be rounding noise or would be cut short (``_unseen_change``), the estimate is
    decided at step 0 without them: empty when step 0's U-Net call is the recorded one, all
    of the latent when something a one-call estimator cannot see changed (the probe sees it,
    but its cut would keep only where it shows most).
    """

    def __init__(self, session: "EditSession", trajectory: Trajectory,
                 estimator: tac.Estimator | None, user_mask: torch.Tensor | None,
                 mask_dilation: int, dense_steps: int, control: CrossAttentionControl | None,
                 clock: DeviceClock, entry):     # entry: a mark of clock
        """``estimator`` None: the user mask replaces the estimate; else a user mask
        intersects it. ``clock`` and ``entry`` (its mark at the edit call's start) time the
        edit on its device's timeline."""
        self.session, self.original, self.trajectory = session, session.original, trajectory
        self.estimator, self.user_mask = estimator, user_mask
        self.mask_dilation, self.dense_steps, self.control = mask_dilation, dense_steps, control
        self.mask: torch.Tensor | None = None
        self.region: torch.Tensor | None = None
        self.plan: MaskPlan | None = None
        self.global_change = False
        # What changed that the estimators cannot see, which made the edit global (words).
        self.unseen_change: str | None = None
        self.mask_unet_evaluations = 0.0
        self.unchanged = False     # step 0's U-Net call is the recorded one: nothing to edit
        self.differences: list[torch.Tensor] = []     # the probe's, per dense step
        self.timings = {"mask_s": 0.0}
        # The edit's phases on its device's timeline, read at its end (read_timings).
        self.clock, self.entry = clock, entry
        self.start = clock.mark()
        self.probe_end = None
        self.first_sparse_step = None       # its (begin, end) marks
        if estimator is None:
            self._set_mask(None)

    def read_timings(self, run_end, end) -> None:
        """The phase times (seconds) into ``timings`` from the marks: the edit call's entry to
        the run's start (its checks and setup), the run's start to ``run_end`` (the pipeline's
        return), to ``end`` (the images composited), the probe's and the first sparse step's;
        on a GPU this waits for the work queued before ``end``."""
        clock, timings = self.clock, self.timings
        timings["checks_s"] = clock.seconds(self.entry, self.start)
        run_s = clock.seconds(self.start, run_end)
        timings["probe_s"] = 0.0 if self.probe_end is None else \
            clock.seconds(self.start, self.probe_end)
        if self.first_sparse_step is not None:
            # Timed apart: on CUDA it captures the plan's CUDA graph unless the plan is reused.
            timings["first_sparse_step_s"] = clock.seconds(*self.first_sparse_step)
        timings["sparse_s"] = run_s - timings["probe_s"]
        timings["composite_s"] = clock.seconds(run_end, end)
        # checks_s + probe_s + sparse_s + composite_s
        timings["edit_s"] = clock.seconds(self.entry, end)

    # -- the pipeline's hooks ---------------------------------------------------------------
    def unet_call(self, step: int, inputs: dict) -> torch.Tensor:
        session = self.session
        self.trajectory.unet_inputs.append(_detach(inputs))
        if step == 0 and self.estimator is None and self._changes_nothing(inputs):
            # A user mask over an edit that is the generation: recomputing the mask's region
            # would only round differently from the recording.
            self.unchanged = True
            self._set_mask(self._empty())
        elif step == 0 and self.estimator is not None:
            began = time.perf_counter()
            unseen, what = self._unseen_change(inputs)
            self.unchanged = unseen == "nothing"
            if self.unchanged:
                self._set_mask(self._empty())
            elif unseen == "all":
                # The probe would measure such a change, but cut it to where it shows most.
                self.unseen_change = what
                self._set_mask(self._estimated(None, True))
            elif self.estimator.before_step_zero:
                self._set_mask(self._estimate(inputs))
            self.timings["mask_s"] = time.perf_counter() - began
        if self.unchanged:
            # The edit is the generation: every call is the recorded one (the same inputs,
            # the scheduler's the same steps), so the probe's dense steps would compute it
            # again for nothing.
            output = self.original.unet_outputs[step].clone()
        elif step < self.dense_steps and self.control is not None:
            control = self.control
            with control.installed(session.pipe.unet, "capture"):
                session._dense(self.original.unet_inputs[step], module=True)
            with control.installed(session.pipe.unet, "inject"):
                output = session._dense(inputs, module=True)
            control.probabilities.clear()
        elif step < self.dense_steps:
            output = session._dense(inputs)
        elif step == self.dense_steps:
            began = self.clock.mark()
            output = session.engine.edit(session.cache, step, self.plan, **inputs)
            self.first_sparse_step = (began, self.clock.mark())
        else:
            output = session.engine.edit(session.cache, step, self.plan, **inputs)
        self.trajectory.unet_outputs.append(output.detach().clone())
        return output

    def on_step_end(self, step: int, latents: torch.Tensor) -> torch.Tensor:
        original, trajectory = self.original, self.trajectory
        probing = (self.estimator is not None and not self.estimator.before_step_zero
                   and not self.unchanged and self.unseen_change is None)
        if step < self.dense_steps and probing:
            self.differences.append(tac.latent_difference(latents, original.latents[step])[0])
        if step == self.dense_steps - 1:
            if probing:
                began = time.perf_counter()
                score = tac.accumulate(self.differences)
                self._set_mask(self._estimated(score, tac.is_global(score)))
                self.timings["mask_s"] = time.perf_counter() - began
                self.mask_unet_evaluations = float(self.dense_steps)
            self.probe_end = self.clock.mark()
        if step == self.dense_steps - 1 or (step >= self.dense_steps
                                            and step in original.blend_steps):
            latents = self.session._blend(latents, step, self.plan)
            trajectory.blend_steps.add(step)
        if step == trajectory.num_steps - 1:
            # The final latents keep the original's outside the region, where the images are
            # composited: the plan's whole tiles reach past it, and what they changed there
            # would be in the latents (which accept makes the next original's) but not in the
            # images. (In every edit, even where the region is all of the latent: checking that
            # would synchronise with the device.)
            latents = torch.where(self.region, latents, original.latents[step])
            trajectory.blend_steps.add(step)
        trajectory.latents.append(latents.clone())
        trajectory.history.append(_history(self.session.pipe.scheduler))
        return latents

    # -- the mask ---------------------------------------------------------------------------
    def _empty(self) -> torch.Tensor:
        """The estimate of an edit that changes nothing."""
        return torch.zeros(self.original.noise.shape[-2:], dtype=torch.bool,
                           device=self.original.noise.device)

    def _estimated(self, score: torch.Tensor | None, global_change: bool) -> torch.Tensor:
        """The estimated mask from the estimator's ``score``: all of it for a global change
        (``score`` may then be None)."""
        self.global_change = bool(global_change)
        if self.global_change:
            return ~self._empty()
        return tac.binarize(score, self.estimator.cut, self.mask_dilation,
                            smooth=self.estimator.smooth).to(self.original.noise.device)

    def _set_mask(self, estimated: torch.Tensor | None) -> None:
        """The mask: the estimate (None: a user mask replaces it) intersected with the user
        mask if there is one; then the plan."""
        if estimated is None:
            chosen = self.user_mask
        else:
            chosen = estimated if self.user_mask is None else estimated & self.user_mask
        self.mask = chosen
        # What the edit may change is its mask grown by the engine's dilation, whatever region
        # the plan computes (whole tiles, or all of it when the plan goes dense).
        dilation = self.session.engine.config.dilation
        self.region = tac.dilate(chosen, 2 * dilation + 1) if dilation else chosen
        self.plan = self.session.engine.plan(chosen)
        # (Planning read the mask on the host already; this reads the estimate only then.)
        if (estimated is not None and self.user_mask is not None
                and self.plan.raw_fraction == 0 and bool(estimated.any())):
            warnings.warn(
                "the estimated mask and the user mask (mask_mode='intersect') share no latent "
                "pixel, so the edit changes nothing and its result is the recorded generation; "
                "mark where the prompt's change shows (see result.mask of an edit without "
                "mask=), or pass mask_mode='replace' to edit the marked region as it is",
                UserWarning, stacklevel=2)

    def _unseen_change(self, inputs: dict) -> tuple[str | None, str | None]:
        """What of the edit the estimators cannot measure, from its step-0 U-Net ``inputs``,
        and for "all" what it is in words (for the report).

        "nothing": the call is the recorded one bit for bit (the same noise, text states,
        added conditions and ControlNet residuals: a prompt that encodes like the original's,
        e.g. the same one or one that differs only past the tokenizer's limit, with the same
        negative prompt), so the edit changes nothing (edit keeps the recorded guidance).
        "all": something changed that the one-call estimators' contrast of conditional
        predictions (``contrast_batch``) cannot see, whether or not the conditional text
        changed too: the unconditional rows (a new negative prompt, which acts on the whole
        image; the ControlNet's control), or pipeline arguments other than the text's
        (``prompt_2``), which may act on later steps that step 0 does not show (a
        ControlNet's ``control_guidance_end``). A contrast of the text alone would then cut
        such a change down to the text's region. None: only the conditional text changed,
        which they measure.
        Where nothing but what they cannot see changed, an estimator's contrast would be
        rounding noise (its batched call differs from the recorded one by ~1e-6) and Otsu's
        cut through it a random mask."""
        original, trajectory = self.original, self.trajectory
        recorded = original.unet_inputs[0]
        if self._changes_nothing(inputs):
            return "nothing", None
        changed = _changed_arguments(trajectory, original, self.session.pipe)
        unseen = sorted(set(changed) - {"prompt_2"})     # prompt_2 is text the contrast reads
        if unseen:
            return "all", f"the pipeline argument(s) {', '.join(unseen)}"
        guided = _guided(original)
        if guided and not _identical(_unconditional_rows(inputs), _unconditional_rows(recorded)):
            return "all", ("the negative prompt" if trajectory.negative_prompt
                           != original.negative_prompt else "the unconditional branch's inputs")
        steps = tac.contrast_steps(original.num_steps)
        if _identical(contrast_batch(original, inputs, steps, guided),
                      contrast_batch(original, recorded, steps, guided)):
            return "all", ("U-Net inputs the estimators do not read (a ControlNet's "
                           "residuals for the edit's control)")
        return None, None

    def _changes_nothing(self, inputs: dict) -> bool:
        """Whether the edit is the generation: its step-0 U-Net ``inputs`` are the recorded
        ones bit for bit and its pipeline arguments are the generation's."""
        return (not _changed_arguments(self.trajectory, self.original, self.session.pipe)
                and _identical(inputs, self.original.unet_inputs[0]))

    def _estimate(self, inputs: dict) -> torch.Tensor:
        """The one-call estimator's mask: from its score, all of it when the noise contrast
        shows a global change.

        One U-Net call on the recorded inputs of the contrast steps: their conditional rows
        with the new prompt's conditioning (taken from the pipeline's step-0 ``inputs``) and,
        for attention maps, with the original's; the original prompt's predictions on those
        inputs are the recorded outputs."""
        original, pipe = self.original, self.session.pipe
        steps = tac.contrast_steps(original.num_steps)
        # With classifier-free guidance every input is [unconditional, conditional] rows.
        guided = _guided(original)

        def rows(conditioning: dict) -> dict:
            return contrast_batch(original, conditioning, steps, guided)

        batches = [rows(inputs)]
        maps = None
        if self.estimator.needs_attention:
            batches.append(rows(original.unet_inputs[0]))
            new_tokens, old_tokens = changed_tokens(pipe.tokenizer, original.prompt,
                                                    self.trajectory.prompt)
            maps = TokenAttentionMaps([new_tokens] * len(steps) + [old_tokens] * len(steps),
                                      tuple(original.noise.shape[-2:]))
        batch = {key: _concatenate([b[key] for b in batches]) for key in batches[0]}
        batch["return_dict"] = False
        # The engine's fastest dense path, unless the attention processors must run.
        with maps.installed(pipe.unet) if maps else nullcontext():
            prediction = self.session._dense(batch, module=maps is not None)
        self.mask_unet_evaluations = batch["sample"].shape[0] / (2 if guided else 1)
        contrast = tac.Contrast(
            samples=batch["sample"][:len(steps)],
            old=torch.cat([_conditional_rows(original.unet_outputs[s], guided) for s in steps]),
            new=prediction[:len(steps)],
            alphas=cumulative_alphas(pipe.scheduler, steps, batch["timestep"][:len(steps)]),
            prediction_type=pipe.scheduler.config.prediction_type,
            final=original.latents[-1],
            attention=None if maps is None else maps.maps.sum(0))
        return self._estimated(self.estimator.score(contrast), tac.contrast_is_global(contrast))


def cumulative_alphas(scheduler, steps: list[int], timesteps: torch.Tensor) -> torch.Tensor:
    """The cumulative alphas (the signal's share of the variance) of the U-Net inputs at the
    recorded ``steps``, whose U-Net ``timesteps`` are given. A scheduler that keeps its sigmas
    (Euler, DPM-Solver) feeds the U-Net ``x0 + sigma * noise`` at unit variance, so alpha is
    ``1 / (1 + sigma**2)`` exactly, also for timesteps that index no table (Euler's
    ``timestep_type="continuous"``: 0.25 log sigma); else (DDIM) the table at the timestep."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        sigma = sigmas.cpu().float()[list(steps)]
        return 1 / (1 + sigma ** 2)
    return scheduler.alphas_cumprod[timesteps.float().round().long().cpu()]


def _guided(trajectory: Trajectory) -> bool:
    """Whether the generation's U-Net calls hold [unconditional, conditional] rows (CFG)."""
    return trajectory.unet_inputs[0]["sample"].shape[0] == 2 * trajectory.noise.shape[0]


def contrast_batch(original: Trajectory, conditioning: dict, steps: list[int],
                   guided: bool) -> dict:
    """The U-Net inputs of the one-call estimators: the recorded conditional rows of the
    contrast ``steps`` (each at its own timestep, with its recorded ControlNet residuals)
    with ``conditioning``'s text (and SDXL's added conditions), one row per step."""
    device = original.unet_inputs[0]["sample"].device
    batch = {
        "sample": torch.cat([_conditional_rows(original.unet_inputs[s]["sample"], guided)
                             for s in steps]),
        "timestep": torch.stack([torch.as_tensor(original.unet_inputs[s]["timestep"]).reshape(())
                                 for s in steps]).to(device),
        "encoder_hidden_states": _repeat_rows(
            _conditional_rows(conditioning["encoder_hidden_states"], guided), len(steps))}
    if "added_cond_kwargs" in conditioning:
        # SDXL's pooled text and size ids; an IP-Adapter's image embeddings (a list).
        batch["added_cond_kwargs"] = _repeat_rows(
            _conditional_rows(conditioning["added_cond_kwargs"], guided), len(steps))
    for name in _RESIDUAL_INPUTS:
        if name in original.unet_inputs[0]:
            # A ControlNet's residuals, the recorded ones of each step: the recorded outputs
            # the contrast compares with were made with them, and without them the contrast
            # would measure the control as a change over the whole image. (The new prompt's
            # own residuals would need a ControlNet call; the control's reading of the text is
            # minor beside the U-Net's.)
            batch[name] = _concatenate([_conditional_rows(original.unet_inputs[s][name], guided)
                                        for s in steps])
    return batch


def _repeat_rows(value, times: int):
    """Each tensor's rows ``times`` over (one copy per contrast step)."""
    return _map_tensors(lambda tensor: tensor.repeat(times, *[1] * (tensor.dim() - 1)), value)


def _conditional_rows(value, guided: bool):
    """The conditional rows of U-Net inputs or outputs: under classifier-free guidance (every
    batch is [unconditional, conditional] rows) the second half, else all of them."""
    return _half(value, second=True) if guided else value


def _unconditional_rows(value):
    """The unconditional rows of U-Net inputs or outputs under classifier-free guidance."""
    return _half(value, second=False)


def _half(value, second: bool):
    """The first or second half of each tensor's rows (0-d tensors, such as a timestep, as
    they are)."""
    def half(tensor):
        if not tensor.dim():
            return tensor
        middle = tensor.shape[0] // 2
        return tensor[middle:] if second else tensor[:middle]
    return _map_tensors(half, value)


def _map_tensors(function, value):
    """``function`` of each tensor inside nested dicts and lists (U-Net inputs: SDXL's added
    conditions, an IP-Adapter's list of embeddings); plain values as they are."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_tensors(function, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_tensors(function, item) for item in value]
    return value


def _identical(a, b) -> bool:
    """Whether two U-Net inputs or pipeline arguments (tensors, numpy arrays, or dicts, lists
    and tuples of them, or plain values) are equal bit for bit, in dtype and device too;
    numbers by value, of any type."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
                and torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and (a.shape, a.dtype) == (b.shape, b.dtype) and np.array_equal(a, b))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_identical(a[key], b[key]) for key in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
                and len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b)))
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number):
        return a == b       # 0 and 0.0, or 1 and True, make the pipeline compute the same
    return type(a) is type(b) and a == b


def _carried_arguments(original: Trajectory, new_prompt: str,
                       negative_prompt: str | None) -> dict:
    """The generation's further pipeline arguments, as an edit takes them when it leaves them
    out. A second prompt the generation gave equal to its prompt (SDXL's ``prompt_2=prompt``,
    the same text for both encoders) follows the edit's prompt, as one left out would; so does
    ``negative_prompt_2`` equal to the negative prompt."""
    carried = dict(original.pipeline_kwargs)
    edit = {"prompt": new_prompt, "negative_prompt": negative_prompt}
    for name, default in _SECOND_PROMPTS.items():
        before, now = getattr(original, default), edit[default]
        if now is not None and carried.get(name) is not None and carried[name] == before:
            carried[name] = now
    return carried


def check_step_count(name: str, steps: int, limit: int, scheduler: str) -> None:
    """At most the scheduler's ``num_train_timesteps`` steps: each takes one of its timesteps."""
    if steps > limit:
        raise FiseditError(
            f"{name}={steps} is more than the scheduler's num_train_timesteps={limit} "
            f"({scheduler}): each step takes one of its timesteps; use at most {limit} steps")


def _changed_arguments(new: Trajectory, old: Trajectory, pipe) -> list[str]:
    """The names of the further pipeline arguments (``pipeline_kwargs``) that differ between
    two runs (not ``_identical`` nor the same object), each taken as the pipeline uses it: an
    argument left out is the pipeline's default, SDXL's ``original_size`` and ``target_size``
    left out are the run's (height, width), its ``prompt_2`` and ``negative_prompt_2`` left
    out (or empty) are the run's prompt and negative prompt, empty
    ``cross_attention_kwargs`` are none, and a ``clip_skip`` of 0 is none. A value that
    cannot say (``==`` of arrays) counts as changed."""
    params = inspect.signature(type(pipe).__call__).parameters

    def value(run: Trajectory, name: str):
        given = run.pipeline_kwargs[name] if name in run.pipeline_kwargs else params[name].default
        if given is None and name in ("original_size", "target_size"):
            return (run.height, run.width)
        if name in _SECOND_PROMPTS and not given:      # SDXL: prompt_2 = prompt_2 or prompt
            return getattr(run, _SECOND_PROMPTS[name])
        if name == "cross_attention_kwargs" and isinstance(given, dict) and not given:
            return None
        if name == "clip_skip" and isinstance(given, numbers.Integral) and given == 0:
            # diffusers skips no layer for 0, as for None
            return None
        return given

    def same(a, b) -> bool:
        if a is b:
            return True
        try:
            return bool(_identical(a, b))
        except Exception:  # noqa: BLE001 - an == that is no bool: not shown to be the same
            return False
    names = new.pipeline_kwargs.keys() | old.pipeline_kwargs.keys()
    return sorted(name for name in names if not same(value(new, name), value(old, name)))


def _concatenate(values: list):
    """Row-wise concatenation of the batches' tensors, through dicts and lists (an
    IP-Adapter's image embeddings are a list in added_cond_kwargs)."""
    if isinstance(values[0], dict):
        return {key: _concatenate([v[key] for v in values]) for key in values[0]}
    if isinstance(values[0], (list, tuple)):
        return [_concatenate(items) for items in zip(*values)]
    return torch.cat(values)


def _zero_snr_cause(scheduler) -> str:
    """For the message of a generation that overflowed: the cause a zero-SNR schedule with an
    epsilon-predicting model gives (its last timestep has no signal, which that prediction
    divides by); empty for other schedulers."""
    config = scheduler.config
    if not (config.get("rescale_betas_zero_snr") and config.get("prediction_type") == "epsilon"):
        return ""
    return (", and so does this scheduler: rescale_betas_zero_snr=True gives the last timestep "
            "no signal, which an epsilon-predicting model's estimate divides by; use it with a "
            "v-prediction model, or without rescale_betas_zero_snr")


def _check_first_timestep_once(scheduler, steps: int) -> None:
    """Refuse a schedule whose first timestep repeats (DPM-Solver's Karras sigmas at some step
    counts on a cosine beta schedule: 998, 998, 998, ...). Diffusers' schedulers find their
    first step by the timestep's value, taking the second of repeated ones, so on such a
    schedule they start a step late and run past its end after the last step (an IndexError,
    with every step recorded); repeats later on (DPM++ 2M Karras at 50 steps ends 2, 1, 1, 0)
    are counted through and run. Checked on a copy: set_timesteps is the pipeline's to call."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(steps, device="cpu")
    timesteps = [float(t) for t in probe.timesteps]
    repeats = timesteps.count(timesteps[0])
    if repeats > 1:
        shown = ", ".join(f"{t:g}" for t in timesteps[:repeats + 1])
        raise FiseditError(
            f"{type(scheduler).__name__} repeats its first timestep for "
            f"num_inference_steps={steps} ({shown}, ...), and diffusers' scheduler finds its "
            "first step by that value, so it would start a step late and fail after the last "
            "step; use another step count, another sigma spacing (e.g. without "
            "use_karras_sigmas), or another scheduler")


def _check_pipeline(pipe) -> None:
    check_pipeline_class(type(pipe))
    check_unet(pipe.unet)           # first: a torch.compile wrapper has a forward of its own
    _check_unet_forward(pipe.unet)


def check_pipeline_class(cls, where: str = "") -> None:
    """Refuse a pipeline class (or a diffusers class name, as a saved folder's model index
    gives it, so a command can refuse before loading) that EditSession does not drive;
    subclasses of the supported ones are taken."""
    if isinstance(cls, str):
        import diffusers

        cls = getattr(diffusers, cls, cls)
    name = cls if isinstance(cls, str) else cls.__name__
    names = {base.__name__ for base in cls.__mro__} if isinstance(cls, type) else {name}
    if not names & set(SUPPORTED_PIPELINES):
        raise FiseditError(
            f"EditSession supports {', '.join(SUPPORTED_PIPELINES)} (text-to-image), got "
            f"{name}{where}; load (or save) the text-to-image pipeline of your model, e.g. "
            "StableDiffusionPipeline(**pipe.components)")


def _check_unet_forward(unet) -> None:
    """The U-Net must run its class's own forward. An instance-level ``forward`` (accelerate's
    hooks: enable_model_cpu_offload, enable_sequential_cpu_offload, a device_map; or a
    wrapper of the caller's) would be bypassed: the session routes the pipeline's U-Net calls
    through its own instance forward and the engine runs compiled graphs of the module. Even
    the class's forward bound to the instance, which accelerate's remove_hook_from_module
    leaves behind, is refused: the engine refuses attributes added since its compile."""
    if "forward" in unet.__dict__:
        hooked = " (an accelerate hook)" if hasattr(unet, "_hf_hook") else ""
        raise FiseditError(
            f"pipe.unet has an instance-level forward{hooked}, as enable_model_cpu_offload, "
            "enable_sequential_cpu_offload, a device_map or a wrapper install; EditSession "
            "runs the U-Net's own forward and compiled graphs of it, so the wrapper would be "
            "bypassed; remove it with del pipe.unet.forward (for accelerate's hooks first "
            "pipe.remove_all_hooks(), which leaves a forward on the U-Net too) and keep the "
            "pipeline on one device (pipe.to(device))")


# SDXL's micro-conditioning: (height, width) pairs and (top, left) crop offsets, which the
# pipeline joins as tuples into the added time ids.
_SDXL_SIZES = ("original_size", "target_size", "negative_original_size",
               "negative_target_size")
_SDXL_CROPS = ("crops_coords_top_left", "negative_crops_coords_top_left")


def _check_pipeline_values(pipe, pipeline_kwargs: dict) -> None:
    """The values of pipeline keywords that diffusers takes unchecked, failing deep inside the
    pipeline (a raw IndexError for too large a clip_skip) or not at all (a NaN target_size
    gives an all-NaN image): checked before any work."""
    for name in _SECOND_PROMPTS:
        if name in pipeline_kwargs:
            check_prompt(name, pipeline_kwargs[name], optional=True)
    for name in _SDXL_SIZES + _SDXL_CROPS:
        value = pipeline_kwargs.get(name)
        if value is None:
            continue
        if not isinstance(value, tuple) or len(value) != 2:
            raise FiseditError(f"{name} must be a tuple of two numbers (the pipeline joins it "
                               f"to the other size conditions as a tuple), got {value!r}")
        for number in value:
            if name in _SDXL_SIZES:
                check_float(name, number, minimum=1)
            else:
                check_float(name, number, minimum=0)
    clip_skip = pipeline_kwargs.get("clip_skip")
    if clip_skip is not None:
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        layers = min(encoder.config.num_hidden_layers for encoder in encoders
                     if encoder is not None)
        check_int("clip_skip", clip_skip, minimum=0, maximum=layers - 1)
        if (type(pipe).__name__ != "StableDiffusionXLPipeline"
                and not hasattr(pipe.text_encoder, "text_model")):
            raise FiseditError(
                "clip_skip cannot run with this diffusers and transformers: the pipeline reads "
                f"text_encoder.text_model, which this {type(pipe.text_encoder).__name__} does "
                "not have (transformers 5 flattened it); leave clip_skip out")
    _check_controlnet_values(pipe, pipeline_kwargs)
    adapter_inputs = sorted(name for name in ("ip_adapter_image", "ip_adapter_image_embeds")
                            if pipeline_kwargs.get(name) is not None)
    if adapter_inputs and getattr(pipe.unet, "encoder_hid_proj", None) is None:
        raise FiseditError(
            f"{', '.join(adapter_inputs)} needs an IP-Adapter, and none is loaded; load one "
            "(pipe.load_ip_adapter(...)) before the session is made, or drop "
            f"{', '.join(adapter_inputs)}")


def _warn_if_truncated(pipe, name: str, text: str | None) -> None:
    """Warn where ``text`` is longer than the pipeline's tokenizer takes: diffusers cuts it
    and says so only in its log, which a page's user never sees, and an edit of the part cut
    off changes nothing."""
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if text is None or not isinstance(limit, int):
        return
    count = len(tokenizer(text).input_ids)
    if count > limit:
        warnings.warn(f"{name} is {count} tokens, and the text encoder reads the first {limit} "
                      "(its start and end marks among them): the rest has no effect, and an "
                      "edit of it changes nothing; shorten it", UserWarning, stacklevel=3)


def _check_controlnet_values(pipe, pipeline_kwargs: dict) -> None:
    """A ControlNet pipeline's own keywords (``_check_pipeline_values``): diffusers compares
    the guidance window with its bounds, which a NaN passes as if it were 0 or 1; takes any
    truthy ``guess_mode`` ("no" turns it on); and fails with a raw TypeError on
    ``image=None``."""
    if getattr(pipe, "controlnet", None) is None:
        return
    if "image" in pipeline_kwargs and pipeline_kwargs["image"] is None:
        raise FiseditError(
            "image=None: a ControlNet pipeline needs its control image; pass one (an edit "
            "that leaves image out keeps the generation's)")
    for name in ("control_guidance_start", "control_guidance_end",
                 "controlnet_conditioning_scale"):
        value = pipeline_kwargs.get(name)
        bounds = {} if name == "controlnet_conditioning_scale" else dict(minimum=0, maximum=1)
        for number in (value if isinstance(value, (list, tuple)) else [value]):
            if number is not None:
                check_float(name, number, **bounds)
    if "guess_mode" in pipeline_kwargs:
        check_bool("guess_mode", pipeline_kwargs["guess_mode"])


def size_multiple(vae_scale_factor: int) -> int:
    """What image heights and widths must be multiples of: whole latent pixels (the VAE's
    factor) and, as the Stable Diffusion pipelines' ``check_inputs`` require, of 8 (a VAE of
    factor 4, as the shipped shapes model's, still takes only multiples of 8)."""
    return math.lcm(vae_scale_factor, 8)


def _check_negative_arguments(guidance_scale: float, negative_prompt: str | None,
                              pipeline_kwargs: dict, pipe) -> None:
    """Without classifier-free guidance (``guides``) diffusers has no unconditional branch and
    drops the negative prompt and every other ``negative_*`` argument (SDXL's
    negative_prompt_2, negative_original_size, ...) without a word: refused. With it, an SDXL
    pipeline with ``force_zeros_for_empty_prompt`` and no negative prompt makes the
    unconditional text zeros, dropping ``negative_prompt_2`` just as silently: refused too
    (embeddings are refused before, ``_SESSION_KWARGS``). SDXL's negative size conditions
    (``_NEGATIVE_SIZES``) act only together: one of the sizes alone, or a
    ``negative_crops_coords_top_left`` without both, is dropped as silently: refused."""
    if guides(guidance_scale):
        zeroed = (negative_prompt is None
                  and getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        dropped = [name for name in ("negative_prompt_2",)
                   if zeroed and pipeline_kwargs.get(name) is not None]
        if dropped:
            raise FiseditError(
                f"{', '.join(dropped)} without a negative_prompt would be ignored: this "
                "pipeline's force_zeros_for_empty_prompt makes the unconditional text zeros "
                "when there is no negative prompt; pass a negative_prompt with it (\"\" for "
                f"none), or leave {', '.join(dropped)} out")
        _check_negative_sizes(pipeline_kwargs, pipe)
        return
    given = (["negative_prompt"] if negative_prompt is not None else []) + sorted(
        name for name, value in pipeline_kwargs.items()
        if name.startswith("negative_") and value is not None)
    if given:
        raise FiseditError(
            f"{', '.join(given)} acts only through classifier-free guidance, which diffusers "
            f"runs only for guidance_scale > 1, and guidance_scale is {guidance_scale}: it "
            f"would be ignored; pass guidance_scale > 1 (e.g. 7.5), or leave "
            f"{', '.join(given)} out")


# SDXL pipelines condition the unconditional branch on their own sizes only where both sizes
# are given; otherwise it takes the conditional branch's, and the crop with them.
_NEGATIVE_SIZES = ("negative_original_size", "negative_target_size")
_NEGATIVE_CROP = "negative_crops_coords_top_left"


def _check_negative_sizes(pipeline_kwargs: dict, pipe) -> None:
    """Refuses the negative size conditions that the pipeline would drop without a word
    (``_check_negative_arguments``)."""
    sizes = [name for name in _NEGATIVE_SIZES if pipeline_kwargs.get(name) is not None]
    both = " and ".join(_NEGATIVE_SIZES)
    if len(sizes) == 1:
        missing = next(name for name in _NEGATIVE_SIZES if name not in sizes)
        raise FiseditError(
            f"{sizes[0]} without {missing} would be ignored: diffusers conditions the "
            f"unconditional branch on negative sizes only when both {both} are given; pass "
            f"{missing} too, or leave {sizes[0]} out")
    crop = pipeline_kwargs.get(_NEGATIVE_CROP)
    if crop is None or sizes:
        return
    default = inspect.signature(type(pipe).__call__).parameters.get(_NEGATIVE_CROP)
    try:
        at_default = default is not None and tuple(crop) == tuple(default.default)
    except TypeError:
        at_default = False
    if not at_default:
        raise FiseditError(
            f"{_NEGATIVE_CROP}={crop!r} would be ignored: diffusers conditions the "
            f"unconditional branch on it only when both {both} are given; pass them too, or "
            f"leave {_NEGATIVE_CROP} out")


class _Spelling:
    """How a caller names the edit's arguments in messages: EditSession.edit's keywords, or the
    command line's options (``cli``), so that one rule speaks each caller's words."""
    _CLI_NAMES = {"num_inference_steps": "--steps",
                  "mask": "--mask PNG or --mask-box x0,y0,x1,y1"}

    def __init__(self, cli: bool):
        self.cli = cli

    def name(self, argument: str) -> str:
        if self.cli:
            return self._CLI_NAMES.get(argument, "--" + argument.replace("_", "-"))
        return "mask=" if argument == "mask" else argument

    def given(self, argument: str, value) -> str:
        return f"{self.name(argument)} {value}" if self.cli else f"{argument}={value!r}"

    def at_least(self, argument: str, minimum: int) -> str:
        return (f"{self.name(argument)} {minimum} or more" if self.cli
                else f"{argument} >= {minimum}")


def check_mask_choice(*, mask_estimator: str | None, probe_steps, num_steps: int,
                      user_mask: str | None, mask_mode: str | None, mask_dilation: int = 0,
                      cli: bool = False) -> tuple[tac.Estimator | None, int]:
    """The one home of the rules on how an edit's mask is made, for ``EditSession.edit`` and
    the command line (``cli``: messages name its options), so that they cannot drift apart.

    ``user_mask`` says how a user mask was given (e.g. ``"mask="``), None for none;
    ``mask_mode`` None is the default, "replace". The mask is estimated unless a user mask
    replaces it; arguments that would then be ignored are refused: a mask mode without a user
    mask, a ``mask_estimator`` or ``mask_dilation`` beside a replacing user mask, and the
    probe estimator without dense steps to measure on. Returns the estimator (None when a user
    mask replaces the estimate) and the number of dense steps (``probe_steps``, by default the
    estimator's), checked against ``num_steps``."""
    say = _Spelling(cli)
    if mask_mode is not None:
        check_choice(say.name("mask_mode"), mask_mode, MASK_MODES)
    if mask_estimator is not None:
        check_choice(say.name("mask_estimator"), mask_estimator, tuple(tac.ESTIMATORS))
    if mask_mode is not None and user_mask is None:
        raise FiseditError(
            f"{say.given('mask_mode', mask_mode)} says how a user mask combines with the "
            f"estimated one, and no user mask is given; add {say.name('mask')}, or leave "
            f"{say.name('mask_mode')} out for the estimated mask alone")
    estimator = tac.ESTIMATORS[tac.DEFAULT_ESTIMATOR if mask_estimator is None
                               else mask_estimator]
    if probe_steps is None:
        probe_steps = estimator.dense_steps(num_steps)
    probe_steps = check_int(say.name("probe_steps"), probe_steps, minimum=0)
    try:    # The range apart from the type, so that only its refusal gets the reason.
        check_int(say.name("probe_steps"), probe_steps, minimum=0, maximum=num_steps - 1)
    except FiseditError as error:
        raise FiseditError(f"{error} (an edit runs the generation's {num_steps} steps, and its "
                           "last at least runs sparse)") from None
    if user_mask is not None and mask_mode != "intersect":
        replace = say.given("mask_mode", "replace")
        if mask_estimator is not None:
            raise FiseditError(
                f"{say.given('mask_estimator', mask_estimator)} has nothing to do: the user "
                f"mask ({user_mask}) with {replace} (the default) is used as given, without an "
                f"estimate; leave {say.name('mask_estimator')} out, or pass "
                f"{say.given('mask_mode', 'intersect')} to intersect the estimate with the mask")
        if mask_dilation:
            raise FiseditError(
                f"{say.given('mask_dilation', mask_dilation)} grows the estimated mask, but "
                f"the user mask ({user_mask}) with {replace} is used as given; grow it yourself "
                f"(edit_flow.mask.dilate(mask, {2 * mask_dilation + 1})) and leave "
                f"{say.name('mask_dilation')} out, or pass "
                f"{say.given('mask_mode', 'intersect')}")
        return None, probe_steps
    if not estimator.before_step_zero and probe_steps == 0:
        more = (f" (with {say.at_least('num_inference_steps', 2)})" if num_steps < 2 else "")
        raise FiseditError(
            f"{say.given('mask_estimator', estimator.name)} measures its mask on the dense "
            f"probe steps, and this edit has none ({say.given('probe_steps', 0)} of "
            f"{say.given('num_inference_steps', num_steps)}); give "
            f"{say.at_least('probe_steps', 1)}{more}, another {say.name('mask_estimator')}, "
            f"or a user mask ({say.name('mask')}) with {say.given('mask_mode', 'replace')}")
    return estimator, probe_steps


def recomputed_nothing(report: dict) -> bool:
    """Whether an edit recomputed no pixel (it changes nothing, or its mask marks nothing):
    its time is then no editing speed, and the command line and the page show none."""
    return report["active_area_fraction"] == 0


def plan_note(report: dict) -> str:
    """The sentence the command line and the page show where the plan is not simply the
    mask's (empty otherwise): an edit that is the generation changes nothing; a global
    change, seen by the estimator or one it cannot see, is planned dense, or, with an
    intersecting user mask, confined to that mask (the plan is then the user's, and may well
    run sparse); a partial mask whose tiles pass the finest level's dense threshold runs
    dense."""
    if report["unchanged"]:
        return ("the edit changes nothing: its U-Net inputs and pipeline arguments are the "
                "generation's, so the result is the original (change the prompt or another "
                "argument to edit)")
    if not report["global_change"]:
        finest = report["macs"]["unet_call"]["levels"][0]
        if finest["dense"] and report["mask_area_fraction"] < 1:
            return (f"the mask ({report['mask_area_fraction']:.0%} of the image), grown by the "
                    "dilation to whole tiles, passes the finest level's dense threshold "
                    "(SparseConfig.dense_threshold), so every level ran dense: no sparse "
                    "speedup; a smaller mask edits sparsely")
        return ""
    if report["unseen_change"]:
        seen = (f"the edit changes {report['unseen_change']}, which may act anywhere in the "
                f"image and which the {report['mask_estimator']} estimator cannot confine")
    else:
        seen = (f"the {report['mask_estimator']} estimator sees a change over the whole image "
                "(a global change: background, style or lighting)")
    if report["mask_source"] == "auto&user":
        return f"{seen}; the intersecting user mask confines the edit to the mask"
    return f"{seen}, so the edit was planned dense: no sparse speedup"


def _check_output_type(output_type) -> None:
    if output_type not in OUTPUT_TYPES:
        raise FiseditError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def _own_copy(value):
    """A copy of a pipeline's images ("pil": a list of images, "np": an array, "pt"/"latent": a
    tensor) or of its further arguments (a ControlNet's image, in dicts and lists), so that
    later changes by the caller do not reach the session."""
    if isinstance(value, dict):
        return {key: _own_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_own_copy(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, (np.ndarray, PIL.Image.Image)):
        return value.copy()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def _scheduler_identity(scheduler) -> tuple[str, dict, torch.Tensor | None]:
    """The scheduler's class name, a copy of its config (its constructor arguments; copied
    in depth, so that a value changed in place, such as a numpy ``trained_betas``, shows) and
    of its noise schedule (``alphas_cumprod``, which code may set on the instance without
    touching the config)."""
    schedule = getattr(scheduler, "alphas_cumprod", None)
    # On the host: diffusers moves it to the samples' device in add_noise, which is no change.
    return (type(scheduler).__name__, copy.deepcopy(dict(scheduler.config)),
            schedule.detach().to("cpu", copy=True) if isinstance(schedule, torch.Tensor)
            else None)


def _history(scheduler) -> list:
    """A copy of the multistep solver's model-output history (empty for one-step schedulers)."""
    return [None if t is None else t.clone() for t in getattr(scheduler, "model_outputs", [])]


def _detach(inputs: dict) -> dict:
    """The U-Net inputs of one call, kept for oracle checks and for re-recording on accept.
    Samples are cloned; text states are shared by all steps and kept by reference."""
    kept = dict(inputs)
    kept["sample"] = inputs["sample"].clone()
    return kept
