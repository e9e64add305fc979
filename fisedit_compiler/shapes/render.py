"""Procedural scenes: a renderer, a caption grammar, and prompt-edit pairs with ground truth.

A scene is 1 to 3 objects on a plain background. Each object has a shape (circle, square,
triangle, star), one of six colours, a size (small, large) and one of nine positions on a 3x3
grid (``top left`` .. ``bottom right``, ``center``); no two objects share a position or a
colour, so a caption names every object unambiguously and the checker can find each one by
colour. Objects are drawn in caption order (later on top; with distinct cells they barely
touch). Each object also carries a small jitter of its centre (not in the caption), so a
trained model sees variation that the text does not explain, and an edit can keep every
unchanged object exactly where it was.

Why these choices:
* Six colours one hue step (60 degrees) apart, and three neutral backgrounds: nearest-colour
  classification of generated pixels is then robust (every palette pair is >= 100 apart in
  0-255 RGB), and anti-aliased edge pixels (a 50/50 mix) fall between palette colours, so
  they are classified as "unknown" rather than as some third colour.
* Geometry is in units of the image side, so the same scene renders at any size (64 px for
  the model, 32 px for tiny smoke tests).
* Rendering is vectorised torch (CPU or GPU): an inside test per shape on a supersampled grid
  (4x4 samples per pixel by default), averaged to pixel coverage, composited slot by slot. A
  batch of 256 scenes at 64 px renders in milliseconds on a GPU, so training renders its
  data on the fly and never stores a data set. No pillow is needed.

The caption grammar (``caption`` / ``parse_caption`` round-trip exactly)::

    caption  := object ( " and " object )* " on a " BACKGROUND " background"
    object   := "a " SIZE " " COLOUR " " SHAPE " at the " POSITION

Edit pairs (``make_edit_pair``) are the kinds of prompt changes users make: ``add`` an
object, ``remove`` one, change a ``colour``, ``move`` one, change the ``background``. Both
scenes share the layout (every unchanged object keeps its jitter), so the region that truly
changes is exactly the set of pixels whose rendering differs (``changed_region``); at latent
resolution (``latent_region``) a latent pixel is changed if any pixel of its 4x4 block is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "purple")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("white", "gray", "black")
EDIT_KINDS = ("add", "remove", "colour", "move", "background")
MAX_OBJECTS = 3

# 0-255 sRGB. Object colours are hue steps of 60 degrees; backgrounds are neutral.
RGB = {
    "red": (220, 40, 40), "yellow": (235, 215, 40), "green": (40, 175, 70),
    "cyan": (40, 200, 215), "blue": (45, 75, 220), "purple": (160, 60, 200),
    "white": (240, 240, 240), "gray": (125, 125, 125), "black": (20, 20, 20),
}
# Object "radius" in units of the image side (8 px and 5 px at 64 px), and the jitter range.
SIZE_RADIUS = {"small": 5 / 64, "large": 8 / 64}
JITTER = 1.5 / 64
# Per-shape scale of the radius, so that the four shapes look about equally big: the square's
# half side, the triangle's and the star's circumradius. Star inner radius = STAR_INNER x outer.
SHAPE_SCALE = {"circle": 1.0, "square": 0.85, "triangle": 1.25, "star": 1.25}
STAR_INNER = 0.5


def grammar_words() -> tuple[str, ...]:
    """Every word a caption can contain (the text encoder's word-level vocabulary)."""
    words = ["a", "and", "at", "the", "on", "background", *SIZES, *COLOURS, *SHAPES,
             *BACKGROUNDS]
    for position in POSITIONS:
        words.extend(position.split())
    seen: dict[str, None] = {}
    for word in words:
        seen.setdefault(word, None)
    return tuple(seen)


def cell_of(position: str) -> tuple[int, int]:
    """(row, column) of a position on the 3x3 grid."""
    index = POSITIONS.index(position)
    return index // 3, index % 3


# --------------------------------------------------------------------------------- scene specs

@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    jitter: tuple[float, float] = (0.0, 0.0)   # (dx, dy) in units of the image side

    def __post_init__(self):
        for value, allowed, what in ((self.shape, SHAPES, "shape"), (self.colour, COLOURS,
                                     "colour"), (self.size, SIZES, "size"),
                                     (self.position, POSITIONS, "position")):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {allowed}")

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the object's centre (and centroid) in units of the image side."""
        row, col = cell_of(self.position)
        return (col + 0.5) / 3 + self.jitter[0], (row + 0.5) / 3 + self.jitter[1]

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[self.size]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str = "white"

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a scene has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose one of "
                             f"{BACKGROUNDS}")
        for attr in ("position", "colour"):
            values = [getattr(o, attr) for o in self.objects]
            if len(set(values)) != len(values):
                raise ValueError(f"two objects share a {attr}: {values}")

    def caption(self) -> str:
        return caption(self)

    def without_jitter(self) -> "Scene":
        return Scene(tuple(replace(o, jitter=(0.0, 0.0)) for o in self.objects), self.background)


