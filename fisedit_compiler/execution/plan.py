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

How the masks are made (docs/design.md, "Mask plans"): the latent mask is dilated, then quantized to the
level-0 tile grid; each lower level takes the positions that nearest-neighbour upsampling reads
from it (so an upsample into an active tile reads only active positions, and pooling by two for
the usual U-Net), and is quantized to its own grid.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..checks import check_float, check_int, check_seed
from ..errors import FiseditError


# The tensors of a level plan; ``refill`` copies them (then rebuilds every table made from
# them) when a captured step is replayed for another plan of the same capacity bucket.
BASE_TABLES = ("active", "pixels", "position", "tiles", "slots", "counts")


@dataclass(eq=False)
class LevelPlan:
    """One level of a mask plan. The tensors live on the host (``host``); ops read them, and
    the tables built from them, on the plan's device through ``table``.

    A *padded* level (a plan made for a capacity bucket) lists more positions than are active:
    ``capacity`` of them, the first ``count`` the active ones in compact order, the rest
    repeating the first active position (and ``tiles`` repeats the first active tile up to
    ``tile_capacity``). A repeated position computes exactly what the position it repeats
    computes, so every per-position op, and every scatter back into a dense tensor, is right
    without knowing the count; only reductions over positions (group-norm statistics, attention
    over compact keys) must skip them, and they read the counts from ``counts`` (int32
    ``[count, tile_count]`` on the device), so a captured step does not depend on them.
    """

    index: int
    size: tuple[int, int]
    tile: int
    dense: bool
    padded: bool                  # made for a capacity bucket: reductions read ``counts``
    count: int                    # active positions
    tile_count: int               # active tiles
    host: dict                    # the BASE_TABLES on the host
    device: torch.device
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def capacity(self) -> int:
        """Positions in this level's compact tensors (``count`` unless padded)."""
        return int(self.host["pixels"].numel())

    @property
    def tile_capacity(self) -> int:
        return int(self.host["tiles"].shape[0])

    @property
    def fraction(self) -> float:
        return self.count / (self.size[0] * self.size[1])

    @property
    def tile_grid(self) -> tuple[int, int]:
        return (math.ceil(self.size[0] / self.tile), math.ceil(self.size[1] / self.tile))

    # The base tensors on the plan's device: ``active`` bool [H, W]; ``pixels`` the flat pixel
    # of each compact position [capacity]; ``position`` its inverse, pixel -> compact position
    # or -1 [H * W]; ``tiles`` (tile row, tile column) [tile_capacity, 2]; ``slots`` for each
    # compact position its slot among the tiles' tile x tile slots (sparse levels).
    active = property(lambda self: self.table("active", lambda: self.host["active"]))
    pixels = property(lambda self: self.table("pixels", lambda: self.host["pixels"]))
    position = property(lambda self: self.table("position", lambda: self.host["position"]))
    tiles = property(lambda self: self.table("tiles", lambda: self.host["tiles"]))
    slots = property(lambda self: self.table("slots", lambda: self.host["slots"]))
    counts = property(lambda self: self.table("counts", lambda: self.host["counts"]))

    def tile_ids(self) -> torch.Tensor:
        """Row-major ids of the (padded) active tiles in the level's tile grid."""
        return self.table("tile_ids", lambda: self.tiles[:, 0] * self.tile_grid[1]
                          + self.tiles[:, 1])

    def table(self, key, build):
        """``build()`` on the plan's device, built once per plan and kept.

        ``build`` must depend only on this plan's tensors (and constants), and must not
        synchronise with the device: ``refill`` calls it again for another plan's tensors.
        """
        entry = self._tables.get(key)
        if entry is None:
            entry = self._tables[key] = (build, build().to(self.device))
        return entry[1]


@dataclass(frozen=True)
class Bucket:
    """A capacity bucket: the active tiles each level can hold, ``None`` for a dense level.

    Every plan of one bucket has tensors of the same shapes, so one captured edit step serves
    all its masks (``MaskPlan.refill``)."""

    index: int
    tiles: tuple

    def fits(self, tile_counts: list[int]) -> bool:
        return all(capacity is None or count <= capacity
                   for capacity, count in zip(self.tiles, tile_counts))


