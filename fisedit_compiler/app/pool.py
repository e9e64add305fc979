"""The app's editing state: one EditSession per browser tab, one device shared by all tabs.

The page (``page.py``) is a thin layer over this module, and this module a thin layer over
``EditSession``: each tab (a gradio session, keyed by its session hash) owns a ``Tab`` holding
its session, its last edit and the history of the states it has reached. A history entry keeps
its *recipe* (the generation's settings and the accepted edits since), not a recording: going
back to an entry replays the recipe through a new session, which rebuilds the same recording
and replaces the tab's once it has all run, so a tab holds one recording in memory (two while a
replay, an accept or a generation runs).

All tabs share the pipeline and one ``SparseEngine`` (one capture and compile for all). Every
call into the pipeline runs under ``device_lock``: a session routes U-Net calls by replacing
``pipe.unet.forward`` for the length of a generation or edit, and the engine keeps one plan
(with its captured CUDA graphs) at a time, so two tabs' steps must never interleave.

Memory: the recordings of all tabs share ``budget_bytes``. After a call that records, the
recordings of the least recently used other tabs are dropped until the total fits; such a tab
is told at its next action, and can generate again or rebuild any history entry.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import PIL.Image
import torch

from ..checks import check_int, check_optional_int
from ..edit_flow.session import EditResult, EditSession
from ..errors import FiseditError
from ..execution.plan import image_mask


# How many closed tabs' ids the pool remembers (a few bytes each), far more than can have
# work queued at once.
CLOSED_TABS_KEPT = 4096


@dataclass(frozen=True)
class Generation:
    """The settings of a dense generation (with the pipeline's default size unless given;
    seed None draws one, which the history entry then keeps)."""
    prompt: str
    seed: int | None
    steps: int
    guidance_scale: float
    size: int | None = None


@dataclass(frozen=True)
class EditRecipe:
    """The arguments of one ``EditSession.edit``, under its rules (a mask mode only beside a
    mask; an estimator not beside a mask that replaces the estimate). ``mask`` is None for the
    automatic mask, else bools (or a painting's 0/1 or 0/255 values) at latent resolution or a
    whole multiple of it (``SessionPool.edit`` pools it down to the latent)."""
    prompt: str
    probe_steps: int | None = None      # None: the estimator's default
    mask: torch.Tensor | np.ndarray | None = None
    mask_mode: str = "replace"          # "intersect" only beside a mask
    mask_estimator: str | None = None   # None: DEFAULT_ESTIMATOR where the mask is estimated


@dataclass(frozen=True)
class HistoryEntry:
    """A state a tab reached: its image and how to rebuild its recording."""
    label: str
    image: PIL.Image.Image
    generation: Generation
    accepted_edits: tuple[EditRecipe, ...] = ()


@dataclass
class EditView:
    """What the page shows of an edit: the images, the masks and the timings."""
    image: PIL.Image.Image
    mask: torch.Tensor             # bool, latent resolution: the mask the plan was built from
    active: torch.Tensor           # bool, latent resolution: the region the edit recomputed
    report: dict                   # EditSession's report
    dense_regeneration_s: float    # a plain dense run of the pipeline, same settings


@dataclass
class Tab:
    session: EditSession
    last_used: float = field(default_factory=time.monotonic)
    current: HistoryEntry | None = None      # the state the session's recording holds
    last_edit: tuple[EditRecipe, EditResult] | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    evicted: bool = False


class SessionPool:
    """Per-tab EditSessions over one pipeline, a shared memory budget and one device lock.

    A tab exists from its first successful ``generate`` on: the read-only calls and refused
    calls of an unknown tab create nothing (a browser, or an API client, may send any tab id).
    """

    def __init__(self, pipe, budget_bytes: int | None = None, config=None):
        self.pipe = pipe
        # Checked first: it is read only after a tab's generation has run (_enforce_budget).
        self.budget_bytes = check_optional_int("budget_bytes", budget_bytes, minimum=0)
        # Built once here so that each tab's session shares its captured programs.
        self.engine = EditSession(pipe, config).engine
        self.device_lock = threading.Lock()
        self.tabs: dict[str, Tab] = {}
        # Tabs closed lately, oldest first: a generate queued before its tab closed runs
        # after the close, and would otherwise make a tab no browser will ever close.
        self._closed: dict[str, None] = {}
        self._dense_seconds: dict[tuple, float] = {}   # by (steps, guidance, size)

    # -- the page's actions -----------------------------------------------------------------
    def generate(self, tab_id: str, generation: Generation) -> PIL.Image.Image:
        """Generate densely and record; the generation becomes the tab's first history entry
        of a new line (earlier entries stay)."""
        _check_call(tab_id, "generation", generation, Generation)
        with self.device_lock:
            if tab_id in self._closed:
                raise FiseditError("this tab was closed; open the page again to generate")
            tab = self.tabs.get(tab_id) or Tab(EditSession(self.pipe, engine=self.engine))
            image = _generate(tab.session, generation)
            # The seed drawn for seed None: a replay of the entry must draw the same noise.
            generation = replace(generation, seed=tab.session.seed)
            # The history keeps its own image: the caller may draw on the one returned.
            entry = HistoryEntry(f"generated: {generation.prompt} (seed {generation.seed})",
                                 image.copy(), generation)
            tab.current, tab.last_edit, tab.evicted = entry, None, False
            tab.history.append(entry)
            self._used(tab_id, tab)
            self._enforce_budget(keep=tab_id)
            return image

    def edit(self, tab_id: str, recipe: EditRecipe) -> EditView:
        """Edit the tab's recording; the recording itself is unchanged until ``accept``."""
        _check_call(tab_id, "recipe", recipe, EditRecipe)
        with self.device_lock:
            tab = self.tabs.get(tab_id)
            self._require_recording(tab)
            if recipe.mask is not None:
                latent_size = tuple(tab.session.original.noise.shape[-2:])
                recipe = replace(recipe, mask=_latent_mask(recipe.mask, latent_size))
            result = _edit(tab.session, recipe)
            dense_s = self._dense_regeneration_s(tab.current.generation, recipe.prompt)
            # Only an edit the page is shown can be accepted.
            tab.last_edit = (recipe, result)
            self._used(tab_id, tab)
            return EditView(result.images[0], result.mask.cpu(),
                            result.plan.levels[0].active.cpu(), result.report, dense_s)

    def accept(self, tab_id: str) -> HistoryEntry:
        """Make the tab's last edit its new original (continuous editing); returns the new
        history entry."""
        _check_tab_id(tab_id)
        with self.device_lock:
            tab = self.tabs.get(tab_id)
            self._require_recording(tab)
            if tab.last_edit is None:
                raise FiseditError("there is no edit to accept yet: edit the image first")
            recipe, result = tab.last_edit
            if result.report["unchanged"]:
                raise FiseditError("the last edit changes nothing (its prompt and settings are "
                                   "the original's), so there is nothing to accept: change the "
                                   "edit prompt first (a painted mask alone changes nothing "
                                   "while the prompt is the original's)")
            tab.session.accept(result)
            # From the session's own copy: the caller may have drawn on the edit's image.
            entry = HistoryEntry(f"edit: {recipe.prompt}", tab.session.original.images[0].copy(),
                                 tab.current.generation,
                                 tab.current.accepted_edits + (recipe,))
            tab.current, tab.last_edit = entry, None
            tab.history.append(entry)
            self._used(tab_id, tab)
            self._enforce_budget(keep=tab_id)
            return _own_copy(entry)

    def restore(self, tab_id: str, index: int) -> HistoryEntry:
        """Go back to history entry ``index``: its recipe is replayed (generate, then each
        accepted edit and accept), which rebuilds its recording."""
        # (A bool is refused: True would silently mean entry 1.)
        _check_tab_id(tab_id)
        index = check_int("the history index", index, minimum=0)
        with self.device_lock:
            tab = self.tabs.get(tab_id)
            entries = [] if tab is None else tab.history
            if index >= len(entries):
                raise FiseditError(f"there is no history entry {index}; the history has "
                                   f"{len(entries)} entries")
            entry = entries[index]
            # Replayed in a new session, which replaces the tab's only once the whole replay
            # has run: a failure (an accepted edit's replay too) leaves the tab as it was.
            session = EditSession(self.pipe, engine=self.engine)
            _generate(session, entry.generation)
            for recipe in entry.accepted_edits:
                session.accept(_edit(session, recipe))
            tab.session, tab.current, tab.last_edit, tab.evicted = session, entry, None, False
            self._used(tab_id, tab)
            self._enforce_budget(keep=tab_id)
            return _own_copy(entry)

    def history(self, tab_id: str) -> list[HistoryEntry]:
        """The tab's history entries, oldest first (none for a tab that has generated
        nothing)."""
        _check_tab_id(tab_id)
        with self.device_lock:
            tab = self.tabs.get(tab_id)
            return [] if tab is None else [_own_copy(entry) for entry in tab.history]

    def close(self, tab_id: str) -> None:
        """Forget a tab (its browser tab was closed) and free its recording."""
        _check_tab_id(tab_id)
        with self.device_lock:
            self.tabs.pop(tab_id, None)
            self._closed[tab_id] = None
            if len(self._closed) > CLOSED_TABS_KEPT:
                del self._closed[next(iter(self._closed))]

    def recorded_bytes(self) -> int:
        """The bytes held by all tabs' recordings (what the budget bounds)."""
        with self.device_lock:
            return self._recorded_bytes()

    # -- helpers (called with device_lock held) --------------------------------------------
    def _used(self, tab_id: str, tab: Tab) -> None:
        """Keep ``tab`` (after a call in it succeeded) as the most recently used."""
        self.tabs[tab_id] = tab
        tab.last_used = time.monotonic()

    def _recorded_bytes(self) -> int:
        return sum(tab.session.cache_nbytes() for tab in self.tabs.values())

    def _require_recording(self, tab: Tab | None) -> None:
        if tab is not None and tab.evicted:
            raise FiseditError(
                "your recording was dropped to keep the app within its memory budget "
                f"({_megabytes(self.budget_bytes)} for all open tabs) while other tabs were "
                "busy; generate again, or click an entry of the history to rebuild it")
        if tab is None or tab.current is None:
            raise FiseditError("nothing to edit yet: generate an image first")

    def _dense_regeneration_s(self, generation: Generation, prompt: str) -> float:
        """Seconds of a plain dense run of the pipeline (no session) with the generation's
        settings, measured once per settings on this machine. It decodes to PIL like the edit
        does, so the two times cover the same work."""
        settings = (generation.steps, generation.guidance_scale, generation.size)
        if settings not in self._dense_seconds:
            start = time.perf_counter()
            self.pipe(prompt, num_inference_steps=generation.steps,
                      guidance_scale=generation.guidance_scale, height=generation.size,
                      width=generation.size, output_type="pil",
                      generator=torch.Generator("cpu").manual_seed(generation.seed))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._dense_seconds[settings] = time.perf_counter() - start
        return self._dense_seconds[settings]

    def _enforce_budget(self, keep: str) -> None:
        """Drop the least recently used other tabs' recordings until all fit the budget."""
        if self.budget_bytes is None:
            return
        others = sorted((tab.last_used, tab_id) for tab_id, tab in self.tabs.items()
                        if tab_id != keep and tab.current is not None)
        for _, tab_id in others:
            if self._recorded_bytes() <= self.budget_bytes:
                return
            tab = self.tabs[tab_id]
            # A fresh session drops the old one's recording (its cache) with it.
            tab.session = EditSession(self.pipe, engine=self.engine)
            tab.current, tab.last_edit, tab.evicted = None, None, True
        if self._recorded_bytes() > self.budget_bytes:
            warnings.warn(
                f"the recording of one tab takes {_megabytes(self._recorded_bytes())}, more "
                f"than the memory budget of {_megabytes(self.budget_bytes)} for all open tabs "
                "by itself; raise the budget (--memory-budget-mib)", UserWarning, stacklevel=3)


def _generate(session: EditSession, generation: Generation) -> PIL.Image.Image:
    return session.generate(
        generation.prompt, seed=generation.seed, num_inference_steps=generation.steps,
        guidance_scale=generation.guidance_scale, height=generation.size, width=generation.size,
        output_type="pil")[0]


def _edit(session: EditSession, recipe: EditRecipe) -> EditResult:
    return session.edit(recipe.prompt, mask=recipe.mask, probe_steps=recipe.probe_steps,
                        mask_estimator=recipe.mask_estimator, mask_mode=recipe.mask_mode,
                        output_type="pil")


def _own_copy(entry: HistoryEntry) -> HistoryEntry:
    """A history entry with its own copy of the image, for a caller who may draw on it."""
    return replace(entry, image=entry.image.copy())


def _check_tab_id(tab_id) -> None:
    """A page action's tab id: a str (the browser's session hash), checked before the device
    lock is taken."""
    if not isinstance(tab_id, str):
        raise FiseditError(f"the tab id must be a str, got {type(tab_id).__name__}")


def _check_call(tab_id, name: str, value, kind: type) -> None:
    """A page action's arguments: a str tab id and the action's dataclass, checked before the
    device lock is taken."""
    _check_tab_id(tab_id)
    if not isinstance(value, kind):
        raise FiseditError(f"the {name} must be a fisedit_compiler.app.pool.{kind.__name__}, "
                           f"got {type(value).__name__}")


def _latent_mask(mask, latent_size: tuple[int, int]) -> torch.Tensor:
    """A bool mask at ``latent_size`` from one at that size or an integer multiple (the image,
    or the image as shown): any marked pixel marks its latent pixel, as ``load_mask_png``
    does. ``mask`` holds bools (the page sends those), or a painting's 0/1 or 0/255 values
    (uint8 or float arrays, as image editors give them), or is a PIL image, read by its
    colours as mask PNGs are (``image_mask``); any other value (a soft mask's 0.3, NaN) is
    refused, not rounded: which pixels it marks would be a guess."""
    mask = torch.as_tensor(_mask_bools(mask))
    height, width = latent_size
    factor = mask.shape[0] // height if mask.dim() == 2 else 0
    if factor < 1 or tuple(mask.shape) != (height * factor, width * factor):
        raise FiseditError(f"the mask has shape {tuple(mask.shape)}; it must be the latent "
                           f"size {height}x{width} or a whole multiple of it (the image)")
    return torch.nn.functional.max_pool2d(mask[None, None].float(), factor)[0, 0] > 0


def _mask_bools(mask) -> np.ndarray:
    if isinstance(mask, PIL.Image.Image):
        # Read by its colours, as mask PNGs are: a palette image's array is its indices.
        return image_mask(mask).numpy()
    if isinstance(mask, torch.Tensor):
        if mask.is_meta:
            raise FiseditError("the mask is a tensor on the meta device, which holds no "
                               "values; pass one with values (on the CPU or a GPU)")
        mask = mask.detach().cpu()
        mask = (mask.float() if mask.dtype == torch.bfloat16 else mask).numpy()
    values = np.asarray(mask)
    if values.dtype == bool:
        return values
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise FiseditError(f"the mask must be an array of bools (True where to edit), or of "
                           f"0/1 or 0/255 values; got an array of {values.dtype}")
    if np.issubdtype(values.dtype, np.floating) and np.isnan(values).any():
        raise FiseditError("the mask holds NaN values; pass bools (True where to edit), or a "
                           "painting's 0/1 or 0/255 values")
    present = set(np.unique(values).tolist())
    if not (present <= {0, 1} or present <= {0, 255}):
        others = sorted(present - {0, 1, 255})[:3] or sorted(present)
        raise FiseditError(
            f"the mask holds values other than 0 and 1 (or 0 and 255), such as {others}: a "
            "mask marks each pixel edited or not; pass bools, or a painting's 0/1 or 0/255 "
            "values (threshold a soft mask yourself, e.g. mask > 0.5)")
    return values != 0


def _megabytes(nbytes: int | None) -> str:
    if nbytes is None:
        return "no limit"
    return f"{nbytes / 2**20:.0f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"