def caption(scene: Scene) -> str:
    """The scene's caption in the grammar of the module docstring."""
    return " and ".join(o.phrase() for o in scene.objects) + f" on a {scene.background} background"


_OBJECT_RE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) at the "
    rf"({'|'.join(sorted(POSITIONS, key=len, reverse=True))})")
_CAPTION_RE = re.compile(rf"(.+) on a ({'|'.join(BACKGROUNDS)}) background")


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (without jitter); ValueError if it is not in the grammar."""
    normal = " ".join(text.lower().replace(",", " ").split())
    match = _CAPTION_RE.fullmatch(normal)
    if not match:
        raise ValueError(f"not a scene caption (expected '... on a <{'|'.join(BACKGROUNDS)}> "
                         f"background'): {text!r}")
    objects = []
    for part in match.group(1).split(" and "):
        obj = _OBJECT_RE.fullmatch(part)
        if not obj:
            raise ValueError(f"not an object phrase ('a <size> <colour> <shape> at the "
                             f"<position>'): {part!r} in {text!r}")
        size, colour, shape, position = obj.groups()
        objects.append(SceneObject(shape, colour, size, position))
    return Scene(tuple(objects), match.group(2))


# ------------------------------------------------------------------------------ random scenes

def _random_object(rng: np.random.Generator, position: str, colour: str) -> SceneObject:
    jitter = tuple(float(v) for v in rng.uniform(-JITTER, JITTER, size=2))
    return SceneObject(SHAPES[rng.integers(len(SHAPES))], colour, SIZES[rng.integers(len(SIZES))],
                       position, jitter)


def random_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """A uniformly random scene: 1-3 objects (or ``num_objects``), distinct cells and colours."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    objects = tuple(_random_object(rng, POSITIONS[p], COLOURS[c])
                    for p, c in zip(positions, colours))
    return Scene(objects, BACKGROUNDS[rng.integers(len(BACKGROUNDS))])


def random_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    return [random_scene(rng) for _ in range(n)]


