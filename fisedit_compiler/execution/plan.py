"""The mask plan: one effective mask per U-Net level, made of whole tiles, and its index tables.

A plan is built once per edit mask and read by every sparse op of every step. For each level
(the distinct spatial sizes of the U-Net, finest first) it holds:

* ``active``: the effective mask ``[H, W]``;
* ``pixels``: the flat pixel indices of the active positions in *compact order* (tile-major:
  active tiles in row-major order, then row-major inside the tile, out-of-image positions
  skipped); every compact tensor lists its positions in this order;
* ``position``: the inverse map, pixel index -> compact position, -1 where inactive;
* ``tiles``: the active tile coordinates ``[n, 2]``.

A dense level (active fraction above ``dense_threshold``, or below such a level) keeps every
pixel in plain row-major order, so its compact tensors are ordinary dense tensors.

How the masks are made (DESIGN section 3): the latent mask is dilated, then quantized to the
level-0 tile grid; each lower level takes the positions that nearest-neighbour upsampling reads
from it (so an upsample into an active tile reads only active positions, and pooling by two for
the usual U-Net), and is quantized to its own grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import FiseditError


@dataclass
class LevelPlan:
    index: int
    size: tuple[int, int]
    tile: int
    dense: bool
    active: torch.Tensor          # bool [H, W]
    pixels: torch.Tensor          # int64 [P]
    position: torch.Tensor        # int64 [H * W], -1 where inactive
    tiles: torch.Tensor           # int64 [n, 2] (tile row, tile column)
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return int(self.pixels.numel())

    @property
    def fraction(self) -> float:
        return self.count / (self.size[0] * self.size[1])

    @property
    def tile_grid(self) -> tuple[int, int]:
        return (math.ceil(self.size[0] / self.tile), math.ceil(self.size[1] / self.tile))

    def tile_ids(self) -> torch.Tensor:
        """Row-major ids of the active tiles in the level's tile grid (memoised)."""
        return self.table("tile_ids", lambda: self.tiles[:, 0] * self.tile_grid[1]
                          + self.tiles[:, 1])

    def table(self, key, build):
        """A per-plan memo of index tables (built once per mask, kept on the plan's device)."""
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]


class MaskPlan:
    """Effective masks and index tables for one edit mask; see the module docstring."""

    def __init__(self, mask: torch.Tensor, levels: list[tuple[int, int]], tiles: list[int],
                 dilation: int, dense_threshold: float | list[float], device=None):
        mask = validate_mask(mask, levels[0])
        device = device or mask.device
        # Planned on the host (small index work on a mask that may come from the device, e.g.
        # an automatic edit mask); the tables move to ``device`` once, in _level_plan.
        mask = mask.cpu()
        self.raw = mask.to(device)
        self.raw_fraction = float(mask.float().mean())
        self.dilation = dilation
        thresholds = (list(dense_threshold) if isinstance(dense_threshold, (list, tuple))
                      else [dense_threshold] * len(levels))
        self.dense_threshold = thresholds
        self.levels: list[LevelPlan] = []
        self.memo: dict = {}     # per-plan runtime state (captured CUDA graphs), see engine
        current = _dilate(mask, dilation)
        dense = False
        for index, (size, tile) in enumerate(zip(levels, tiles)):
            if index > 0:
                current = _cover_for_upsample(current, size)
            current = _quantize(current, tile)
            fraction = float(current.float().mean())
            dense = dense or fraction > thresholds[index]
            self.levels.append(_level_plan(index, size, tile, dense, current, device))

    @property
    def empty(self) -> bool:
        return self.levels[0].count == 0

    @property
    def full(self) -> bool:
        return all(level.dense for level in self.levels)

    @property
    def level_sizes(self) -> list[tuple[int, int]]:
        return [level.size for level in self.levels]

    def fractions(self) -> list[float]:
        return [level.fraction for level in self.levels]

    def __getitem__(self, level: int) -> LevelPlan:
        return self.levels[level]

    def __repr__(self) -> str:
        parts = ", ".join(f"L{l.index} {l.size[0]}x{l.size[1]} "
                          f"{'dense' if l.dense else f'{l.fraction:.1%}'}" for l in self.levels)
        return f"MaskPlan(raw {self.raw_fraction:.1%}; {parts})"


def validate_mask(mask, size: tuple[int, int]) -> torch.Tensor:
    """Check an edit mask: a bool tensor (or array) of shape ``size`` at latent resolution."""
    if not isinstance(mask, torch.Tensor):
        try:
            mask = torch.as_tensor(mask)
        except Exception as error:
            raise FiseditError(
                f"the edit mask must be a bool tensor or array of shape {size}, got "
                f"{type(mask).__name__}") from error
    if mask.dtype != torch.bool:
        raise FiseditError(
            f"the edit mask must have dtype bool, got {mask.dtype}; convert it with "
            "mask > 0.5 (or mask.bool() for 0/1 values)")
    if mask.dim() != 2:
        raise FiseditError(
            f"the edit mask must be 2-D [H, W] at latent resolution {size}, got shape "
            f"{tuple(mask.shape)}; drop batch and channel dimensions")
    if tuple(mask.shape) != tuple(size):
        height, width = size
        factor = mask.shape[0] / height if height else 0.0
        whole_factor = factor > 1 and factor.is_integer() and factor == mask.shape[1] / width
        hint = (f"; it looks like an image-resolution mask ({factor:g}x the latent): "
                f"downsample it to {height}x{width}, e.g. "
                f"F.max_pool2d(mask[None].float(), {factor:g})[0] > 0"
                ) if whole_factor else ""
        raise FiseditError(
            f"the edit mask has shape {tuple(mask.shape)} but the latent is {height}x{width}"
            f"{hint}")
    return mask


