"""Argument checks shared by every public entry point (engine, EditSession, backend, CLI).

One helper per kind of argument, so that the engine, the session, the backend contexts and the
command line refuse the same bad value with the same message, before any expensive work. Each
raises FiseditError naming the argument, what it got, and what it takes.
"""

from __future__ import annotations

import math
import operator

import torch

from .errors import FiseditError


def check_int(name: str, value, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as a Python int in ``[minimum, maximum]``.

    Integral numpy scalars and 0-d integer tensors are accepted (through ``__index__``, so a
    step index taken from ``np.arange`` or ``torch.arange`` works); bools, floats and strings
    are refused, since ``True`` or ``2.5`` as a count or an index is a mistake, not a request.
    """
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise FiseditError(f"{name} must be an int, got the bool {value!r}")
    if isinstance(value, torch.Tensor) and value.dim() != 0:
        # operator.index takes a one-element tensor of any shape; an int is a 0-d tensor.
        raise FiseditError(f"{name} must be an int, got a {value.dim()}-D tensor of shape "
                           f"{tuple(value.shape)}; pass int(...) or a 0-d tensor")
    try:
        number = operator.index(value)
    except TypeError:
        raise FiseditError(f"{name} must be an int, got {_describe(value)}") from None
    _check_range(name, number, minimum, maximum)
    return number


def _check_range(name: str, number, minimum, maximum) -> None:
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        low = "" if minimum is None else f"{minimum} <= "
        high = "" if maximum is None else f" <= {maximum}"
        raise FiseditError(f"{name} {number} is out of range: it must satisfy "
                           f"{low}{name}{high}")


def check_seed(name: str, value) -> int:
    """A random seed: what ``torch.Generator.manual_seed`` takes, an int of 64 bits."""
    return check_int(name, value, minimum=0, maximum=2 ** 64 - 1)


def check_optional_int(name: str, value, *, minimum: int | None = None) -> int | None:
    """``check_int`` for arguments where None means "not set" (e.g. no memory budget)."""
    return None if value is None else check_int(name, value, minimum=minimum)


def check_float(name: str, value, *, minimum: float | None = None,
                maximum: float | None = None) -> float:
    """``value`` as a finite Python float in ``[minimum, maximum]``; ints are fine, NaN, inf,
    bools and strings are not (a NaN guidance scale, for one, silently turns guidance off)."""
    if isinstance(value, bool) or isinstance(value, str):
        raise FiseditError(f"{name} must be a number, got {_describe(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FiseditError(f"{name} must be a number, got {_describe(value)}") from None
    if not math.isfinite(number):
        raise FiseditError(f"{name} must be a finite number, got {number}")
    _check_range(name, number, minimum, maximum)
    return number


def check_inputs_dict(name: str, inputs) -> None:
    """The U-Net's keyword inputs, as a dict (what ``unet(**inputs)`` takes)."""
    if not isinstance(inputs, dict):
        raise FiseditError(f"{name} must be a dict of the U-Net's keyword inputs, as for "
                           f"unet(**inputs), got {type(inputs).__name__}")


def guides(guidance_scale: float) -> bool:
    """Whether diffusers' pipelines run classifier-free guidance at ``guidance_scale``: only
    above 1 (``do_classifier_free_guidance``); every scale <= 1 runs the conditional
    prediction alone, and then the unconditional (negative) branch does not exist."""
    return guidance_scale > 1


def check_guidance_scale(name: str, value) -> float:
    """A classifier-free guidance scale: a finite number >= 0 (``check_float``).

    Diffusers guides only above 1 (``guides``) and runs every scale <= 1 without guidance,
    so 0 to 1 mean "none" (0 is the usual way to say it, e.g. for SDXL-Turbo). A negative
    scale, guidance away from the prompt by the formula, would silently mean "none" too, so
    it is refused."""
    number = check_float(name, value)
    if number < 0:
        raise FiseditError(
            f"{name} {number} is negative: diffusers applies classifier-free guidance only "
            f"above 1 and runs every scale <= 1 without it, so it would not guide away from "
            f"the prompt; pass a scale above 1 to guide (e.g. 7.5), or 0 to 1 for no guidance")
    return number


def check_bool(name: str, value) -> None:
    """A flag: True or False only (a string such as "no" is truthy, so it is no flag)."""
    if not isinstance(value, bool):
        raise FiseditError(f"{name} must be True or False, got {_describe(value)}")


def check_choice(name: str, value, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise FiseditError(f"{name} must be one of {', '.join(map(repr, choices))}, "
                           f"got {value!r}")


def check_prompt(name: str, value, *, optional: bool = False) -> None:
    """One text prompt: a str (None too where ``optional``). Lists are refused: a session edits
    one image, so a batch of prompts is several sessions."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        hint = ("; a session generates and edits one image: run one EditSession per prompt"
                if isinstance(value, (list, tuple)) else "")
        raise FiseditError(f"{name} must be one str, got {_describe(value)}{hint}")


def check_no_cross_attention_kwargs(value) -> None:
    """``cross_attention_kwargs`` (attention processor options) would be dropped by the
    compiled graphs, which run the U-Net's own attention: refused wherever it can be passed
    (an empty dict, which asks for nothing, is taken as None)."""
    if value is None or (isinstance(value, dict) and not value):
        return
    keys = f" {sorted(map(str, value))}" if isinstance(value, dict) else ""
    backend = ("record and edit through the torch.compile backend (fc.recording / "
               "fc.editing), which compiles the U-Net call with them")
    if isinstance(value, dict) and "gligen" in value:
        raise FiseditError(
            f"cross_attention_kwargs{keys}: GLIGEN's grounding boxes and embeddings are not "
            "inputs of the engine's captured graphs, which would run without them; "
            f"{backend} (exact, with its tensors free to change from the recording to an "
            "edit, but with little speedup: GLIGEN's fusers then run dense in edits)")
    raise FiseditError(
        f"cross_attention_kwargs{keys} (attention processor options such as a LoRA scale) "
        "are not supported here: the compiled graphs run the U-Net's own attention without "
        "them; fuse LoRA weights into the U-Net (pipe.fuse_lora()), or "
        f"{backend} as long as its numbers (a scale) stay the same for the whole generation")


def some_names(names: list[str], shown: int) -> str:
    """The first ``shown`` of ``names`` and how many more, for a message that would otherwise
    list dozens (a U-Net's changed weights, its float attributes)."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