class MaskPlan:
    """Effective masks and index tables for one edit mask; see the module docstring.

    With ``buckets`` (from ``capacity_buckets``) the plan takes the first bucket that holds
    every level's active tiles, and its levels are padded to the bucket's capacities and dense
    where the bucket's are; a mask that fits no bucket plans every level dense.
    """

    def __init__(self, mask: torch.Tensor, levels: list[tuple[int, int]], tiles: list[int],
                 dilation: int, dense_threshold: float | list[float], device=None,
                 buckets: list[Bucket] | None = None):
        check_levels(levels, tiles, dilation)
        if buckets is not None:
            for bucket in buckets:
                # Checked here, not in Bucket, which does not know the levels: a bucket of
                # fewer capacities would zip the plan down to fewer levels.
                if len(bucket.tiles) != len(levels):
                    raise FiseditError(
                        f"bucket {bucket.index} has {len(bucket.tiles)} capacities "
                        f"{bucket.tiles} but the plan has {len(levels)} levels; make the "
                        "buckets for these levels and tiles with capacity_buckets")
        mask = validate_mask(mask, levels[0])
        device = torch.device(device or mask.device)
        # Planned on the host (small index work on a mask that may come from the device, e.g.
        # an automatic edit mask); ops copy the tables they read to ``device`` once.
        host = mask.cpu().numpy()
        self.raw = mask.to(device)
        self.raw_fraction = float(host.mean())
        self.dilation = dilation
        thresholds = level_thresholds(dense_threshold, len(levels))
        self.dense_threshold = thresholds
        # Runtime state that belongs to this plan and goes with it (docs/design.md, "State and
        # lifetimes"): an exact (unbucketed) plan's captured CUDA graphs, by program
        # (``engine.cuda_graph``). A bucketed plan's graphs belong to the engine instead.
        self.memo: dict = {}
        level_masks = effective_masks(host, levels, tiles, dilation)
        tile_counts = _tile_counts(level_masks, tiles)
        self.bucket = None
        if buckets is not None and tile_counts[0] > 0:
            self.bucket = next((b for b in buckets if b.fits(tile_counts)), None)
        if self.bucket is not None:
            capacities = list(self.bucket.tiles)
            dense_levels = [capacity is None for capacity in capacities]
        else:
            capacities = [None] * len(levels)
            dense_levels, dense = [], buckets is not None and tile_counts[0] > 0
            for active, threshold in zip(level_masks, thresholds):
                dense = dense or float(active.mean()) > threshold
                dense_levels.append(dense)
        self.levels = [_level_plan(index, size, tile, dense, active, capacity, device)
                       for index, (size, tile, dense, active, capacity)
                       in enumerate(zip(levels, tiles, dense_levels, level_masks, capacities))]

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

    def differs_outside(self, new: torch.Tensor, old: torch.Tensor) -> bool:
        """Whether ``new`` and ``old`` (inputs with the latent's positions last) differ
        outside the finest level's active region, where an edit keeps the recorded outputs
        and so would drop the difference. One comparison and one host read."""
        outside = ~self.levels[0].active.to(new.device)
        return bool((new != old)[..., outside].any())

    def __getitem__(self, level: int) -> LevelPlan:
        return self.levels[level]

    def template(self) -> "MaskPlan":
        """A private copy of this plan whose tensors ``refill`` may overwrite."""
        copy = object.__new__(MaskPlan)
        copy.__dict__.update(self.__dict__)
        copy.memo = {}
        copy.levels = [LevelPlan(l.index, l.size, l.tile, l.dense, l.padded, l.count,
                                 l.tile_count,
                                 {key: value.clone() for key, value in l.host.items()},
                                 l.device) for l in self.levels]
        return copy

    def refill(self, other: "MaskPlan") -> None:
        """Make this plan's device tables those of ``other``, a plan of the same bucket, in
        place (same shapes, same addresses): the base tensors are copied from ``other``'s
        host tensors, then every table built from them is rebuilt into its old storage.
        Nothing synchronises with the device."""
        if other.bucket != self.bucket or other.level_sizes != self.level_sizes:
            raise FiseditError("refill needs a plan of the same capacity bucket and levels")
        for mine, theirs in zip(self.levels, other.levels):
            mine.host, mine.count, mine.tile_count = theirs.host, theirs.count, theirs.tile_count
            for key in BASE_TABLES:
                if key in mine._tables:
                    mine._tables[key][1].copy_(theirs.host[key], non_blocking=True)
        for mine in self.levels:
            for key, (build, tensor) in mine._tables.items():
                if key not in BASE_TABLES:
                    tensor.copy_(build())
        self.raw, self.raw_fraction = other.raw, other.raw_fraction

    def __repr__(self) -> str:
        parts = ", ".join(f"L{l.index} {l.size[0]}x{l.size[1]} "
                          f"{'dense' if l.dense else f'{l.fraction:.1%}'}" for l in self.levels)
        bucket = "" if self.bucket is None else f"; bucket {self.bucket.index}"
        return f"MaskPlan(raw {self.raw_fraction:.1%}; {parts}{bucket})"


