"""A simple checker: does an image show what its scene caption says?

For each pixel, the nearest palette colour (six object colours, three backgrounds) within
``TOLERANCE`` (0-255 RGB distance; the palette's closest pair is 105 apart, so a pixel is only
ever near one colour, and anti-aliased mixtures of distant colours count as "unknown").
Then, per scene:

* ``background``: the most frequent colour in the image is the caption's background;
* per object, from the largest 8-connected blob of the object's colour: ``colour``
  (present: the blob has at least ``MIN_AREA`` pixels at 64 px, scaled by area at other
  sizes). Around the blob, each pixel's coverage is its position on the segment from the
  background colour to the object colour (how anti-aliasing and blur mix them); the
  coverage-weighted centroid gives ``position`` (the named cell of the 3x3 grid), and
  ``shape`` is the one of the four shapes which, drawn at that centroid with the same area,
  overlaps the coverage best (soft IoU); ``size``: the area is nearer, in log terms, to the
  named shape's large area than to its small one (or the reverse);
* ``no_extra``: no colour that the caption does not name forms a blob of ``MIN_AREA``.

An object attribute counts as wrong if the object is missing. ``scene`` is every check at
once. Rendered ground truth passes all of them (tests check this), noise passes almost none.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from . import render

PALETTE = render.COLOURS + render.BACKGROUNDS
TOLERANCE = 70.0
MIN_AREA = 12.0        # pixels at 64 px
ATTRIBUTES = ("colour", "position", "shape", "size")
SCENE_CHECKS = ("background", "no_extra", "scene")


def as_uint8(image) -> np.ndarray:
    """``[H, W, 3]`` uint8 from a PIL image, an ``[H, W, 3]`` array (uint8, or floats in
    [0, 1] as pipelines return with ``output_type="np"``) or a ``[3, H, W]`` tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.dim() == 3 and image.shape[0] == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    return image


def classify(image) -> torch.Tensor:
    """``[H, W]`` int64: the index in PALETTE of each pixel's nearest colour, -1 if none is
    within TOLERANCE."""
    pixels = torch.from_numpy(as_uint8(image).astype(np.float32))
    palette = torch.tensor([render.RGB[c] for c in PALETTE], dtype=torch.float32)
    distance = torch.cdist(pixels.reshape(-1, 3), palette).reshape(*pixels.shape[:2], -1)
    nearest, index = distance.min(dim=-1)
    return torch.where(nearest <= TOLERANCE, index, torch.full_like(index, -1))


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of a bool ``[H, W]`` mask (empty if none)."""
    if not bool(mask.any()):
        return mask
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w) * mask
    keep = mask.float()
    while True:   # propagate the largest label through each component
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0] * keep
        if torch.equal(grown, labels):
            break
        labels = grown
    values, counts = torch.unique(labels[mask], return_counts=True)
    return labels == values[torch.argmax(counts)]


@lru_cache(maxsize=None)
def expected_area(shape: str, size: str, image_size: int) -> float:
    """Pixels covered by a shape of a size (anti-aliased coverage summed) at ``image_size``."""
    obj = render.SceneObject(shape, "red", size, "center")
    geometry = torch.tensor([[*obj.centre, obj.radius]])
    shape_id = torch.tensor([render.SHAPES.index(shape)])
    return float(render.coverage(shape_id, geometry, image_size).sum())


def _soft_blob(pixels: torch.Tensor, blob: torch.Tensor, colour: str,
               background: str) -> torch.Tensor:
    """Per-pixel coverage in [0, 1] of the object around ``blob``: each pixel's position on
    the segment from the background colour to the object colour (how renderers anti-alias,
    and what blur does), within two pixels of the blob. Its sum is the object's area and
    its weighted mean the centroid, robust to blur and noise at the blob's edge."""
    if colour == background:   # the object's colour fills most of the image
        return blob.float()
    c = torch.tensor(render.RGB[colour], dtype=torch.float32)
    b = torch.tensor(render.RGB[background], dtype=torch.float32)
    direction = c - b
    alpha = ((pixels - b) @ direction / direction.dot(direction)).clamp(0, 1)
    near = F.max_pool2d(blob[None, None].float(), 5, stride=1, padding=2)[0, 0] > 0
    return alpha * near


