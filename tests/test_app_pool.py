"""SessionPool: per-tab sessions, history replay, the shared memory budget (no gradio needed).

The shipped shapes model at 4 steps (1 probe step) keeps each call well under a second on CI.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fisedit_compiler import shapes, zoo
from fisedit_compiler.app.pool import EditRecipe, Generation, SessionPool
from fisedit_compiler.edit_flow import EditSession
from fisedit_compiler.errors import FiseditError

GENERATION = Generation(shapes.DEMO_PROMPT, seed=0, steps=4, guidance_scale=5.0)
EDIT = EditRecipe(shapes.DEMO_EDIT, probe_steps=1)


@pytest.fixture(scope="module")
def pipe():
    pipe = zoo.pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_tabs_share_one_engine_and_keep_their_own_generations(pipe):
    pool = SessionPool(pipe)
    first = pool.generate("a", GENERATION)
    second = pool.generate("b", Generation("a small green triangle at the center on a white "
                                           "background", seed=1, steps=4, guidance_scale=5.0))
    assert pool.tabs["a"].session.engine is pool.tabs["b"].session.engine is pool.engine
    assert not np.array_equal(pixels(first), pixels(second))
    view = pool.edit("a", EDIT)
    # Tab a's edit is of tab a's generation: identical to it outside the recomputed region.
    scale = first.height // view.active.shape[0]
    outside = ~np.kron(view.active.numpy(), np.ones((scale, scale), dtype=bool))
    assert np.array_equal(pixels(view.image)[outside], pixels(first)[outside])
    assert not np.array_equal(pixels(view.image), pixels(first))
    assert view.dense_regeneration_s > 0 and view.report["timings_s"]["edit_s"] > 0


def test_refusals_are_library_errors(pipe):
    pool = SessionPool(pipe)
    with pytest.raises(FiseditError, match="nothing to edit yet"):
        pool.edit("a", EDIT)
    pool.generate("a", GENERATION)
    with pytest.raises(FiseditError, match="no edit to accept"):
        pool.accept("a")
    with pytest.raises(FiseditError, match=r"probe_steps.*\(an edit runs the generation's 4 "
                                            r"steps, and its last at least runs sparse\)"):
        pool.edit("a", EditRecipe(shapes.DEMO_EDIT, probe_steps=4))
    with pytest.raises(FiseditError, match="multiple"):
        pool.edit("a", EditRecipe(shapes.DEMO_EDIT, 1, mask=np.ones((10, 10), dtype=bool)))
    with pytest.raises(FiseditError, match="no history entry 5"):
        pool.restore("a", 5)


def test_painted_mask_is_pooled_to_the_latent_and_replaces_the_automatic_one(pipe):
    pool = SessionPool(pipe)
    image = pool.generate("a", GENERATION)
    latent = image.height // pipe.vae_scale_factor
    painted = np.zeros((image.height * 4, image.width * 4), dtype=bool)   # as shown: 4x
    per_latent = painted.shape[0] // latent
    painted[:per_latent + 1, :per_latent + 1] = True    # touches latent pixels (0..1, 0..1)
    view = pool.edit("a", EditRecipe(shapes.DEMO_EDIT, probe_steps=0, mask=painted))
    expected = torch.zeros(latent, latent, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(view.mask, expected)
    assert view.report["mask_source"] == "user"


def test_going_back_replays_the_history_exactly(pipe):
    pool = SessionPool(pipe)
    pool.generate("a", GENERATION)
    pool.edit("a", EDIT)
    accepted = pool.accept("a")
    further = EditRecipe("a large yellow circle at the center and a small green square at "
                         "the top left on a white background", probe_steps=1)
    after_accept = pool.edit("a", further)
    pool.restore("a", 0)                            # back to the generation ...
    assert pool.tabs["a"].current.accepted_edits == ()
    entry = pool.restore("a", 1)                    # ... and forward to the accepted edit
    assert entry == accepted and len(pool.history("a")) == 2        # (PIL compares pixels)
    again = pool.edit("a", further)
    assert np.array_equal(pixels(again.image), pixels(after_accept.image))


def test_budget_drops_the_least_recently_used_recording_and_tells_its_owner(pipe):
    pool = SessionPool(pipe)
    pool.generate("a", GENERATION)
    one_recording = pool.recorded_bytes()
    pool.budget_bytes = one_recording * 3 // 2      # room for one tab's recording only
    pool.generate("b", GENERATION)
    assert pool.tabs["a"].evicted and not pool.tabs["b"].evicted
    assert pool.recorded_bytes() == one_recording
    with pytest.raises(FiseditError, match="memory budget"):
        pool.edit("a", EDIT)
    pool.edit("b", EDIT)                            # b is unaffected
    pool.restore("a", 0)                            # a rebuilds its recording; now b goes
    assert pool.tabs["b"].evicted and not pool.tabs["a"].evicted
    pool.edit("a", EDIT)


# ------------------------------------------------------------- refused input changes nothing

def snapshot(pool):
    """What a refused call must leave as it was: the tabs, each one's state and history."""
    return {tab_id: (tab.session, tab.current, tab.last_edit, list(tab.history), tab.evicted)
            for tab_id, tab in pool.tabs.items()}