def check_levels(levels: list[tuple[int, int]], tiles: list[int], dilation: int) -> None:
    """Refuse per-level arguments a plan cannot be made of, before any planning.

    Planning zips the per-level lists, so one of another length would silently drop levels
    (a config's tuple of another length is fitted to the levels by ``SparseConfig.tiles_for``
    before it gets here); a tile below 1 or a negative dilation has no meaning. A few int
    checks a level: this runs for every new edit mask.
    """
    if not isinstance(levels, (list, tuple)) or not levels:
        raise FiseditError(
            f"levels must be a non-empty list of (H, W) level sizes, finest first (a "
            f"program's levels: engine.program(inputs).levels), got {levels!r}")
    for index, size in enumerate(levels):
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise FiseditError(f"levels[{index}] must be an (H, W) pair of ints, got {size!r}")
        check_int(f"levels[{index}] height", size[0], minimum=1)
        check_int(f"levels[{index}] width", size[1], minimum=1)
    if not isinstance(tiles, (list, tuple)) or len(tiles) != len(levels):
        raise FiseditError(
            f"{len(levels)} levels need {len(levels)} tile sizes, got {tiles!r}; pass one per "
            "level, e.g. SparseConfig.tiles_for(levels)")
    for index, tile in enumerate(tiles):
        check_int(f"tiles[{index}]", tile, minimum=1)
    check_int("dilation", dilation, minimum=0)


def level_thresholds(dense_threshold: float | list[float], levels: int) -> list[float]:
    """One dense threshold per level, each a finite number in [0, 1]: a number for all of them,
    or one per level (a config's shorter tuple is expanded by ``SparseConfig.thresholds_for``
    before it gets here)."""
    if not isinstance(dense_threshold, (list, tuple)):
        return [check_float("dense_threshold", dense_threshold, minimum=0.0, maximum=1.0)] * levels
    if len(dense_threshold) != levels:
        raise FiseditError(
            f"{levels} levels need {levels} dense thresholds, got {len(dense_threshold)} "
            f"({list(dense_threshold)}); pass one number, or expand a shorter tuple with "
            "SparseConfig.thresholds_for(levels)")
    return [check_float(f"dense_threshold[{index}]", threshold, minimum=0.0, maximum=1.0)
            for index, threshold in enumerate(dense_threshold)]


def capacity_buckets(levels: list[tuple[int, int]], tiles: list[int], dilation: int,
                     dense_threshold: float | list[float], ratio: float,
                     bank: list[torch.Tensor] | None = None) -> list[Bucket]:
    """The capacity buckets of a program: few, geometric, and sized per level from real masks.

    Level 0's capacities grow by ``ratio`` (1, 2, ... tiles, then geometric) up to its dense
    threshold. A lower level's capacity in a bucket is the most active tiles that any mask of
    a bank of masks (squares, rectangles, discs and scattered blobs of 0.1-60% of the latent,
    at seeded places, ``mask_bank``; or the masks given as ``bank``) with at most the bucket's
    level-0 tiles has at that level: a mask that needs more moves to the next bucket, so this
    costs only padding, never correctness. A level is dense in a bucket (and so are the levels
    below it) where its capacity covers more than its dense threshold; the padding a bucket
    adds is at most about ``ratio`` on level 0 (``benchmarks`` report it measured).
    """
    check_levels(levels, tiles, dilation)
    thresholds = level_thresholds(dense_threshold, len(levels))
    grids = [math.ceil(h / t) * math.ceil(w / t) for (h, w), t in zip(levels, tiles)]
    bank_counts = [tile_counts(mask, levels, tiles, dilation)
                   for mask in (mask_bank(levels[0]) if bank is None else bank)]
    buckets, capacity = [], 1
    while True:
        capacities, dense = [], False
        for level, ((height, width), tile, grid, threshold) in enumerate(
                zip(levels, tiles, grids, thresholds)):
            need = capacity if level == 0 else max(
                [counts[level] for counts in bank_counts if counts[0] <= capacity] + [1])
            need = min(need, grid)
            dense = dense or min(need * tile * tile, height * width) > threshold * height * width
            capacities.append(None if dense else need)
        if capacities[0] is None:
            return buckets
        bucket = Bucket(len(buckets), tuple(capacities))
        if not buckets or bucket.tiles != buckets[-1].tiles:
            buckets.append(bucket)
        if capacity >= grids[0]:
            return buckets
        capacity = min(grids[0], max(capacity + 1, math.ceil(capacity * ratio)))