def random_batch(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """``n`` random scenes as index arrays, drawn like ``random_scene`` but vectorised (training
    draws a batch per step, and a Python loop over Scene objects would cost more than the
    GPU step): ``count [n]``, per slot ``shape, colour, size, position [n, 3]`` (indices into
    SHAPES, ...; slots past ``count`` hold junk), ``jitter [n, 3, 2]``, ``background [n]``.
    ``scenes_from_batch`` turns it into Scene objects, ``pack_batch`` into render tensors."""
    count = rng.integers(1, MAX_OBJECTS + 1, size=n)
    position = np.argsort(rng.random((n, len(POSITIONS))), axis=1)[:, :MAX_OBJECTS]
    colour = np.argsort(rng.random((n, len(COLOURS))), axis=1)[:, :MAX_OBJECTS]
    return dict(count=count, shape=rng.integers(len(SHAPES), size=(n, MAX_OBJECTS)),
                colour=colour, size=rng.integers(len(SIZES), size=(n, MAX_OBJECTS)),
                position=position, jitter=rng.uniform(-JITTER, JITTER, (n, MAX_OBJECTS, 2)),
                background=rng.integers(len(BACKGROUNDS), size=n))


def batch_captions(batch: dict[str, np.ndarray]) -> list[str]:
    """The captions of a ``random_batch`` (same text as ``caption`` of the same scenes)."""
    out = []
    for i, count in enumerate(batch["count"]):
        parts = [f"a {SIZES[batch['size'][i, j]]} {COLOURS[batch['colour'][i, j]]} "
                 f"{SHAPES[batch['shape'][i, j]]} at the {POSITIONS[batch['position'][i, j]]}"
                 for j in range(count)]
        out.append(" and ".join(parts) + f" on a {BACKGROUNDS[batch['background'][i]]} "
                   "background")
    return out


def scenes_from_batch(batch: dict[str, np.ndarray]) -> list[Scene]:
    scenes = []
    for i, count in enumerate(batch["count"]):
        objects = tuple(SceneObject(SHAPES[batch["shape"][i, j]], COLOURS[batch["colour"][i, j]],
                                    SIZES[batch["size"][i, j]],
                                    POSITIONS[batch["position"][i, j]],
                                    tuple(float(v) for v in batch["jitter"][i, j]))
                        for j in range(count))
        scenes.append(Scene(objects, BACKGROUNDS[batch["background"][i]]))
    return scenes


_RGB_TABLE = {name: np.array([RGB[c] for c in names], dtype=np.float32) / 255.0
              for name, names in (("colour", COLOURS), ("background", BACKGROUNDS))}


def pack_batch(batch: dict[str, np.ndarray], device=None) -> dict[str, torch.Tensor]:
    """A ``random_batch`` as ``pack``'s tensors (vectorised)."""
    n = len(batch["count"])
    valid = np.arange(MAX_OBJECTS)[None, :] < batch["count"][:, None]
    row, col = batch["position"] // 3, batch["position"] % 3
    radius = np.array([SIZE_RADIUS[s] for s in SIZES], dtype=np.float32)[batch["size"]]
    geometry = np.stack([(col + 0.5) / 3 + batch["jitter"][..., 0],
                         (row + 0.5) / 3 + batch["jitter"][..., 1], radius], axis=-1)
    arrays = dict(valid=valid, shape=batch["shape"].astype(np.int64),
                  geometry=geometry.astype(np.float32),
                  colour=_RGB_TABLE["colour"][batch["colour"]],
                  background=_RGB_TABLE["background"][batch["background"]])
    assert arrays["colour"].shape == (n, MAX_OBJECTS, 3)
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


# ---------------------------------------------------------------------------------- rendering

def _inside(shape_id: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
            radius: torch.Tensor) -> torch.Tensor:
    """Whether the offsets (dx, dy) from each object's centre (y down, any units, same as
    ``radius``) fall inside its shape. ``shape_id`` and ``radius`` broadcast against dx/dy."""
    circle = dx * dx + dy * dy <= radius * radius
    half = radius * SHAPE_SCALE["square"]
    square = (dx.abs() <= half) & (dy.abs() <= half)
    # Equilateral triangle pointing up, centroid at the centre: inside iff the projection on
    # each vertex direction's opposite is at most the inradius (half the circumradius).
    big = radius * SHAPE_SCALE["triangle"]
    triangle = dy <= big / 2                                    # vertex straight up
    for angle in (math.radians(30), math.radians(150)):         # the two lower vertices
        vx, vy = math.cos(angle), math.sin(angle)
        triangle = triangle & (-(dx * vx + dy * vy) <= big / 2)
    # Five-pointed star, one point up: fold the angle into one half-spike and test the side
    # of the edge from the outer vertex A = (R, 0) to the inner vertex B at angle pi/5.
    outer = radius * SHAPE_SCALE["star"]
    theta = torch.atan2(dx, -dy) % (2 * math.pi / 5)
    phi = torch.minimum(theta, 2 * math.pi / 5 - theta)
    rho = torch.sqrt(dx * dx + dy * dy)
    qx, qy = rho * torch.cos(phi), rho * torch.sin(phi)
    bx = outer * STAR_INNER * math.cos(math.pi / 5)
    by = outer * STAR_INNER * math.sin(math.pi / 5)
    star = (bx - outer) * qy - by * (qx - outer) >= 0
    return torch.where(shape_id == 0, circle, torch.where(
        shape_id == 1, square, torch.where(shape_id == 2, triangle, star)))


def pack(scenes: list[Scene], device=None) -> dict[str, torch.Tensor]:
    """Scenes as tensors: per slot (up to MAX_OBJECTS) validity, shape id, centre, radius and
    colour, plus the background colour; colours in [0, 1]."""
    b = len(scenes)
    valid = np.zeros((b, MAX_OBJECTS), dtype=bool)
    shape = np.zeros((b, MAX_OBJECTS), dtype=np.int64)
    geometry = np.zeros((b, MAX_OBJECTS, 3), dtype=np.float32)    # cx, cy, radius
    colour = np.zeros((b, MAX_OBJECTS, 3), dtype=np.float32)
    background = np.zeros((b, 3), dtype=np.float32)
    for i, scene in enumerate(scenes):
        background[i] = RGB[scene.background]
        for j, obj in enumerate(scene.objects):
            valid[i, j] = True
            shape[i, j] = SHAPES.index(obj.shape)
            geometry[i, j] = (*obj.centre, obj.radius)
            colour[i, j] = RGB[obj.colour]
    arrays = dict(valid=valid, shape=shape, geometry=geometry, colour=colour / 255.0,
                  background=background / 255.0)
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()}


