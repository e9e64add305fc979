"""Target Area Capture (FISEdit): the edit mask from the latent difference of k probe steps.

FISEdit's released code sums, over the k probe steps, each step's latent difference to the
recorded trajectory (normalised to [0, 1] per step), Otsu-thresholds the sum and opens the
result to remove specks. We do the same with a mean over channels (FISEdit sums; the scale
cancels in the per-step normalisation), an opening and an optional dilation, in torch only.

FISEdit's 3x3 opening was made for SD's 64x64 latents (512 px); the opening here scales with
the latent size (``opening_size``: 3 at 64, 5 at 128, none at 32 or below). A fixed 3x3 square
erased whole objects of the 16x16-latent shapes model, 2x2 latent pixels each: on 200
benchmark edits it left 105 masks empty (``benchmarks/edit_quality.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_difference(edited: torch.Tensor, recorded: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference over channels of one step's ``[1, C, H, W]`` latents: ``[H, W]``."""
    return (edited.float() - recorded.float()).abs().mean(dim=1)[0]


def accumulate(differences: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the per-step differences, each divided by its maximum (all-zero steps add nothing)."""
    total = torch.zeros_like(differences[0])
    for difference in differences:
        peak = difference.max()
        if peak > 0:
            total = total + difference / peak
    return total


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut that maximises the between-class variance.

    Values are histogrammed over [min, max]; the returned threshold is the upper edge of the
    last bin of the lower class, so ``values > threshold`` is the upper class.
    """
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


def erode(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary erosion by a size x size square (pixels outside the image do not erode)."""
    x = mask[None, None].float()
    return (-F.max_pool2d(-x, size, stride=1, padding=size // 2))[0, 0] > 0.5


def dilate(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary dilation by a size x size square."""
    x = mask[None, None].float()
    return F.max_pool2d(x, size, stride=1, padding=size // 2)[0, 0] > 0.5


def opening_size(height: int) -> int:
    """The odd opening square for a latent of ``height`` rows: FISEdit's 3 at 64, scaled."""
    return max(1, 2 * round(1.5 * height / 64) - 1)


def opening(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Erosion then dilation: removes specks smaller than the square, keeps larger regions."""
    return dilate(erode(mask, size), size)


def capture_mask(differences: list[torch.Tensor], dilation: int = 0) -> torch.Tensor:
    """The bool ``[H, W]`` edit mask from the probe steps' latent differences."""
    total = accumulate(differences)
    mask = total > otsu_threshold(total)
    mask = opening(mask, opening_size(mask.shape[0]))
    if dilation > 0:
        mask = dilate(mask, 2 * dilation + 1)
    return mask