def mask_bank(size: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    """Seeded masks of the shapes users paint: squares, wide and tall rectangles, discs, and
    2-6 scattered squares, at areas from 0.1% to 60% of the latent."""
    gen = torch.Generator().manual_seed(seed)
    masks = []
    for area in [0.001 * (600 ** (i / 19)) for i in range(20)]:
        masks += [rectangle_mask(size, area, aspect, gen) for aspect in (1.0, 2.0, 0.5, 4.0, 0.25)]
        masks.append(disc_mask(size, area, gen))
        masks += [scattered_mask(size, area, blobs, seed=int(torch.randint(0, 2 ** 31, (1,),
                                                                             generator=gen)))
                  for blobs in (2, 3, 6)]
    return masks


def rectangle_mask(size: tuple[int, int], area: float, aspect: float,
                   generator: torch.Generator) -> torch.Tensor:
    """A rectangle of ``area`` of the latent, width / height = ``aspect``, at a place drawn
    from ``generator`` (inside the latent)."""
    height, width = size
    pixels = area * height * width
    side_h = max(1, min(height, round(math.sqrt(pixels / aspect))))
    side_w = max(1, min(width, round(math.sqrt(pixels * aspect))))
    top = int(torch.randint(0, height - side_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - side_w + 1, (1,), generator=generator))
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top:top + side_h, left:left + side_w] = True
    return mask


def disc_mask(size: tuple[int, int], area: float, generator: torch.Generator) -> torch.Tensor:
    """A disc of ``area`` of the latent whose centre is drawn from ``generator`` (the disc
    inside the latent where it fits)."""
    height, width = size
    radius = math.sqrt(area * height * width / math.pi)
    cy = min(radius, height / 2) + float(torch.rand((), generator=generator)) * max(
        0.0, height - 2 * radius)
    cx = min(radius, width / 2) + float(torch.rand((), generator=generator)) * max(
        0.0, width - 2 * radius)
    rows, cols = torch.arange(height)[:, None] + 0.5, torch.arange(width)[None, :] + 0.5
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2


def validate_mask(mask, size: tuple[int, int] | None) -> torch.Tensor:
    """Check an edit mask: a bool tensor (or array) of shape ``size`` at latent resolution.

    ``size`` None checks everything but the size (any 2-D mask): ``SparseEngine.plan`` takes
    the latent size from the mask, and must check the mask before it compiles for that size.
    Returns a copy, so that a plan or an edit's result keeps the mask it was made with when
    the caller changes theirs afterwards.
    """
    wanted = "[H, W]" if size is None else f"{tuple(size)}"
    if isinstance(mask, np.ndarray) and any(stride < 0 for stride in mask.strides):
        mask = mask.copy()                      # torch wraps no negative strides (np.flip)
    given_tensor, given_type = isinstance(mask, torch.Tensor), type(mask).__name__
    if not given_tensor:
        try:
            mask = torch.as_tensor(mask)
        except Exception as error:
            raise FiseditError(
                f"the edit mask must be a bool tensor or array of shape {wanted} (True = edit), "
                f"got {type(mask).__name__}{_not_a_mask_hint(mask, size)}") from error
    if mask.device.type == "meta":
        raise FiseditError(
            "the edit mask is on the meta device, which holds shapes but no values; make it "
            "on the cpu (or the U-Net's device)")
    if mask.layout != torch.strided:
        raise FiseditError(
            f"the edit mask has layout {str(mask.layout).replace('torch.', '')}; pass a dense "
            "tensor (mask.to_dense())")
    if mask.dtype != torch.bool:
        given = "" if given_tensor else f" (made from the {given_type} given)"
        raise FiseditError(
            f"the edit mask must have dtype bool, got {mask.dtype}{given}; convert it with "
            "mask > 0.5 (or mask.bool() for 0/1 values)"
            + ("" if given_tensor else ", after torch.as_tensor(mask)"))
    at = "" if size is None else f" {tuple(size)}"
    if mask.dim() != 2:
        raise FiseditError(
            f"the edit mask must be 2-D [H, W] at latent resolution{at}, got shape "
            f"{tuple(mask.shape)}; "
            + (f"make it one bool per latent pixel, e.g. torch.full({at.strip() or '(H, W)'}, "
               "True) for all"
               if mask.dim() < 2 else "drop batch and channel dimensions"))
    if size is None and 0 in mask.shape:
        raise FiseditError(
            f"the edit mask has shape {tuple(mask.shape)}, with no pixels; make it [H, W] at "
            "the latent resolution of the edit (True = edit)")
    if size is not None and tuple(mask.shape) != tuple(size):
        height, width = size
        hint = image_resolution_hint(tuple(mask.shape), size) or (
            f"make it one bool per latent pixel of this generation; a mask made for another "
            f"size can be resized, e.g. F.interpolate(mask[None, None].float(), "
            f"({height}, {width}))[0, 0] > 0")
        raise FiseditError(
            f"the edit mask has shape {tuple(mask.shape)} but the latent is {height}x{width}; "
            f"{hint}")
    return mask.clone()