def _shape_scores(alpha: torch.Tensor, cx: float, cy: float) -> torch.Tensor:
    """Soft IoU of the object's coverage with each of the four shapes drawn at (cx, cy)
    (pixels) with the same area."""
    size = alpha.shape[0]
    area = float(alpha.sum())
    radii = []
    for shape in render.SHAPES:   # area scales with radius squared
        unit = expected_area(shape, "large", size) / render.SIZE_RADIUS["large"] ** 2
        radii.append(math.sqrt(area / unit))
    geometry = torch.tensor([[(cx + 0.5) / size, (cy + 0.5) / size, r] for r in radii],
                            dtype=torch.float32)
    templates = render.coverage(torch.arange(len(render.SHAPES)), geometry, size)
    intersection = torch.minimum(templates, alpha).flatten(1).sum(1)
    union = torch.maximum(templates, alpha).flatten(1).sum(1).clamp(min=1e-6)
    return intersection / union


def check(image, scene: render.Scene | str) -> dict:
    """Check one image against a scene (or its caption); see the module docstring."""
    if isinstance(scene, str):
        scene = render.parse_caption(scene)
    pixels = torch.from_numpy(as_uint8(image).astype(np.float32))
    labels = classify(pixels.numpy().astype(np.uint8))
    size = labels.shape[0]
    min_area = MIN_AREA * (size / 64) ** 2
    counts = torch.bincount(labels.flatten() + 1, minlength=len(PALETTE) + 1)[1:]
    background = PALETTE[int(torch.argmax(counts))]
    objects = []
    for obj in scene.objects:
        blob = largest_component(labels == PALETTE.index(obj.colour))
        alpha = _soft_blob(pixels, blob, obj.colour, background)
        area = float(alpha.sum())
        result = {"colour": float(blob.sum()) >= min_area and area > 0, "position": False,
                  "shape": False, "size": False, "area": area, "centroid": None,
                  "detected_shape": None}
        if result["colour"]:
            grid = torch.arange(size, dtype=torch.float32)
            cy = float((alpha.sum(1) * grid).sum()) / area
            cx = float((alpha.sum(0) * grid).sum()) / area
            row, col = min(max(int(cy * 3 // size), 0), 2), min(max(int(cx * 3 // size), 0), 2)
            detected = render.SHAPES[int(torch.argmax(_shape_scores(alpha, cx, cy)))]
            small = expected_area(obj.shape, "small", size)
            large = expected_area(obj.shape, "large", size)
            result.update(
                position=(row, col) == render.cell_of(obj.position), centroid=(cx, cy),
                shape=detected == obj.shape, detected_shape=detected,
                size=(area >= math.sqrt(small * large)) == (obj.size == "large"))
        objects.append(result)
    named = {o.colour for o in scene.objects}
    extra = [c for c in render.COLOURS if c not in named
             and float(largest_component(labels == PALETTE.index(c)).sum()) >= min_area]
    out = {"objects": objects, "background": background == scene.background,
           "detected_background": background, "no_extra": not extra, "extra_colours": extra}
    out["scene"] = bool(out["background"] and out["no_extra"]
                        and all(o[a] for o in objects for a in ATTRIBUTES))
    return out


def check_many(images, scenes) -> list[dict]:
    return [check(image, scene) for image, scene in zip(images, scenes)]


def accuracy(results: list[dict]) -> dict:
    """Per-attribute accuracy: object attributes over all objects, scene checks over images;
    ``objects`` is the fraction of objects with all four attributes right."""
    objects = [o for r in results for o in r["objects"]]
    out = {"images": len(results), "objects_total": len(objects)}
    for attr in ATTRIBUTES:
        out[attr] = float(np.mean([o[attr] for o in objects])) if objects else 0.0
    out["objects"] = float(np.mean([all(o[a] for a in ATTRIBUTES) for o in objects])) \
        if objects else 0.0
    for key in SCENE_CHECKS:
        out[key] = float(np.mean([r[key] for r in results])) if results else 0.0
    return out