def coverage(shape_id: torch.Tensor, geometry: torch.Tensor, size: int,
             supersample: int = 4) -> torch.Tensor:
    """Anti-aliased coverage ``[B, size, size]`` in [0, 1] of one shape per batch item
    (``geometry`` = cx, cy, radius in units of the image side): the fraction of the
    ``supersample x supersample`` sample points of each pixel inside the shape."""
    return _coverage(shape_id, geometry, size, supersample, 0, size)


def _coverage(shape_id, geometry, size, supersample, origin, window) -> torch.Tensor:
    """Coverage of the ``window x window`` pixels from pixel ``origin`` (an int or ``[B, 2]``
    (x, y) tensor). Sample coordinates are computed the same way for any window, so a window
    holding the whole shape gives the very values of the full image."""
    device = geometry.device
    n = size * supersample
    offsets = torch.arange(window * supersample, device=device)
    if isinstance(origin, int):
        xs = ys = ((origin * supersample + offsets).float() + 0.5)[None, :] / n
    else:
        xs = ((origin[:, :1] * supersample + offsets[None, :]).float() + 0.5) / n
        ys = ((origin[:, 1:] * supersample + offsets[None, :]).float() + 0.5) / n
    cx, cy, radius = (geometry[:, k].float()[:, None, None] for k in range(3))
    dx = xs[:, None, :] - cx
    dy = ys[:, :, None] - cy
    inside = _inside(shape_id[:, None, None], dx, dy, radius).float()
    return inside.view(-1, window, supersample, window, supersample).mean(dim=(2, 4))


def _window(size: int) -> int:
    """Pixels on a side that hold any object with its anti-aliased edge and jitter."""
    extent = max(SHAPE_SCALE.values()) * max(SIZE_RADIUS.values()) + JITTER
    return min(size, 2 * math.ceil(extent * size) + 4)