def warn_if_marks_nothing(marked: int, *, remedy: str, stacklevel: int) -> None:
    """Warn when a user's edit mask marks no pixel (``marked`` of them). Honoured (the edit is
    the recording), but an unpainted mask is more often a mistake than a request for nothing."""
    if marked == 0:
        warnings.warn(
            "the edit mask marks no latent pixel, so the edit changes nothing: its U-Net "
            f"outputs are the recorded ones; {remedy}", UserWarning, stacklevel=stacklevel + 1)


def _not_a_mask_hint(value, size) -> str:
    """How to make a mask of what was passed instead of one: a path, or a PIL image."""
    at = "(H, W)" if size is None else f"{tuple(size)}"
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        return (f"; to use a PNG file, read it with "
                f"fisedit_compiler.execution.plan.load_mask_png(path, {at})")
    if hasattr(value, "convert") and hasattr(value, "getbands"):     # a PIL image
        return ("; read an image with fisedit_compiler.execution.plan.image_mask(image) (white, "
                "or any bright channel on a pixel not fully transparent, is an edit), then "
                "bring it to latent resolution with fisedit_compiler.execution.plan."
                f"mask_to_latent(mask, {at}, 'the mask')")
    return ""


def image_resolution_hint(shape: tuple[int, int], size: tuple[int, int]) -> str:
    """The fix for a mask of ``shape`` that is a whole multiple (> 1) of the latent ``size``,
    the usual mistake (a mask painted on the image: the VAE downsamples 8x); "" for any other
    shape."""
    height, width = size
    if not (height and width) or shape[0] % height or shape[1] % width:
        return ""
    factor = shape[0] // height
    if factor < 2 or shape[1] // width != factor:
        return ""
    return (f"it looks like an image-resolution mask ({factor}x the latent): downsample it to "
            f"{height}x{width}, e.g. F.max_pool2d(mask[None].float(), {factor})[0] > 0")


def load_mask_png(path: str, size: tuple[int, int]) -> torch.Tensor:
    """A bool edit mask at latent ``size`` from a PNG (``read_mask_png``) at latent resolution
    or an integer multiple of it (the image size); any edited pixel marks its latent pixel (max
    pooling, as FISEdit does)."""
    return mask_to_latent(read_mask_png(path), size, f"the mask {path}")


def read_mask_png(path: str, remedy: str = "or leave the mask out for the automatic one"
                  ) -> torch.Tensor:
    """The bool pixel mask of a PNG (``image_mask``). Needs no model, so the command line reads
    it before loading one. ``remedy``: the fix the message offers for a mask that marks
    nothing, besides painting."""
    from PIL import Image

    try:
        image = Image.open(path)
        frames = getattr(image, "n_frames", 1)
        if frames > 1:
            # Only the first frame would be read, the others dropped without a word.
            raise FiseditError(f"the mask {path} holds {frames} frames (an animation or a "
                               "multi-page file); a mask is one image: save the frame you "
                               "mean as a single-frame PNG")
        mask = image_mask(image, f"the mask {path}", "save it as an 8-bit PNG")
    except Image.DecompressionBombError as error:
        raise FiseditError(f"the mask {path} is too large to read ({error}); a mask is the size "
                           "of the image or of its latent") from None
    except OSError as error:
        raise FiseditError(f"cannot read the mask {path}: {error}") from None
    if not mask.any():
        raise FiseditError(
            f"the mask {path} marks no pixel (white, or any channel above 127, on a pixel not "
            "fully transparent, is an edit); "
            f"paint the region to edit, {remedy}")
    return mask


