"""The browser page: gradio components wired to a ``SessionPool``.

Every handler is a few lines: read the components, call the pool with the tab's session hash,
show the result. A FiseditError (a refused input) becomes ``gr.Error``, which gradio shows in
the page (and gradio_client raises) with the library's message, not a traceback.
"""

from __future__ import annotations

import functools
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import gradio as gr

from ..checks import check_choice, check_int, check_prompt
from ..edit_flow.mask import DEFAULT_ESTIMATOR, ESTIMATORS
from ..edit_flow.session import MASK_MODES, plan_note, recomputed_nothing
from ..errors import FiseditError
from .pool import EditRecipe, EditView, Generation, HistoryEntry, SessionPool

# Small images (the shapes model makes 64 px) are shown enlarged, by whole pixels, so that they
# can be judged and painted on; larger ones are shown as they are.
SHOWN_SIZE = 256


@dataclass(frozen=True)
class PageDefaults:
    """The values the page starts with (the command picks them for its model)."""
    prompt: str
    edit_prompt: str
    steps: int
    guidance_scale: float
    probe_steps: int | None = None   # None: the mask estimator's default
    size: int | None = None          # image side in pixels; None: the pipeline's default
    model: str = "shapes"
    # (name, text) -> None, raising FiseditError for a prompt the model cannot draw (the
    # shapes model knows only its caption grammar); None takes any text.
    check_prompt: Callable[[str, str], None] | None = None


