"""Edit-mask estimators: where will an edit towards a new prompt change the image?

Each estimator turns evidence about the edit into a score map ``[H, W]`` at latent resolution;
``binarize`` makes the mask from it (an optional box smoothing and a cut relative to Otsu's,
an opening, both scaled to the latent size, an optional dilation); ``is_global`` and
``contrast_is_global`` detect global changes, which are planned dense. The estimators are named
choices of ``EditSession.edit(mask_estimator=...)`` and of the CLI; ``ESTIMATORS`` is their one
registry:

* ``"probe"``: FISEdit's Target Area Capture, the baseline. The edit runs ``probe_steps``
  dense steps with the new prompt; the mask comes from their latent difference to the recorded
  trajectory (each step's difference normalised to [0, 1], summed). Cost: the probe steps,
  which also run at dense speed before any sparse step.
* ``"noise-contrast"`` (DiffEdit): at a few steps of the recorded trajectory, the new prompt's
  noise prediction on the original's recorded latents against the original prompt's (recorded,
  free). All steps go in one batched U-Net call of the conditional inputs only. Known before
  step 0, so the edit runs sparse from its first step. The contrast is box-smoothed before
  Otsu's cut (it is speckled at the pure-noise step), and a median pixel whose prediction
  changes by more than ``GLOBAL_CONTRAST`` marks a global change.
* ``"x0"``: the new prompt's estimate of the final latents (the x0 prediction) at those
  steps against the original's final latents.
* ``"cross-attention"``: the cross-attention of the tokens that differ between the two prompts
  (both prompts' conditional inputs in the same call, at the same steps).
* ``"noise-contrast+cross-attention"``: the noise contrast times the square root of the
  attention map (both normalised): where both agree.

FISEdit's 3x3 opening was made for SD's 64x64 latents (512 px); ``opening_size`` scales it
with the latent size (3 at 64, 5 at 128, none at 32 or below): a fixed 3x3 square erased whole
objects of the 16x16-latent shapes model, 2x2 latent pixels each (105 of 200 benchmark masks
came out empty, ``benchmarks/edit_quality.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..checks import check_float, check_int
from ..errors import FiseditError

# A change is global (background, style, lighting) when more than GLOBAL_AREA of the latent
# reaches GLOBAL_LEVEL of the change evidence's peak (the noise contrast; the probe's latent
# difference for the probe): the edit is then planned dense, since a partial mask of a global
# change keeps only its strongest part and breaks the image. On 100 held-out pairs of the
# shapes model (pairs 500-599) a level of 0.1 separated background changes from object edits
# in 99 of 100 (background: 0.5-1.0 of the latent, object edits: at most 0.52), but it called
# the shipped demo's edit (a large circle changing colour: 0.79 of the latent over 0.1 of the
# peak, 0.13 over 0.2) global, so the demo ran dense; at 0.2 the demo is local.
GLOBAL_LEVEL, GLOBAL_AREA = 0.2, 0.5
# At 0.2 the peak rule alone misses background changes whose contrast has a sharp peak where
# the model also redraws an object (the peak is 5-10x the background's level): 6 of 20 on
# pairs 500-599, 5 of 20 on 600-699. The noise contrast (mean over channels and contrast steps
# of |new - old|, in the units of the U-Net's prediction) at the median latent pixel does not
# depend on the peak: background changes 0.23-0.75, object edits at most 0.18 (the demo 0.11)
# on those 200 pairs (benchmarks/tune_mask.py). A one-call estimator's change is global when
# either rule says so. The level is in prediction units, measured on the shapes model only.
GLOBAL_CONTRAST = 0.2


@dataclass
class Contrast:
    """The evidence the one-call estimators read, at the chosen steps of the recorded trajectory.

    ``samples`` are the recorded U-Net inputs ``x_t`` ``[S, C, H, W]``; ``old`` the recorded
    conditional predictions for the original prompt, ``new`` the new prompt's on the same
    inputs; ``alphas`` the schedulers' cumulative alphas ``[S]`` at those steps (to turn a
    prediction into an x0 estimate); ``final`` the original's final latents ``[1, C, H, W]``;
    ``attention`` the summed cross-attention of the changed tokens ``[H, W]`` (None unless an
    estimator asked for it).
    """
    samples: torch.Tensor
    old: torch.Tensor
    new: torch.Tensor
    alphas: torch.Tensor
    prediction_type: str
    final: torch.Tensor
    attention: torch.Tensor | None = None


@dataclass(frozen=True)
class Estimator:
    """A named mask estimator: ``score(contrast) -> [H, W]`` (None for the probe, whose score
    comes from the probe steps' latent differences), whether it reads attention maps, and the
    share of the steps an edit runs dense with it by default (``EditSession.edit(
    probe_steps=None)``), the mask's cut as a share of Otsu's threshold and whether the score
    is smoothed before the cut (``binarize``)."""
    name: str
    score: Callable[[Contrast], torch.Tensor] | None
    needs_attention: bool = False
    dense_share: float = 0.0
    cut: float = 1.0
    smooth: bool = False

    @property
    def before_step_zero(self) -> bool:
        return self.score is not None

    def dense_steps(self, num_steps: int) -> int:
        """The default dense steps of an edit of ``num_steps`` (the probe needs one at least)."""
        steps = round(self.dense_share * num_steps)
        return min(num_steps - 1, steps if self.before_step_zero else max(1, steps))


def normalised(score: torch.Tensor) -> torch.Tensor:
    """``score`` divided by its maximum (an all-zero map stays zero)."""
    peak = score.max()
    return score / peak if peak > 0 else score


def accumulate(differences: list[torch.Tensor]) -> torch.Tensor:
    """Sum of per-step maps, each normalised first (all-zero steps add nothing)."""
    return sum(normalised(difference.float()) for difference in differences)


def latent_difference(edited: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over channels of ``[N, C, H, W]`` latents: ``[N, H, W]``."""
    return (edited.float() - recorded.float()).abs().mean(dim=1)


def x0_estimate(contrast: Contrast, prediction: torch.Tensor) -> torch.Tensor:
    """The final latents the U-Net's ``prediction`` implies at each step (DDPM algebra)."""
    alpha = contrast.alphas.view(-1, 1, 1, 1).to(prediction.device, torch.float32)
    sample, prediction = contrast.samples.float(), prediction.float()
    if contrast.prediction_type == "v_prediction":
        return alpha.sqrt() * sample - (1 - alpha).sqrt() * prediction
    if contrast.prediction_type == "sample":
        return prediction
    return (sample - (1 - alpha).sqrt() * prediction) / alpha.sqrt()   # epsilon


def noise_contrast_score(contrast: Contrast) -> torch.Tensor:
    return accumulate(list(latent_difference(contrast.new, contrast.old)))


def x0_score(contrast: Contrast) -> torch.Tensor:
    estimate = x0_estimate(contrast, contrast.new)
    return accumulate(list(latent_difference(estimate, contrast.final.expand_as(estimate))))


def cross_attention_score(contrast: Contrast) -> torch.Tensor:
    return contrast.attention


def contrast_and_attention_score(contrast: Contrast) -> torch.Tensor:
    # The square root keeps the attention, diffuse in a small model, from erasing the contrast.
    return normalised(noise_contrast_score(contrast)) * normalised(contrast.attention).sqrt()


# The noise contrast is smoothed by a small box (``smoothing_size``) and cut at Otsu's own
# threshold. Unsmoothed, the contrast at the first step (pure noise) is speckled: the Otsu cut
# keeps only an object's centre (mask area ~5% for ~8% truly changed, object IoU 0.51 on the
# 100 held-out pairs 500-599) and half of it (the cut until session 6: IoU 0.655) lets in
# speckle around the object (masks 13% against 9% truly changed on the benchmark pairs). The
# box averages the speckle away before the cut, so one cut fits both the centre and the rim:
# object IoU 0.760 on 500-599 and 0.732 on pairs 600-699 (not used for tuning; the half cut:
# 0.609); cuts from 0.9 to 1.1 of Otsu's are within 0.015, hysteresis and a min or geometric
# mean over the contrast steps add nothing (RESULTS.md, session 6). The others keep Otsu's cut
# (x0 and the attention maps are diffuse: half the cut takes most of the latent); the contrast
# times attention keeps the half cut, unsmoothed (not re-measured: the tuning cache has no
# attention maps).
ESTIMATORS = {estimator.name: estimator for estimator in (
    Estimator("probe", None, dense_share=0.2),   # FISEdit's k = 10 of 50 steps
    Estimator("noise-contrast", noise_contrast_score, cut=1.0, smooth=True),
    Estimator("x0", x0_score),
    Estimator("cross-attention", cross_attention_score, needs_attention=True),
    Estimator("noise-contrast+cross-attention", contrast_and_attention_score,
              needs_attention=True, cut=0.5),
)}
DEFAULT_ESTIMATOR = "noise-contrast"


# Where in the recorded trajectory the one-call estimators look, as fractions of the run: the
# first step (pure noise: where the two prompts lay out different things) and one a fifth in.
# Picked on 100 held-out pairs (500-599) from single steps and pairs between 0 and 0.9: later
# steps lose added objects (IoU of adds 0.49 at step 0, 0.01 at 0.9).
CONTRAST_FRACTIONS = (0.0, 0.2)


def contrast_steps(num_steps: int, fractions: tuple[float, ...] = CONTRAST_FRACTIONS) -> list[int]:
    """The trajectory steps at ``fractions`` of the run (0 = the first, pure-noise step)."""
    return sorted({min(num_steps - 1, round(f * num_steps)) for f in fractions})


# ----------------------------------------------------------------------------- thresholding

def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance.

    Values are histogrammed over [min, max]; the returned threshold is the upper edge of the
    last bin of the lower class, so ``values > threshold`` is the upper class.
    """
    _check_scores("otsu_threshold", values)
    # One bin has no cut between two classes.
    bins = check_int("otsu_threshold's bins", bins, minimum=2)
    values = values.flatten().float().cpu()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high  # constant input: nothing is above the threshold
    histogram = torch.histc(values, bins=bins, min=low, max=high).double()
    probability = histogram / histogram.sum()
    centers = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    centers = (centers[:-1] + centers[1:]) / 2
    weight0 = probability.cumsum(0)                       # lower class weight per cut
    mean0_sum = (probability * centers).cumsum(0)
    total_mean = mean0_sum[-1]
    weight1 = 1 - weight0
    valid = (weight0 > 0) & (weight1 > 0)
    between = torch.zeros_like(weight0)
    between[valid] = (total_mean * weight0[valid] - mean0_sum[valid]) ** 2 / (
        weight0[valid] * weight1[valid])
    cut = int(torch.argmax(between))
    return low + (high - low) * (cut + 1) / bins


def _check_size(name: str, size) -> int:
    """An odd square side (an even one would shift the result by half a pixel and grow it by
    one: 16x16 came back 17x17)."""
    size = check_int(f"{name}'s size", size, minimum=1)
    if size % 2 == 0:
        raise FiseditError(f"{name}'s size must be odd (a square centred on each pixel), got "
                           f"{size}; pass {size + 1} (2 * n + 1 grows by n pixels)")
    return size


def _check_square(name: str, mask, size) -> int:
    """A bool 2-D mask with pixels and an odd square side; returns the side, clipped to twice
    the mask's side less one: from any pixel such a square covers the whole mask, so a larger
    one (a config's dilation of 10**9, meaning "everything reachable") gives the same result
    and costs no more than that one."""
    _check_map(name, mask, "mask", "; pass a single mask (mask[0] of a batch)")
    if mask.dtype != torch.bool:
        raise FiseditError(f"{name} takes a bool mask, got {mask.dtype}; convert it with "
                           "mask > 0.5 (or mask.bool() for 0/1 values)")
    return min(_check_size(name, size), 2 * max(mask.shape) - 1)


def _check_map(name: str, value, what: str, hint: str = "") -> None:
    """``value`` is one 2-D tensor ``[H, W]`` with pixels (a mask or a score map)."""
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or 0 in value.shape:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise FiseditError(f"{name} takes one 2-D {what} [H, W] with pixels, got {shape}{hint}")


def _check_scores(name: str, score: torch.Tensor) -> None:
    """Scores with values, all finite (a U-Net's NaN would otherwise cut at random)."""
    if not isinstance(score, torch.Tensor) or not score.numel():
        what = list(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
        raise FiseditError(f"{name} takes a tensor of scores with values, got {what}")
    if not bool(torch.isfinite(score).all()):
        raise FiseditError(f"{name}'s scores are not all finite (NaN or inf): the evidence "
                           "they came from overflowed; there is no cut through them")


def erode(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary erosion by a size x size square (pixels outside the image do not erode);
    ``size`` odd."""
    size = _check_square("erode", mask, size)
    x = mask[None, None].float()
    return (-F.max_pool2d(-x, size, stride=1, padding=size // 2))[0, 0] > 0.5


def dilate(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary dilation by a size x size square (``size`` odd: 2 * n + 1 grows by n pixels)."""
    size = _check_square("dilate", mask, size)
    x = mask[None, None].float()
    return F.max_pool2d(x, size, stride=1, padding=size // 2)[0, 0] > 0.5


def opening_size(height: int) -> int:
    """The odd opening square for a latent of ``height`` rows: FISEdit's 3 at 64, scaled."""
    return max(1, 2 * round(1.5 * height / 64) - 1)


def opening(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Erosion then dilation: removes specks smaller than the square, keeps larger regions."""
    return dilate(erode(mask, size), size)


def smoothing_size(height: int) -> int:
    """The odd box that smooths a score of ``height`` rows before the cut: 3 up to 32 rows (the
    shapes model's 16, where it was measured), then the opening's square plus two (5 at 64, 7
    at 128): about an object's rim, smaller than the smallest objects."""
    return opening_size(height) + 2


def box_smooth(score: torch.Tensor, size: int = 3) -> torch.Tensor:
    """The mean of ``score`` (``[H, W]``) over a size x size box around each pixel (edges
    replicated, so a change at the border keeps its level); ``size`` odd."""
    _check_map("box_smooth", score, "score")
    size = _check_size("box_smooth", size)
    if size == 1:
        return score
    pad = size // 2
    x = F.pad(score[None, None].float(), (pad, pad, pad, pad), mode="replicate")
    return F.avg_pool2d(x, size, stride=1)[0, 0]


def is_global(evidence: torch.Tensor) -> bool:
    """Whether a change spreads over the image (see ``GLOBAL_LEVEL``): then plan it dense."""
    return bool((normalised(evidence.float()) > GLOBAL_LEVEL).float().mean() > GLOBAL_AREA)


def median_contrast(contrast: Contrast) -> float:
    """The noise contrast at the median latent pixel: ``|new - old|`` averaged over channels
    and contrast steps, in the prediction's units (see ``GLOBAL_CONTRAST``)."""
    difference = (contrast.new.float() - contrast.old.float()).abs().mean(dim=(0, 1))
    return float(difference.median())


def contrast_is_global(contrast: Contrast) -> bool:
    """Whether the one-call estimators' contrast shows a global change: more than half the
    latent near the contrast's peak (``is_global``) or a median pixel that changes by more
    than ``GLOBAL_CONTRAST``."""
    return (is_global(noise_contrast_score(contrast))
            or median_contrast(contrast) > GLOBAL_CONTRAST)


def binarize(score: torch.Tensor, cut: float = 1.0, dilation: int = 0,
             smooth: bool = False) -> torch.Tensor:
    """The bool ``[H, W]`` mask from a score map: smoothed by a box scaled to the latent size
    (``smooth``), above ``cut`` times Otsu's threshold, opened by a square scaled to the latent
    size, then dilated by ``dilation`` latent pixels."""
    cut = check_float("binarize's cut", cut, minimum=0.0)
    dilation = check_int("binarize's dilation", dilation, minimum=0)
    _check_map("binarize", score, "score")
    _check_scores("binarize", score)
    score = score.float()
    if smooth:
        score = box_smooth(score, smoothing_size(score.shape[0]))
    low = float(score.min())
    mask = score > low + cut * (otsu_threshold(score) - low)
    mask = opening(mask, opening_size(mask.shape[0]))
    if dilation > 0:
        mask = dilate(mask, 2 * dilation + 1)
    return mask