def image_mask(image, source: str = "the mask image",
               fix: str = "pass an 8-bit image") -> torch.Tensor:
    """The bool pixel mask of a PIL image, white = edit: any channel above 127, on pixels not
    fully transparent (a stroke of any opacity on a transparent layer); in 16-bit grayscale
    any value above 32767; a palette image by its colours, not its indices. An 8-bit image of
    0/1 values (``Image.fromarray(bools.astype(np.uint8))``) is refused: it would mark nothing.
    The one reading of a mask image (the command line's PNGs, the app pool's images, the hint
    for an image passed as a mask). ``source`` and ``fix`` word the messages (what it is; how
    to make it an 8-bit mask)."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise FiseditError(
            f"image_mask reads a PIL image (PIL.Image.open(path)), got {type(image).__name__}; "
            "a bool array or tensor of the latent's size is a mask already: pass it to "
            "engine.plan as torch.as_tensor(mask), or an image-sized one to "
            "mask_to_latent(mask, (H, W), 'the mask')")
    if image.mode == "L" and np.asarray(image).max() == 1:
        raise FiseditError(
            f"{source} holds 0/1 values, so it marks no pixel (white, above 127, is an edit); "
            "scale it to 0/255, e.g. Image.fromarray(mask.astype(np.uint8) * 255)")
    if image.mode.startswith("I"):
        # 16-bit grayscale (PNG's "I;16" or "I"): Pillow's convert clips rather than scales
        # it, so even a dark grey would read as white; the edit is the upper half.
        values = np.asarray(image)
        marked = values > 32767
        if not marked.any() and values.max() > 127:
            raise FiseditError(
                f"{source} is a 16-bit image whose values reach only {int(values.max())} of "
                f"65535, so it marks no pixel (white, above 32767, is an edit); it seems to "
                f"hold 8-bit values: {fix}, or scale it to 65535")
    elif image.mode == "F":
        raise FiseditError(f"{source} holds floating-point pixels (mode F), whose white is not "
                           f"defined; {fix} (white = edit)")
    else:
        # Any bright channel marks an edit: a red square on black (RGB) would be dark in
        # grayscale (red is 76/255 there) and read as an empty mask. Fully transparent pixels
        # (an alpha channel, e.g. a mask painted on a transparent layer) are not edits; a
        # stroke of any opacity is, as in the app's painter.
        rgba = np.asarray(image.convert("RGBA"))
        marked = (rgba[..., :3].max(axis=-1) > 127) & (rgba[..., 3] > 0)
    return torch.from_numpy(np.ascontiguousarray(marked))


def check_latent_size(size) -> tuple[int, int]:
    """``size`` as (height, width), two positive Python ints (numpy's integers too)."""
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(side, numbers.Integral) and not isinstance(side, (bool, np.bool_))
            and side > 0 for side in size)):
        raise FiseditError(f"the latent size must be (height, width), two positive ints, got "
                           f"{size!r}")
    return int(size[0]), int(size[1])