def load_mask_png(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A bool edit mask at latent ``size`` from a PNG (white = edit) at latent resolution or an
    integer multiple of it (the image size); any edited pixel marks its latent pixel (max
    pooling, as FISEdit does)."""
    import numpy as np
    from PIL import Image

    try:
        image = np.asarray(Image.open(path).convert("L"))
    except OSError as error:
        raise FiseditError(f"cannot read the mask {path}: {error}") from None
    mask = torch.from_numpy(image > 127)
    height, width = size
    if mask.shape[0] % height or mask.shape[1] % width or \
            mask.shape[0] // height != mask.shape[1] // width:
        raise FiseditError(
            f"the mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels; it must be the image "
            f"size or the latent size {width}x{height} (or an integer multiple of it)")
    factor = mask.shape[0] // height
    return F.max_pool2d(mask[None, None].float(), factor)[0, 0] > 0


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    grown = F.max_pool2d(mask[None, None].float(), 2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0] > 0


def _cover_for_upsample(upper: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The lower-level mask that nearest upsampling to ``upper``'s size reads from."""
    height, width = upper.shape
    rows = (torch.arange(height) * size[0]) // height
    cols = (torch.arange(width) * size[1]) // width
    lower = torch.zeros(size, dtype=torch.bool)
    ys, xs = torch.nonzero(upper, as_tuple=True)
    lower[rows[ys], cols[xs]] = True
    # Strided convolutions map the other way (lower pixel y reads upper rows near 2y), which
    # needs no coverage: their halos read recorded values.
    return lower


def _quantize(mask: torch.Tensor, tile: int) -> torch.Tensor:
    height, width = mask.shape
    grid = F.max_pool2d(mask[None, None].float(), tile, stride=tile, ceil_mode=True)[0, 0] > 0
    return grid.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:height, :width]


def _level_plan(index, size, tile, dense, active, device) -> LevelPlan:
    height, width = size
    grid_h, grid_w = math.ceil(height / tile), math.ceil(width / tile)
    if dense:
        active = torch.ones(size, dtype=torch.bool)
        pixels = torch.arange(height * width)
        tiles = torch.stack(torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w),
                                           indexing="ij"), -1).reshape(-1, 2)
    else:
        tile_active = active[::tile, ::tile]
        tiles = torch.nonzero(tile_active)
        pixels = _tile_major_pixels(tiles, tile, size)
    position = torch.full((height * width,), -1, dtype=torch.long)
    position[pixels] = torch.arange(pixels.numel())
    return LevelPlan(index, size, tile, dense, active.to(device), pixels.to(device),
                     position.to(device), tiles.to(device))


def tile_slots(tiles: torch.Tensor, tile: int, size: tuple[int, int]) -> torch.Tensor:
    """Flat pixel index of every slot of every tile ``[n * tile * tile]``, -1 outside the image."""
    height, width = size
    offsets = torch.arange(tile, device=tiles.device)
    rows = tiles[:, :1, None] * tile + offsets[None, :, None]     # [n, tile, 1]
    cols = tiles[:, 1:, None] * tile + offsets[None, None, :]     # [n, 1, tile]
    inside = (rows < height) & (cols < width)
    return torch.where(inside, rows * width + cols, -1).reshape(-1)


def _tile_major_pixels(tiles, tile, size) -> torch.Tensor:
    slots = tile_slots(tiles, tile, size)
    return slots[slots >= 0]


def mask_from_box(box: str, size: tuple[int, int]) -> torch.Tensor:
    """A bool mask from ``"x0,y0,x1,y1"`` in fractions of the width and height."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box.split(","))
    except ValueError:
        raise FiseditError(f"--mask-box must be x0,y0,x1,y1 as fractions in [0, 1], got {box!r}") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise FiseditError(f"--mask-box needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box!r}")
    height, width = size
    mask = torch.zeros(size, dtype=torch.bool)
    mask[int(y0 * height):max(int(y0 * height) + 1, round(y1 * height)),
         int(x0 * width):max(int(x0 * width) + 1, round(x1 * width))] = True
    return mask


def blob_mask(size: tuple[int, int], area: float) -> torch.Tensor:
    """One centred square covering ``area`` of the latent (rounded to whole pixels)."""
    height, width = size
    side_h = max(1, min(height, round(math.sqrt(area) * height)))
    side_w = max(1, min(width, round(math.sqrt(area) * width)))
    mask = torch.zeros(size, dtype=torch.bool)
    top, left = (height - side_h) // 2, (width - side_w) // 2
    mask[top:top + side_h, left:left + side_w] = True
    return mask


def scattered_mask(size: tuple[int, int], area: float, blobs: int = 6, seed: int = 0):
    """``blobs`` squares at seeded random places, together covering about ``area``."""
    height, width = size
    gen = torch.Generator().manual_seed(seed)
    side = max(1, round(math.sqrt(area * height * width / blobs)))
    mask = torch.zeros(size, dtype=torch.bool)
    for _ in range(blobs):
        top = int(torch.randint(0, max(1, height - side + 1), (1,), generator=gen))
        left = int(torch.randint(0, max(1, width - side + 1), (1,), generator=gen))
        mask[top:top + side, left:left + side] = True
    return mask