def object_coverage(shape_id: torch.Tensor, geometry: torch.Tensor, size: int,
                    supersample: int = 4) -> torch.Tensor:
    """``coverage``, computed only in a window around each object (7x fewer sample points at
    64 px, which is what makes on-the-fly training data cheap) and placed into the image."""
    window = _window(size)
    if window >= size:
        return coverage(shape_id, geometry, size, supersample)
    centre = (geometry[:, :2] * size).floor().long()
    origin = (centre - window // 2).clamp(0, size - window)          # [B, 2] (x, y)
    local = _coverage(shape_id, geometry, size, supersample, origin, window)
    pixels = torch.arange(size, device=geometry.device)
    rel_x = pixels[None, :] - origin[:, :1]                            # [B, size]
    rel_y = pixels[None, :] - origin[:, 1:]
    inside = ((rel_y >= 0) & (rel_y < window))[:, :, None] & \
        ((rel_x >= 0) & (rel_x < window))[:, None, :]
    batch = torch.arange(local.shape[0], device=geometry.device)[:, None, None]
    placed = local[batch, rel_y.clamp(0, window - 1)[:, :, None],
                   rel_x.clamp(0, window - 1)[:, None, :]]
    return placed * inside


def render(scenes: list[Scene] | dict, size: int = 64, supersample: int = 4,
           device=None) -> torch.Tensor:
    """Images ``[B, 3, size, size]`` in [0, 1] (float32) of the scenes (or of ``pack``'s dict)."""
    packed = scenes if isinstance(scenes, dict) else pack(scenes, device)
    background = packed["background"]
    b = background.shape[0]
    image = background[:, :, None, None].expand(b, 3, size, size).clone()
    for slot in range(packed["valid"].shape[1]):
        valid = packed["valid"][:, slot]
        if not bool(valid.any()):
            continue
        alpha = object_coverage(packed["shape"][:, slot], packed["geometry"][:, slot], size,
                                supersample)
        alpha = alpha * valid[:, None, None].float()
        colour = packed["colour"][:, slot][:, :, None, None]
        image = image + alpha[:, None] * (colour - image)
    return image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` floats in [0, 1] -> ``[B, H, W, 3]`` uint8 (the pipelines' PIL layout)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------------- edit pairs

@dataclass(frozen=True)
class EditPair:
    """An original scene, its edit, the kind of edit and the index of the object it touches."""
    kind: str
    original: Scene
    edited: Scene
    index: int | None = None          # the changed object (in ``original``; None for background)
    seed: int | None = None
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def prompt(self) -> str:
        return self.original.caption()

    @property
    def edit_prompt(self) -> str:
        return self.edited.caption()


def _free(used, universe, rng):
    options = [v for v in universe if v not in used]
    return options[int(rng.integers(len(options)))]


def make_edit_pair(seed: int, kind: str) -> EditPair:
    """A deterministic pair of ``kind`` from ``seed``: both scenes share every unchanged object
    (with its jitter) and, except for ``background``, the background."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; choose one of {EDIT_KINDS}")
    rng = np.random.default_rng([seed, EDIT_KINDS.index(kind)])
    low, high = {"add": (1, 2), "remove": (2, 3)}.get(kind, (1, 3))
    scene = random_scene(rng, int(rng.integers(low, high + 1)))
    objects = list(scene.objects)
    positions = {o.position for o in objects}
    colours = {o.colour for o in objects}
    index = int(rng.integers(len(objects)))
    background = scene.background
    if kind == "add":
        new = _random_object(rng, _free(positions, POSITIONS, rng), _free(colours, COLOURS, rng))
        objects.append(new)
        index = None
    elif kind == "remove":
        del objects[index]
    elif kind == "colour":
        objects[index] = replace(objects[index], colour=_free(colours, COLOURS, rng))
    elif kind == "move":
        objects[index] = replace(objects[index], position=_free(positions, POSITIONS, rng))
    else:
        background = _free({background}, BACKGROUNDS, rng)
        index = None
    return EditPair(kind, scene, Scene(tuple(objects), background), index, seed)


def benchmark_pairs(n: int, start: int = 0) -> list[EditPair]:
    """The fixed benchmark set from pair ``start`` on: pair ``j`` is ``make_edit_pair(j,
    EDIT_KINDS[j % 5])``, so every prefix is balanced over the edit kinds and a run split with
    ``start`` measures the same pairs as one run."""
    return [make_edit_pair(j, EDIT_KINDS[j % len(EDIT_KINDS)]) for j in range(start, start + n)]


def changed_region(pair: EditPair, size: int = 64, dilation: int = 1,
                   supersample: int = 4) -> torch.Tensor:
    """Bool ``[size, size]``: the pixels whose rendering differs between the two scenes
    (by more than half a uint8 level), dilated by ``dilation`` pixels (a square)."""
    images = render([pair.original, pair.edited], size, supersample)
    changed = (images[0] - images[1]).abs().amax(dim=0) > 0.5 / 255
    if dilation > 0:
        changed = F.max_pool2d(changed[None, None].float(), 2 * dilation + 1, stride=1,
                               padding=dilation)[0, 0] > 0
    return changed


def latent_region(pair: EditPair, size: int = 64, factor: int = 4,
                  dilation: int = 1) -> torch.Tensor:
    """The changed region at latent resolution ``[size/factor]^2``: a latent pixel is changed
    if any pixel of its ``factor x factor`` block is (the VAE's downsampling)."""
    region = changed_region(pair, size, dilation)
    return F.max_pool2d(region[None, None].float(), factor)[0, 0] > 0