def mask_to_latent(mask: torch.Tensor, size: tuple[int, int], source: str,
                   scale: int | None = None) -> torch.Tensor:
    """A bool pixel mask (True = edit) max-pooled to latent ``size``: it must be that size or,
    where the VAE's ``scale`` is known, the image size (``scale`` times it); else any whole
    multiple. A numpy array is read as a tensor. A soft (float) mask is refused rather than
    read as "any value above 0 is an edit": threshold it first (``mask > 0.5``)."""
    size = check_latent_size(size)
    if scale is not None:
        scale = check_int("mask_to_latent's scale (the VAE's)", scale, minimum=1)
    is_array = isinstance(mask, (torch.Tensor, np.ndarray))
    if not is_array or mask.ndim != 2:
        kind = "tensor" if isinstance(mask, torch.Tensor) else "array"
        got = f"a {mask.ndim}-D {kind} {tuple(mask.shape)}" if is_array else type(mask).__name__
        raise FiseditError(f"{source} must be a 2-D (height, width) tensor or numpy array, got "
                           f"{got}; read an image with image_mask(image) first")
    mask = validate_mask(mask, None)      # bool (True = edit), with values and pixels
    height, width = size
    factor = mask.shape[0] // height
    fits = (not mask.shape[0] % height and not mask.shape[1] % width
            and factor == mask.shape[1] // width)
    if scale is not None and fits and factor not in (1, scale):
        fits = False
    if not fits:
        image = ("the image size or " if scale is None else
                 f"the image size {width * scale}x{height * scale} or ")
        multiple = " (or an integer multiple of it)" if scale is None else ""
        raise FiseditError(
            f"{source} is {mask.shape[1]}x{mask.shape[0]} pixels; it must be {image}the "
            f"latent size {width}x{height}{multiple}")
    return F.max_pool2d(mask[None, None].float(), factor)[0, 0] > 0


# Planning runs on the host for every new mask, on arrays of a few thousand booleans: in
# numpy each step costs microseconds where a torch op costs tens (issue 14: <= 1 ms a plan).

def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Max filter of side 2 * radius + 1 (zero padding), separably.

    A shift past the mask's side moves nothing in, so each axis stops at its side: the result
    is the same, and the loop is bounded whatever the config's dilation (a huge one means
    "everything reachable", not minutes of planning)."""
    for axis in (0, 1):
        grown = mask.copy()
        for shift in range(1, min(radius, mask.shape[axis] - 1) + 1):
            if axis == 0:
                grown[shift:] |= mask[:-shift]
                grown[:-shift] |= mask[shift:]
            else:
                grown[:, shift:] |= mask[:, :-shift]
                grown[:, :-shift] |= mask[:, shift:]
        mask = grown
    return mask


def _cover_for_upsample(upper: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The lower-level mask that nearest upsampling to ``upper``'s size reads from."""
    height, width = upper.shape
    rows = (np.arange(height) * size[0]) // height
    cols = (np.arange(width) * size[1]) // width
    lower = np.zeros(size, dtype=bool)
    ys, xs = np.nonzero(upper)
    lower[rows[ys], cols[xs]] = True
    # Strided convolutions map the other way (lower pixel y reads upper rows near 2y), which
    # needs no coverage: their halos read recorded values.
    return lower


