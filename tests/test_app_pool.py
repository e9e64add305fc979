"""SessionPool: per-tab sessions, history replay, the shared memory budget (no gradio needed).

The shipped shapes model at 4 steps (1 probe step) keeps each call well under a second on CI.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fisedit_compiler import shapes, zoo
from fisedit_compiler.app.pool import EditRecipe, Generation, SessionPool
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
    with pytest.raises(FiseditError, match="probe_steps"):
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
    assert entry is accepted and len(pool.history("a")) == 2
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