def build_page(pool: SessionPool, defaults: PageDefaults) -> gr.Blocks:
    """The gradio Blocks of the editor; each browser tab gets its own state in ``pool``."""
    with gr.Blocks(title="fisedit-compiler editor", analytics_enabled=False) as page:
        gr.Markdown(
            f"## fisedit-compiler: edit a generation sparsely\nModel: `{defaults.model}`. "
            "Generate an image, then change the prompt (and optionally paint the region to "
            "edit) and press Edit: only the region the edit touches is recomputed, the rest "
            "stays the original's pixel for pixel. Accept keeps the edit as the new original; "
            "click a history entry to go back to it.")
        with gr.Row():
            prompt = gr.Textbox(defaults.prompt, label="Prompt", elem_id="prompt", scale=4)
            # precision=None: gradio would round 1.5 to 2 before _whole could refuse it.
            seed = gr.Number(0, label="Seed", precision=None, elem_id="seed")
        with gr.Row():
            steps = gr.Slider(2, 100, defaults.steps, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(1.0, 15.0, defaults.guidance_scale, step=0.5,
                                 label="Guidance scale", elem_id="guidance")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            edit_prompt = gr.Textbox(defaults.edit_prompt, label="Edit prompt",
                                     elem_id="edit-prompt", scale=4)
            probe_steps = gr.Number(defaults.probe_steps, precision=None, elem_id="probe-steps",
                                    label="Dense steps before the sparse ones (empty: the "
                                          "estimator's default)")
        with gr.Row():
            estimator = gr.Radio(list(ESTIMATORS), value=DEFAULT_ESTIMATOR,
                                 elem_id="mask-estimator",
                                 label="Mask estimator")
            mask_mode = gr.Radio(list(MASK_MODES), value="replace", elem_id="mask-mode",
                                 label="A painted mask replaces the automatic mask, or "
                                       "intersects it (nothing painted: the automatic mask)")
            edit = gr.Button("Edit", variant="primary", elem_id="edit")
            accept = gr.Button("Accept", elem_id="accept")
        with gr.Row():
            original = gr.Image(label="Original", format="png", interactive=False,
                                elem_id="original")
            edited = gr.Image(label="Edit", format="png", interactive=False, elem_id="edited")
            overlay = gr.Image(label="Recomputed region (red)", format="png",
                               interactive=False, elem_id="overlay")
        with gr.Accordion("Paint the region to edit (optional)", open=False):
            painting = gr.ImageEditor(
                label="Original: paint over the region", type="numpy", sources=(),
                transforms=(), layers=False, format="png", elem_id="painting",
                brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"), interactive=True,
                canvas_size=(SHOWN_SIZE, SHOWN_SIZE))
        timings = gr.Markdown(elem_id="timings")
        history = gr.Gallery(label="History (click to go back)", format="png", columns=8,
                             fit_columns=False, height=220, object_fit="contain",
                             allow_preview=False, elem_id="history")

        def checked(name: str, text: str) -> str:
            check_prompt(name, text)       # an API client may send null
            if defaults.check_prompt is not None:
                defaults.check_prompt(name, text)
            return text

        def on_generate(prompt_, seed_, steps_, guidance_, request: gr.Request):
            generation = Generation(checked("the prompt", prompt_),
                                    _whole("Seed", seed_, empty=0), _whole("Steps", steps_),
                                    guidance_, defaults.size)
            image = pool.generate(request.session_hash, generation)
            return (_shown(image), _shown(image), None, None, "",
                    _gallery(pool.history(request.session_hash)))

        def on_edit(edit_prompt_, probe_steps_, estimator_, mask_mode_, painting_,
                    request: gr.Request):
            recipe = _edit_recipe(checked("the edit prompt", edit_prompt_),
                                  _whole("Dense steps", probe_steps_, empty=None),
                                  _painted(painting_), mask_mode_, estimator_)
            view = pool.edit(request.session_hash, recipe)
            return _shown(view.image), _shown(_overlay(view)), _timings(view)

        def on_accept(request: gr.Request):
            entry = pool.accept(request.session_hash)
            return (_shown(entry.image), _shown(entry.image), None, None,
                    f"Accepted: {entry.label}",
                    _gallery(pool.history(request.session_hash)))

        def on_history(event: gr.SelectData, request: gr.Request):
            entry = pool.restore(request.session_hash, event.index)
            return (_shown(entry.image), _shown(entry.image), None, None,
                    f"Back to: {entry.label}")

        generate.click(_messages_shown(on_generate), [prompt, seed, steps, guidance],
                       [original, painting, edited, overlay, timings, history],
                       api_name="generate")
        edit.click(_messages_shown(on_edit),
                   [edit_prompt, probe_steps, estimator, mask_mode, painting],
                   [edited, overlay, timings], api_name="edit")
        accept.click(_messages_shown(on_accept), None,
                     [original, painting, edited, overlay, timings, history],
                     api_name="accept")
        history.select(_messages_shown(on_history), None,
                       [original, painting, edited, overlay, timings], api_name="restore")

        def on_close(request: gr.Request):
            pool.close(request.session_hash)

        page.unload(on_close)
    return page


# The page's handlers run one at a time. Their work on the device already does (the pool's
# lock); the rest is image conversion. Why: the warnings a handler shows are caught with
# warnings.catch_warnings, which swaps process-wide state, so two handlers inside it at once
# in gradio's worker threads would show each other's warnings and could leave the capture
# installed for good.
_HANDLER_LOCK = threading.Lock()


# The page's fields by the names the library's messages give them: a message shows the field's
# label beside the name (the library's checks are shared with Python callers).
FIELD_LABELS = {"num_inference_steps": "Steps", "probe_steps": "Dense steps",
                "guidance_scale": "Guidance scale", "new_prompt": "Edit prompt",
                "mask_estimator": "Mask estimator", "mask_mode": "Mask mode"}


# Phrases of the library's messages that name Python API terms, in the page's words (a
# painted mask is the page's user mask; the page has no dense-threshold control).
PAGE_PHRASES = (
    (" (see result.mask of an edit without mask=)", " (see the mask an edit without a painting "
                                                    "shows)"),
    ("user mask (mask=)", "user mask"), ("user mask", "painted mask"),
    (" (SparseConfig.dense_threshold)", ""),
    ("its U-Net inputs and pipeline arguments are the generation's",
     "its prompt and settings are the original's"),
    ("(change the prompt or another argument to edit)", "(change the edit prompt to edit)"),
)


def in_page_words(message: str) -> str:
    """``message`` in the page's words (``PAGE_PHRASES``), each field the library names by
    its keyword labelled as the page labels it ("Dense steps (probe_steps) 4 is out of
    range")."""
    for phrase, page_phrase in PAGE_PHRASES:
        message = message.replace(phrase, page_phrase)
    for name, label in FIELD_LABELS.items():
        message = re.sub(rf"\b{name}\b", f"{label} ({name})", message)
    return message


def _messages_shown(handler):
    """Show a refused input (FiseditError) in the page as its message, and what the library
    warns about while the handler runs (an intersection that marks nothing, a recording past
    the memory budget) as the page's warnings: printed on the server they reach no user."""
    @functools.wraps(handler)
    def shown(*args, **kwargs):
        caught = []
        try:
            with _HANDLER_LOCK, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                return handler(*args, **kwargs)
        except FiseditError as error:
            raise gr.Error(in_page_words(str(error)), duration=20,
                           print_exception=False) from None
        finally:
            # Outside the recording: shown now (or, outside a gradio event, warned again).
            for warning in caught:
                if issubclass(warning.category, UserWarning):
                    gr.Warning(in_page_words(str(warning.message)), duration=20)
                else:
                    warnings.warn_explicit(warning.message, warning.category,
                                           warning.filename, warning.lineno)
    return shown


_REQUIRED = object()


def _whole(name: str, value, *, empty=_REQUIRED):
    """A number field's value as an int (gradio sends floats such as 3.0); ``empty`` for an
    empty field, which without one is refused. Anything but a whole number (0.9, NaN) is
    refused, not truncated; the pool's checks then bound it."""
    if value is None:
        if empty is _REQUIRED:
            raise FiseditError(f"the {name} field is empty; enter a whole number")
        return empty
    # (Past 2**53 a float is no exact whole number, and 1e300 would be shown in 301 digits.)
    if isinstance(value, float) and value.is_integer():
        if abs(value) >= 2 ** 53:
            raise FiseditError(
                f"{name} {value:g} cannot come from the page exactly (the browser sends "
                f"numbers as floats, whole ones exactly only below {2 ** 53} in size); enter "
                "a smaller whole number")
        value = int(value)
    try:
        return check_int(name, value)
    except FiseditError as error:
        raise FiseditError(f"{error}; enter a whole number") from None


def _shown(image: PIL.Image.Image) -> PIL.Image.Image:
    """``image`` enlarged by a whole factor (nearest) towards SHOWN_SIZE pixels."""
    factor = max(1, SHOWN_SIZE // max(image.size))
    return image.resize((image.width * factor, image.height * factor), PIL.Image.NEAREST)


def _edit_recipe(prompt: str, probe_steps: int | None, mask: np.ndarray | None,
                 mask_mode: str, mask_estimator: str) -> EditRecipe:
    """The page always sends both radios' values, and EditSession refuses a choice it would
    ignore, so the recipe keeps what applies: the mode beside a painted mask, the estimator
    unless the painting replaces the estimate (with a warning where another than the default
    estimator was chosen). Both are checked first: a wrong value must not pass for being
    left out."""
    check_choice("mask_mode", mask_mode, MASK_MODES)
    check_choice("mask_estimator", mask_estimator, tuple(ESTIMATORS))
    painted = mask is not None
    if painted and mask_mode == "replace" and mask_estimator != DEFAULT_ESTIMATOR:
        # A choice the user made (the radio's default is no choice) that this edit drops.
        warnings.warn(f"the painted region replaces the automatic mask, so the chosen mask "
                      f"estimator {mask_estimator!r} is not used; choose intersect to limit "
                      "the estimated mask to the painting", UserWarning, stacklevel=2)
    return EditRecipe(prompt, probe_steps, mask, mask_mode if painted else "replace",
                      None if painted and mask_mode == "replace" else mask_estimator)


def _painted(painting: dict | None) -> np.ndarray | None:
    """The painted pixels (bool, at the shown size) of the editor's layers; None if none."""
    if painting is not None and not isinstance(painting, dict):
        raise FiseditError(f"the painting must be the image editor's value (a dict of "
                           f"'background', 'layers' and 'composite'), got "
                           f"{type(painting).__name__}; send the editor's value as it is")
    layers = None if painting is None else painting.get("layers")
    layers = [] if layers is None else layers
    if not isinstance(layers, (list, tuple)):
        raise FiseditError(f"the painting's 'layers' must be a list of RGBA images, got "
                           f"{type(layers).__name__}; send the editor's value as it is")
    for layer in layers:
        # The editor's layers are RGBA and alpha marks the strokes; a layer without alpha
        # (from a client that sent RGB) would otherwise drop its strokes without a word.
        if not (isinstance(layer, np.ndarray) and layer.ndim == 3 and layer.shape[2] == 4):
            shape = getattr(layer, "shape", type(layer).__name__)
            raise FiseditError(
                f"a painted layer must be an RGBA image [H, W, 4] whose alpha marks the "
                f"strokes, got {shape}; send the editor's layers as RGBA (image_mode='RGBA')")
        if layer.dtype.kind not in "buif" or (layer.dtype.kind == "f" and not np.isfinite(
                layer[..., 3]).all()):
            what = (f"{layer.dtype} values" if layer.dtype.kind not in "buif"
                    else "an alpha that is not finite (NaN or infinite)")
            raise FiseditError(f"a painted layer holds {what}, so its strokes cannot be read; "
                               "send the editor's layers as RGBA images of numbers (uint8)")
    if len({layer.shape for layer in layers}) > 1:
        raise FiseditError(f"the painted layers must have one size, got "
                           f"{sorted({layer.shape[:2] for layer in layers})}; send the editor's "
                           "layers at the size of its background")
    painted = [layer[..., 3] > 0 for layer in layers]
    if not painted or not np.any(painted):
        return None
    return np.logical_or.reduce(painted)


def _overlay(view: EditView) -> PIL.Image.Image:
    """The edit with the recomputed region tinted red."""
    image = view.image.convert("RGB")
    scale = image.height // view.active.shape[0]
    inside = np.kron(view.active.numpy(), np.ones((scale, scale), dtype=bool))
    pixels = np.asarray(image).astype(np.float32)
    pixels[inside] = 0.55 * pixels[inside] + 0.45 * np.array([255, 0, 0])
    return PIL.Image.fromarray(pixels.round().astype(np.uint8))


def _timings(view: EditView) -> str:
    report, timing = view.report, view.report["timings_s"]
    edit_s, dense_s = timing["edit_s"], view.dense_regeneration_s
    if recomputed_nothing(report):
        return (f"**Edit {edit_s:.2f} s**, recomputing nothing: the image is the original."
                + _sentence(in_page_words(plan_note(report))))
    return (
        f"**Edit {edit_s:.2f} s** against a dense regeneration of {dense_s:.2f} s on this "
        f"machine (**{dense_s / edit_s:.1f}x**): {_dense_steps(report)} "
        f"{timing['probe_s']:.2f} s, {_edit_steps(report)} "
        f"{timing['sparse_s']:.2f} s. Recomputed {report['active_area_fraction']:.0%} of the "
        f"image (mask: {_mask_source(report)}, {report['mask_area_fraction']:.0%})."
        + _sentence(in_page_words(plan_note(report))))


def _steps(count: int, kind: str) -> str:
    return f"{count} {kind} step{'' if count == 1 else 's'}"


def _dense_steps(report: dict) -> str:
    words = _steps(report["probe_steps"], "dense")
    return words + (" with the mask estimate" if _estimated_in(report) == "dense" else "")


def _edit_steps(report: dict) -> str:
    """The steps after the dense ones, as they ran: sparse, or dense where the plan covers the
    whole latent."""
    whole = report["active_area_fraction"] >= 1
    words = _steps(report["sparse_steps"], "edit" if whole else "sparse")
    if whole:
        words += " (run dense)"
    return words + (" with the mask estimate" if _estimated_in(report) == "edit" else "")


def _estimated_in(report: dict) -> str | None:
    """Which steps' time holds a one-call estimator's U-Net call ("dense" or "edit"): it runs
    at step 0, the first dense step if there are any. None where no such call ran."""
    estimator = report["mask_estimator"]
    if estimator is None or not ESTIMATORS[estimator].before_step_zero or \
            not report["mask_unet_evaluations"]:
        return None
    return "dense" if report["probe_steps"] else "edit"


def _mask_source(report: dict) -> str:
    """Where the edit's mask came from, in the page's words."""
    by = report["mask_estimator"]
    return {"user": "painted", "auto": f"automatic, by {by}",
            "auto&user": f"painted, intersecting the automatic one by {by}"}[report["mask_source"]]


def _sentence(note: str) -> str:
    return f" **{note[0].upper()}{note[1:]}.**" if note else ""


def _gallery(history: list[HistoryEntry]) -> list[tuple[PIL.Image.Image, str]]:
    return [(entry.image, entry.label) for entry in history]