def assert_unchanged(pool, before):
    after = snapshot(pool)
    assert after.keys() == before.keys()
    for tab_id, state in before.items():
        assert all(a is b for a, b in zip(after[tab_id][:3], state[:3])), tab_id
        assert after[tab_id][3:] == state[3:], tab_id


@pytest.fixture(scope="module")
def edited_pool(pipe):
    """A pool whose tab "a" has a generation and an edit not yet accepted."""
    pool = SessionPool(pipe)
    pool.generate("a", GENERATION)
    pool.edit("a", EDIT)
    return pool


@pytest.mark.parametrize("index, message", [
    (True, "history index must be an int, got the bool True"),
    (0.5, "history index must be an int, got float 0.5"),
    ("0", "history index must be an int, got str '0'"),
    (-1, "history index -1 is out of range"),
    (1, "no history entry 1; the history has 1 entries"),
])
def test_restore_refuses_a_bad_index_and_changes_nothing(edited_pool, index, message):
    before = snapshot(edited_pool)
    with pytest.raises(FiseditError, match=message):
        edited_pool.restore("a", index)
    assert_unchanged(edited_pool, before)


def _fails(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")


@pytest.mark.parametrize("where, call", [
    ("engine.prepare", lambda pool: pool.generate("a", replace(GENERATION, seed=5))),
    ("pool._dense_regeneration_s", lambda pool: pool.edit("a", EDIT)),
    ("EditSession.generate", lambda pool: pool.restore("a", 0)),
], ids=["generate-prepare", "edit-timing", "restore-replay"])
def test_a_call_that_fails_on_the_way_changes_nothing(edited_pool, monkeypatch, where, call):
    """Out of memory late in a call (the CUDA-graph captures after a generation, the dense
    timing run after an edit, the replay of a restore): the tab keeps its recording, its
    current entry and the edit it can accept."""
    pool = edited_pool
    session = pool.tabs["a"].session
    owner, name = where.split(".")
    target = {"engine": pool.engine, "pool": pool, "EditSession": EditSession}[owner]
    before, original = snapshot(pool), session.original
    with monkeypatch.context() as patch:
        patch.setattr(target, name, _fails)
        with pytest.raises(torch.OutOfMemoryError):
            call(pool)
    assert_unchanged(pool, before)
    assert session.original is original


def test_a_restore_whose_accepted_edit_fails_to_replay_changes_nothing(pipe, monkeypatch):
    # The replay runs in a new session: the tab keeps its recording until all of it ran.
    pool = SessionPool(pipe)
    pool.generate("a", GENERATION)
    pool.edit("a", EDIT)
    pool.accept("a")
    pool.restore("a", 0)
    before, original = snapshot(pool), pool.tabs["a"].session.original
    with monkeypatch.context() as patch:
        patch.setattr(EditSession, "accept", _fails)
        with pytest.raises(torch.OutOfMemoryError):
            pool.restore("a", 1)
    assert_unchanged(pool, before)
    assert pool.tabs["a"].session.original is original
    pool.edit("a", EDIT)                            # the tab still edits its recording


def test_a_drawn_seed_is_kept_and_history_images_are_the_pools_own(pipe):
    pool = SessionPool(pipe)
    image = pool.generate("a", replace(GENERATION, seed=None))
    entry = pool.history("a")[0]
    assert entry.generation.seed == pool.tabs["a"].session.seed
    image.paste((0, 0, 0), (0, 0, image.width, image.height))    # the caller draws on it
    assert pool.history("a")[0].image == entry.image != image
    pool.edit("a", EDIT)                            # times the dense run with the drawn seed
    restored = pool.restore("a", 0)
    assert restored.image == entry.image
    assert torch.equal(pool.tabs["a"].session.original.noise,
                       torch.randn(pool.tabs["a"].session.original.noise.shape,
                                   generator=torch.Generator().manual_seed(entry.generation.seed)))


def test_calls_of_an_unknown_tab_create_no_tab(edited_pool):
    pool = edited_pool
    before = snapshot(pool)
    assert pool.history("new") == []
    with pytest.raises(FiseditError, match="no history entry 0; the history has 0 entries"):
        pool.restore("new", 0)
    with pytest.raises(FiseditError, match="nothing to edit yet"):
        pool.edit("new", EDIT)
    with pytest.raises(FiseditError, match="nothing to edit yet"):
        pool.accept("new")
    with pytest.raises(FiseditError, match="seed -1 is out of range"):
        pool.generate("new", Generation("a red circle", seed=-1, steps=4, guidance_scale=5.0))
    # ... and a refused generate in a tab that has one keeps its state (its last edit too).
    with pytest.raises(FiseditError, match="seed -1 is out of range"):
        pool.generate("a", Generation("a red circle", seed=-1, steps=4, guidance_scale=5.0))
    assert_unchanged(pool, before)
    assert "new" not in pool.tabs


def test_a_generate_that_waited_while_its_tab_closed_makes_no_tab(pipe, monkeypatch):
    """The page's close handler can run before a generate queued in the same tab: that
    generate must not make a tab (and a recording) no browser will ever close."""
    from fisedit_compiler.app import pool as pool_module

    monkeypatch.setattr(pool_module, "CLOSED_TABS_KEPT", 2)
    pool = SessionPool(pipe)
    pool.close("gone")
    with pytest.raises(FiseditError, match="this tab was closed; open the page again"):
        pool.generate("gone", GENERATION)
    assert "gone" not in pool.tabs
    pool.close("x")
    pool.close("y")             # past CLOSED_TABS_KEPT: the oldest closed id is forgotten
    assert list(pool._closed) == ["x", "y"]


@pytest.mark.parametrize("call, message", [
    (lambda pool: pool.generate(7, GENERATION), "the tab id must be a str, got int"),
    (lambda pool: pool.generate("a", {"prompt": "x"}),
     "the generation must be a fisedit_compiler.app.pool.Generation, got dict"),
    (lambda pool: pool.edit(None, EDIT), "the tab id must be a str, got NoneType"),
    (lambda pool: pool.edit("a", shapes.DEMO_EDIT),
     "the recipe must be a fisedit_compiler.app.pool.EditRecipe, got str"),
    (lambda pool: pool.edit("a", EditRecipe(shapes.DEMO_EDIT, 1, mask=torch.ones(
        16, 16, dtype=torch.bool, device="meta"))), "on the meta device"),
    (lambda pool: pool.accept([]), "the tab id must be a str, got list"),
    (lambda pool: pool.restore(None, 0), "the tab id must be a str, got NoneType"),
    (lambda pool: pool.history(3), "the tab id must be a str, got int"),
    (lambda pool: pool.close(3), "the tab id must be a str, got int"),
], ids=["generate-tab", "generate-dict", "edit-tab", "edit-str", "meta-mask", "accept-tab",
        "restore-tab", "history-tab", "close-tab"])
def test_a_call_of_the_wrong_kind_is_refused_and_changes_nothing(edited_pool, call, message):
    before = snapshot(edited_pool)
    with pytest.raises(FiseditError, match=message):
        call(edited_pool)
    assert_unchanged(edited_pool, before)


@pytest.mark.parametrize("budget, message", [
    (-1, "budget_bytes -1 is out of range"), (1.5, "budget_bytes must be an int"),
    ("1GB", "budget_bytes must be an int")])
def test_a_bad_budget_is_refused_when_the_pool_is_made(pipe, budget, message):
    with pytest.raises(FiseditError, match=message):
        SessionPool(pipe, budget_bytes=budget)


def soft(value):
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[2:6, 2:6] = value
    return mask


@pytest.mark.parametrize("recipe, message", [
    (EditRecipe(shapes.DEMO_EDIT, 1, mask=soft(0.3)), r"values other than 0 and 1 .*\[0.3"),
    (EditRecipe(shapes.DEMO_EDIT, 1, mask=soft(np.nan)), "the mask holds NaN"),
    (EditRecipe(shapes.DEMO_EDIT, 1, mask=np.where(soft(1) > 0, 255, soft(1)).astype(np.uint8)
                + np.eye(16, dtype=np.uint8)), r"such as \[0, 1, 255\]"),
    (EditRecipe(shapes.DEMO_EDIT, 1, mask=np.full((16, 16), "x")), "array of <U1"),
    (EditRecipe(shapes.DEMO_EDIT, 1, mask_mode="bogus"), "mask_mode must be one of"),
    (EditRecipe(shapes.DEMO_EDIT, 1, mask=soft(1) > 0, mask_estimator="bogus"),
     "mask_estimator must be one of"),
    # Choices that would not apply are refused as EditSession.edit refuses them, not dropped.
    (EditRecipe(shapes.DEMO_EDIT, 1, mask_mode="intersect"),
     "mask_mode='intersect' says how a user mask combines.*no user mask is given"),
    (EditRecipe(shapes.DEMO_EDIT, 1, mask=soft(1) > 0, mask_estimator="x0"),
     "mask_estimator='x0' has nothing to do"),
    (EditRecipe(shapes.DEMO_EDIT, 1, mask_mode=None), "mask_mode must be one of"),
], ids=["soft", "nan", "mixed-scales", "strings", "bad-mode", "bad-estimator",
        "mode-without-mask", "estimator-beside-a-replacing-mask", "no-mode"])
def test_a_bad_mask_or_choice_is_refused(edited_pool, recipe, message):
    before = snapshot(edited_pool)
    with pytest.raises(FiseditError, match=message):
        edited_pool.edit("a", recipe)
    assert_unchanged(edited_pool, before)


@pytest.mark.parametrize("mask", [
    np.where(soft(1) > 0, 255, 0).astype(np.uint8),          # a painting's alpha
    soft(1.0),                                               # 0/1 floats
    soft(255.0),                                             # 0/255 floats
    torch.from_numpy(soft(1.0) > 0),                         # a bool tensor
    np.kron(soft(1) > 0, np.ones((4, 4))).astype(np.uint8),  # 0/1 at the image's size
], ids=["uint8-255", "float-01", "float-255", "bool-tensor", "image-size"])
def test_a_painting_of_0_1_or_0_255_values_is_the_bool_mask(mask):
    from fisedit_compiler.app.pool import _latent_mask

    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(_latent_mask(mask, (16, 16)), expected)


def test_a_pil_image_mask_is_read_by_its_colours_not_its_palette_indices():
    """A palette image's array is its indices: black at index 1 and white at index 0 marked
    the black surroundings. Images are read as mask PNGs are (white = edit)."""
    from PIL import Image

    from fisedit_compiler.app.pool import _latent_mask

    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[2:6, 2:6] = True
    palette = Image.fromarray(np.where(expected.numpy(), 0, 1).astype(np.uint8), mode="P")
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)     # index 0 white, 1 black
    grey = Image.fromarray(np.where(expected.numpy(), 255, 0).astype(np.uint8))
    for image in (palette, grey, grey.convert("RGBA")):
        assert torch.equal(_latent_mask(image, (16, 16)), expected), image.mode
    # 0/1 bytes as an image (Image.fromarray of a bool mask as uint8) would mark nothing.
    with pytest.raises(FiseditError, match=r"holds 0/1 values, so it marks no pixel.*scale it "
                                           r"to 0/255"):
        _latent_mask(Image.fromarray(expected.numpy().astype(np.uint8)), (16, 16))


def test_an_edit_with_a_uint8_painting_equals_the_bool_one(pipe):
    pool = SessionPool(pipe)
    pool.generate("a", GENERATION)
    painted = soft(1) > 0
    recipe = EditRecipe(shapes.DEMO_EDIT, probe_steps=0, mask=painted)
    as_bools = pool.edit("a", recipe)
    as_uint8 = pool.edit("a", replace(recipe, mask=painted.astype(np.uint8) * 255))
    assert torch.equal(as_uint8.mask, as_bools.mask)
    assert np.array_equal(pixels(as_uint8.image), pixels(as_bools.image))