def _tile_grid(mask: np.ndarray, tile: int) -> np.ndarray:
    """Which tiles of ``mask`` hold any active pixel (edge tiles may be partial)."""
    height, width = mask.shape
    grid_h, grid_w = -(-height // tile), -(-width // tile)
    padded = np.zeros((grid_h * tile, grid_w * tile), dtype=bool)
    padded[:height, :width] = mask
    return padded.reshape(grid_h, tile, grid_w, tile).any(axis=(1, 3))


def _quantize(mask: np.ndarray, tile: int) -> np.ndarray:
    height, width = mask.shape
    grid = _tile_grid(mask, tile)
    return grid.repeat(tile, 0).repeat(tile, 1)[:height, :width]


def effective_masks(mask, levels, tiles, dilation) -> list[np.ndarray]:
    """The effective mask of every level (host, bool): the dilated mask quantized to level 0's
    tiles, then for each lower level the positions its upsampling reads, quantized."""
    current = _dilate(np.asarray(mask, dtype=bool), dilation)
    masks = []
    for index, (size, tile) in enumerate(zip(levels, tiles)):
        if index > 0:
            current = _cover_for_upsample(current, size)
        current = _quantize(current, tile)
        masks.append(current)
    return masks


def _tile_mask(active: np.ndarray, tile: int) -> np.ndarray:
    return active[::tile, ::tile]


def tile_counts(mask, levels: list[tuple[int, int]], tiles: list[int],
                dilation: int) -> list[int]:
    """The active tiles of ``mask`` at each level (of its effective masks): what a plan
    computes at an exact level, and what a capacity bucket must hold."""
    return _tile_counts(effective_masks(mask, levels, tiles, dilation), tiles)


def _tile_counts(level_masks, tiles: list[int]) -> list[int]:
    return [int(_tile_mask(active, tile).sum()) for active, tile in zip(level_masks, tiles)]


def _level_plan(index, size, tile, dense, active, capacity, device) -> LevelPlan:
    height, width = size
    grid_h, grid_w = -(-height // tile), -(-width // tile)
    if dense:
        active = np.ones(size, dtype=bool)
        pixels = np.arange(height * width)
        tiles = np.stack(np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij"),
                         -1).reshape(-1, 2)
        slots = np.zeros(0, dtype=np.int64)     # dense levels have no tiled ops
    else:
        tiles = np.argwhere(_tile_mask(active, tile))
        tile_pixels = _tile_slots(tiles, tile, size)
        slots = np.flatnonzero(tile_pixels >= 0)
        pixels = tile_pixels[slots]
    count, tile_count = len(pixels), len(tiles)
    position = np.full(height * width, -1, dtype=np.int64)
    position[pixels] = np.arange(count)
    padded = capacity is not None and not dense and count > 0
    if padded:
        # Pad with repeats of the first active tile and position (see LevelPlan).
        positions = min(capacity * tile * tile, height * width)
        tiles = np.concatenate([tiles, np.repeat(tiles[:1], capacity - tile_count, 0)])
        pixels = np.concatenate([pixels, np.repeat(pixels[:1], positions - count)])
        slots = np.concatenate([slots, np.repeat(slots[:1], positions - count)])
    host = {"active": torch.from_numpy(np.ascontiguousarray(active)),
            "pixels": torch.from_numpy(pixels.astype(np.int64)),
            "position": torch.from_numpy(position),
            "tiles": torch.from_numpy(tiles.astype(np.int64).reshape(-1, 2)),
            "slots": torch.from_numpy(slots.astype(np.int64)),
            "counts": torch.from_numpy(np.array([count, tile_count], dtype=np.int32))}
    return LevelPlan(index, size, tile, dense, padded, count, tile_count, host, device)


def _tile_slots(tiles: np.ndarray, tile: int, size: tuple[int, int]) -> np.ndarray:
    """Flat pixel index of every slot of every tile ``[n * tile * tile]``, -1 outside the image."""
    height, width = size
    offsets = np.arange(tile)
    rows = tiles[:, :1, None] * tile + offsets[None, :, None]     # [n, tile, 1]
    cols = tiles[:, 1:, None] * tile + offsets[None, None, :]     # [n, 1, tile]
    inside = (rows < height) & (cols < width)
    return np.where(inside, rows * width + cols, -1).reshape(-1)


def parse_box(box: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` in fractions of the width and height, checked."""
    if not isinstance(box, str):
        raise FiseditError(f"the mask box is a string \"x0,y0,x1,y1\" of fractions in [0, 1] "
                           f"(as --mask-box takes it), got {type(box).__name__} {box!r}; pass "
                           "e.g. \"0.25,0.25,0.75,0.75\"")
    try:
        x0, y0, x1, y1 = (float(v) for v in box.split(","))
    except ValueError:
        raise FiseditError(f"--mask-box must be x0,y0,x1,y1 as fractions in [0, 1], got {box!r}") from None
    # Written so that NaN fails too.
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise FiseditError(f"--mask-box needs 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box!r}")
    return x0, y0, x1, y1


def mask_from_box(box: str, size: tuple[int, int]) -> torch.Tensor:
    """A bool mask from ``"x0,y0,x1,y1"`` in fractions of the width and height."""
    x0, y0, x1, y1 = parse_box(box)
    height, width = size = check_latent_size(size)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[int(y0 * height):max(int(y0 * height) + 1, round(y1 * height)),
         int(x0 * width):max(int(x0 * width) + 1, round(x1 * width))] = True
    return mask


def check_area(area, name: str = "the mask's area") -> float:
    """``area`` as a fraction of the latent in (0, 1]."""
    area = check_float(name, area, minimum=0.0, maximum=1.0)
    if area == 0:
        raise FiseditError(f"{name} must be a fraction of the latent in (0, 1], got 0")
    return area


def blob_mask(size: tuple[int, int], area: float) -> torch.Tensor:
    """One centred square covering ``area`` of the latent (rounded to whole pixels)."""
    height, width = size = check_latent_size(size)
    area = check_area(area)
    side_h = max(1, min(height, round(math.sqrt(area) * height)))
    side_w = max(1, min(width, round(math.sqrt(area) * width)))
    mask = torch.zeros(size, dtype=torch.bool)
    top, left = (height - side_h) // 2, (width - side_w) // 2
    mask[top:top + side_h, left:left + side_w] = True
    return mask


def scattered_mask(size: tuple[int, int], area: float, blobs: int = 6, seed: int = 0):
    """``blobs`` squares at seeded random places, together covering about ``area``."""
    height, width = size = check_latent_size(size)
    area = check_area(area)
    blobs = check_int("scattered_mask's blobs", blobs, minimum=1)
    seed = check_seed("scattered_mask's seed", seed)
    gen = torch.Generator().manual_seed(seed)
    side = max(1, round(math.sqrt(area * height * width / blobs)))
    mask = torch.zeros(size, dtype=torch.bool)
    for _ in range(blobs):
        top = int(torch.randint(0, max(1, height - side + 1), (1,), generator=gen))
        left = int(torch.randint(0, max(1, width - side + 1), (1,), generator=gen))
        mask[top:top + side, left:left + side] = True
    return mask
