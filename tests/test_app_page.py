"""The editor page, served on 127.0.0.1: its functions through gradio_client (each Client is a
browser tab of its own), two tabs at once, and one real browser (headless Debian chromium,
driven by selenium through Debian's chromedriver).

The page runs the shipped shapes model at 4 steps and 1 probe step. The browser test skips
without chromium and chromedriver unless FISEDIT_REQUIRE_BROWSER=1 (set by .ci/run).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import urllib.request
import warnings
from io import BytesIO

import numpy as np
import PIL.Image
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from fisedit_compiler import shapes, zoo  # noqa: E402
from fisedit_compiler.app.page import (PageDefaults, _dense_steps,  # noqa: E402
                                       _edit_recipe, _edit_steps, _messages_shown, _painted,
                                       _whole, build_page, in_page_words)
from fisedit_compiler.edit_flow.mask import DEFAULT_ESTIMATOR  # noqa: E402
from fisedit_compiler.errors import FiseditError  # noqa: E402
from fisedit_compiler.app.pool import SessionPool  # noqa: E402

DEFAULTS = PageDefaults(shapes.DEMO_PROMPT, shapes.DEMO_EDIT, steps=4, probe_steps=1,
                        guidance_scale=5.0, check_prompt=shapes.check_caption)
OTHER_PROMPT = "a small green triangle at the bottom right on a white background"
OTHER_EDIT = "a small purple triangle at the bottom right on a white background"


def test_painted_layers_are_read_by_their_alpha_and_a_layer_without_one_is_refused():
    stroke = np.zeros((8, 8, 4), dtype=np.uint8)
    stroke[2:4, 2:4] = (255, 0, 255, 255)
    other = np.zeros((8, 8, 4), dtype=np.uint8)
    other[6, 6, 3] = 1
    painted = _painted({"layers": [stroke, other]})
    assert painted.sum() == 5 and painted[2:4, 2:4].all() and painted[6, 6]
    assert _painted({"layers": [np.zeros((8, 8, 4), dtype=np.uint8)]}) is None
    assert _painted(None) is None and _painted({"layers": []}) is None
    with pytest.raises(FiseditError, match=r"RGBA image \[H, W, 4\].*got \(8, 8, 3\)"):
        _painted({"layers": [stroke, stroke[..., :3]]})
    with pytest.raises(FiseditError, match=r"layers must have one size.*\(8, 8\), \(9, 8\)"):
        _painted({"layers": [stroke, np.zeros((9, 8, 4), dtype=np.uint8)]})
    # A float layer's alpha is read as any value above 0: NaN would read as no stroke.
    soft = stroke.astype(np.float32) / 255
    assert np.array_equal(_painted({"layers": [soft]}), _painted({"layers": [stroke]}))
    soft[5, 5, 3] = np.nan
    with pytest.raises(FiseditError, match="alpha that is not finite"):
        _painted({"layers": [soft]})
    with pytest.raises(FiseditError, match="holds object values"):
        _painted({"layers": [stroke.astype(object)]})


def test_a_painting_that_is_not_the_editors_value_is_refused():
    with pytest.raises(FiseditError, match="the painting must be the image editor's value"):
        _painted(np.zeros((4, 4, 4), dtype=np.uint8))
    # (A truth test of an array raised numpy's "ambiguous" ValueError.)
    with pytest.raises(FiseditError, match="'layers' must be a list of RGBA images, got "
                                           "ndarray"):
        _painted({"layers": np.zeros((4, 4, 4), dtype=np.uint8)})


def test_number_fields_are_whole_numbers_not_truncated():
    assert _whole("Steps", 4.0) == 4 and _whole("Seed", None, empty=0) == 0
    assert _whole("Dense steps", None, empty=None) is None
    with pytest.raises(FiseditError, match="the Steps field is empty; enter a whole number"):
        _whole("Steps", None)
    # By the page's label, with the fix; 1e300 as such, not as its 301 digits.
    for value, shown in [(0.9, "0.9"), (float("nan"), "nan"), (float("inf"), "inf")]:
        with pytest.raises(FiseditError, match=f"Dense steps must be an int, got float {shown}; "
                                               "enter a whole number"):
            _whole("Dense steps", value)
    # A whole number past 2**53 arrives from the browser as a float that is no longer it.
    assert _whole("Seed", float(2 ** 53 - 1)) == 2 ** 53 - 1
    for value, shown in [(1e300, r"1e\+300"), (1e21, r"1e\+21"), (-2.0 ** 53, r"-9\.0072e\+15")]:
        with pytest.raises(FiseditError, match=f"Seed {shown} cannot come from the page "
                                               "exactly.*below 9007199254740992 in size"):
            _whole("Seed", value)


def test_the_librarys_warnings_reach_the_page():
    """A UserWarning raised while a handler runs is shown as the page's warning (outside a
    gradio event, gr.Warning warns again); a refusal is the page's error."""
    import warnings

    def handler():
        warnings.warn("the estimated mask and the user mask share no latent pixel", UserWarning)
        return "done"

    with pytest.warns(UserWarning, match="share no latent pixel"):
        assert _messages_shown(handler)() == "done"

    def refused():
        raise FiseditError("the edit prompt is empty")

    with pytest.raises(gr.Error, match="the edit prompt is empty"):
        _messages_shown(refused)()


def test_warnings_of_handlers_in_two_threads_reach_their_own_tab(monkeypatch):
    """gradio runs handlers in worker threads at once; each tab is shown its own warnings,
    and the process's warning state is as before afterwards."""
    import threading
    import warnings

    from fisedit_compiler.app import page

    shown = []
    monkeypatch.setattr(page.gr, "Warning", lambda message, duration=None: shown.append(
        (threading.current_thread().name, message)))
    a_running = threading.Event()

    def tab_a():
        a_running.set()
        time.sleep(0.2)                       # B would start meanwhile
        warnings.warn("warning of A", UserWarning)

    def tab_b():
        warnings.warn("warning of B", UserWarning)
        time.sleep(0.4)                       # ... and end after A

    before = warnings.showwarning, list(warnings.filters)
    first = threading.Thread(target=_messages_shown(tab_a), name="A")
    second = threading.Thread(target=_messages_shown(tab_b), name="B")
    first.start()
    a_running.wait()
    second.start()
    first.join()
    second.join()
    assert sorted(shown) == [("A", "warning of A"), ("B", "warning of B")]
    assert (warnings.showwarning, list(warnings.filters)) == before


@pytest.fixture(scope="module")
def served():
    """(pool, url) of the page served on a free port of 127.0.0.1."""
    pipe = zoo.pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    pool = SessionPool(pipe)
    page = build_page(pool, DEFAULTS)
    page.queue(default_concurrency_limit=None)    # as the command: the pool's lock serialises
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, url, _ = page.launch(server_name="127.0.0.1", server_port=port, ssr_mode=False,
                            prevent_thread_lock=True, quiet=True)
    yield pool, url
    page.close()


def client(url):
    return gradio_client.Client(url, verbose=False)


def generate(tab, prompt=DEFAULTS.prompt):
    return tab.predict(prompt, 0, DEFAULTS.steps, DEFAULTS.guidance_scale,
                       api_name="/generate")


def edit(tab, prompt=DEFAULTS.edit_prompt, probe_steps=1, estimator="probe", mask_mode="replace",
         painting=None):
    return tab.predict(prompt, probe_steps, estimator, mask_mode, painting, api_name="/edit")


def read(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB")).astype(np.int16)


def only_inside(original: np.ndarray, edited: np.ndarray, active) -> None:
    """``edited`` equals ``original`` outside the latent region ``active`` (scaled to the
    shown size) and differs from it somewhere inside."""
    scale = original.shape[0] // active.shape[0]
    inside = np.kron(active.numpy(), np.ones((scale, scale), dtype=bool))
    assert inside.any() and not inside.all()
    assert np.array_equal(edited[~inside], original[~inside])
    assert not np.array_equal(edited[inside], original[inside])


def corner_painted(original, folder):
    """An editor value: the shown original with a small top-left square painted (an eighth
    of the side: a larger region crosses the engine's dense-fallback threshold)."""
    shown = PIL.Image.open(original)
    layer = np.zeros((shown.height, shown.width, 4), dtype=np.uint8)
    layer[: shown.height // 8, : shown.width // 8] = (255, 0, 255, 255)
    PIL.Image.fromarray(layer).save(folder / "layer.png")
    return {"background": gradio_client.handle_file(original),
            "layers": [gradio_client.handle_file(str(folder / "layer.png"))],
            "composite": None}


def test_generate_edit_accept_through_the_client(served, tmp_path):
    pool, url = served
    tab = client(url)
    original, _, edited, overlay, _, history = generate(tab)
    assert edited is None and overlay is None and len(history) == 1
    # A painted region: at 4 steps the estimators call the demo edit a global change.
    edited, overlay, timings = edit(tab, probe_steps=0,
                                    painting=corner_painted(original, tmp_path))
    assert "dense regeneration" in timings and "Recomputed" in timings
    only_inside(read(original), read(edited), pool.tabs[tab.session_hash].last_edit[1]
                .plan.levels[0].active)
    assert not np.array_equal(read(overlay), read(edited))     # the region is tinted
    new_original, _, _, _, status, history = tab.predict(api_name="/accept")
    assert status.startswith("Accepted") and len(history) == 2
    assert np.array_equal(read(new_original), read(edited))   # the edit is the new original
    edit(tab, OTHER_EDIT, probe_steps=0,                        # keeps editing from there
         painting=corner_painted(new_original, tmp_path))


def test_the_mask_estimator_is_a_choice_of_the_page(served):
    pool, url = served
    tab = client(url)
    generate(tab)
    _, _, timings = edit(tab, probe_steps=None, estimator="noise-contrast")
    assert "by noise-contrast" in timings
    assert pool.tabs[tab.session_hash].last_edit[1].report["mask_estimator"] == "noise-contrast"


def test_refused_inputs_show_the_library_message(served):
    _, url = served
    tab = client(url)
    with pytest.raises(gradio_client.exceptions.AppError, match="nothing to edit yet"):
        edit(tab)
    generate(tab)
    with pytest.raises(gradio_client.exceptions.AppError, match="no edit to accept"):
        tab.predict(api_name="/accept")
    # Named as the page labels the field, beside the library's keyword.
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=r"Dense steps \(probe_steps\) 4 is out of range.*<= 3"):
        edit(tab, probe_steps=4)
    # The shapes model draws only its caption grammar; a misspelt colour is refused.
    typo = DEFAULTS.edit_prompt.replace("yellow", "yelow")
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=r"the edit prompt is not a caption the 'shapes' model knows"):
        edit(tab, typo)
    with pytest.raises(gradio_client.exceptions.AppError,
                       match=r"the prompt is not a caption the 'shapes' model knows"):
        generate(tab, typo)


def test_messages_name_the_fields_as_the_page_labels_them():
    assert in_page_words("guidance_scale 1e+38 overflows; lower guidance_scale") == (
        "Guidance scale (guidance_scale) 1e+38 overflows; lower Guidance scale "
        "(guidance_scale)")
    assert in_page_words("num_inference_steps 0 is out of range") == \
        "Steps (num_inference_steps) 0 is out of range"
    assert in_page_words("max_num_inference_steps") == "max_num_inference_steps"   # a word only


API_TERMS = ("mask=", "result.", "SparseConfig", "U-Net inputs", "pipeline arguments",
             "user mask", "edit_flow.")


def test_library_messages_reach_the_page_in_its_words():
    """The library's messages name Python API terms; the page shows them in its own words
    (a painted mask, the edit prompt), the fields labelled as the page labels them."""
    from fisedit_compiler.app.pool import EditRecipe, Generation
    from fisedit_compiler.edit_flow.session import check_mask_choice, plan_note

    pipe = zoo.pipeline("shapes")
    pipe.set_progress_bar_config(disable=True)
    pool = SessionPool(pipe)
    pool.generate("a", Generation(DEFAULTS.prompt, seed=0, steps=4, guidance_scale=5.0))
    far_corner = np.zeros((16, 16), dtype=bool)
    far_corner[15, 15] = True
    with pytest.warns(UserWarning, match="share no latent pixel") as caught:
        pool.edit("a", EditRecipe(DEFAULTS.edit_prompt, mask=far_corner, mask_mode="intersect",
                                  mask_estimator="noise-contrast"))
    messages = [str(warning.message) for warning in caught if "share no" in str(warning.message)]
    for call in (lambda: check_mask_choice(mask_estimator="probe", probe_steps=0, num_steps=4,
                                           user_mask=None, mask_mode=None),
                 lambda: check_mask_choice(mask_estimator="probe", probe_steps=None,
                                           num_steps=4, user_mask="mask=", mask_mode=None)):
        with pytest.raises(FiseditError) as info:
            call()
        messages.append(str(info.value))
    messages.append(plan_note({"unchanged": True}))
    messages.append(plan_note({"unchanged": False, "global_change": False,
                               "mask_area_fraction": 0.5,
                               "macs": {"unet_call": {"levels": [{"dense": True}]}}}))
    for message in messages:
        shown = in_page_words(message)
        assert not [term for term in API_TERMS if term in shown], shown
    assert "the estimated mask and the painted mask (Mask mode (mask_mode)='intersect')" in \
        in_page_words(messages[0])
    assert "its prompt and settings are the original's" in in_page_words(messages[3])


def test_the_steps_are_named_as_they_ran():
    sparse = {"probe_steps": 1, "sparse_steps": 3, "active_area_fraction": 0.25,
              "mask_estimator": "probe", "mask_unet_evaluations": 0}
    assert (_dense_steps(sparse), _edit_steps(sparse)) == ("1 dense step", "3 sparse steps")
    assert _edit_steps(dict(sparse, mask_estimator=None)) == "3 sparse steps"
    # A one-call estimator's U-Net call runs at step 0: in the first group of steps that ran,
    # and nowhere where it did not run (a change it cannot see, decided without it).
    one_call = dict(sparse, mask_estimator="noise-contrast", mask_unet_evaluations=2)
    assert (_dense_steps(one_call), _edit_steps(one_call)) == \
        ("1 dense step with the mask estimate", "3 sparse steps")
    assert _edit_steps(dict(one_call, probe_steps=0)) == "3 sparse steps with the mask estimate"
    assert _edit_steps(dict(one_call, probe_steps=0, mask_unet_evaluations=0)) == \
        "3 sparse steps"
    # A plan over the whole latent (a global change, a large mask) runs them dense.
    assert _edit_steps(dict(sparse, active_area_fraction=1.0, sparse_steps=1)) == \
        "1 edit step (run dense)"


def test_a_chosen_estimator_beside_a_replacing_painting_is_warned_about():
    painting = np.ones((4, 4), dtype=bool)
    with pytest.warns(UserWarning, match="replaces the automatic mask, so the chosen mask "
                                         "estimator 'probe' is not used; choose intersect"):
        recipe = _edit_recipe("a blue circle", None, painting, "replace", "probe")
    assert recipe.mask_estimator is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # the radio's default is no choice: no warning
        _edit_recipe("a blue circle", None, painting, "replace", DEFAULT_ESTIMATOR)
        assert _edit_recipe("a blue circle", None, painting, "intersect",
                            "probe").mask_estimator == "probe"


def test_a_null_prompt_from_a_client_is_refused_by_name(served):
    _, url = served
    tab = client(url)
    with pytest.raises(gradio_client.exceptions.AppError, match="the prompt must be one str"):
        tab.predict(None, 0, DEFAULTS.steps, DEFAULTS.guidance_scale, api_name="/generate")


def test_a_fraction_typed_into_a_number_field_is_refused_not_rounded(served):
    _, url = served
    tab = client(url)
    with pytest.raises(gradio_client.exceptions.AppError, match="Seed must be an int, got "
                                                                "float 1.5; enter a whole"):
        tab.predict(DEFAULTS.prompt, 1.5, DEFAULTS.steps, DEFAULTS.guidance_scale,
                    api_name="/generate")


def test_an_edit_that_changes_nothing_says_so_and_is_not_accepted(served):
    _, url = served
    tab = client(url)
    original = generate(tab)[0]
    edited, _, timings = edit(tab, DEFAULTS.prompt, probe_steps=None,
                              estimator="noise-contrast")
    assert "The edit changes nothing: its prompt and settings are the original's" in timings
    assert "recomputing nothing" in timings and "x**" not in timings     # no speedup shown
    assert np.array_equal(read(edited), read(original))
    with pytest.raises(gradio_client.exceptions.AppError, match="changes nothing.*nothing to "
                                                                "accept: change the edit prompt"):
        tab.predict(api_name="/accept")


def test_painted_mask_through_the_client(served, tmp_path):
    pool, url = served
    tab = client(url)
    original = generate(tab)[0]
    edit(tab, probe_steps=0, painting=corner_painted(original, tmp_path))
    recipe, result = pool.tabs[tab.session_hash].last_edit
    latent = result.mask.shape[0]
    assert result.report["mask_source"] == "user"
    assert result.mask[: latent // 8, : latent // 8].all()
    assert result.mask.sum() == (latent // 8) ** 2


def test_two_tabs_at_once_each_get_what_they_get_alone(served):
    _, url = served
    work = {"a": (DEFAULTS.prompt, DEFAULTS.edit_prompt), "b": (OTHER_PROMPT, OTHER_EDIT)}
    alone = {}
    for name, (prompt, new_prompt) in work.items():
        tab = client(url)
        alone[name] = (read(generate(tab, prompt)[0]), read(edit(tab, new_prompt)[0]))
    together, spans, errors = {}, {}, []
    start = threading.Barrier(len(work))

    def run(name):
        try:
            tab = client(url)
            prompt, new_prompt = work[name]
            start.wait()
            began = time.monotonic()
            original = read(generate(tab, prompt)[0])
            together[name] = (original, read(edit(tab, new_prompt)[0]))
            spans[name] = (began, time.monotonic())
        except Exception as error:    # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    (a_start, a_end), (b_start, b_end) = spans["a"], spans["b"]
    assert a_start < b_end and b_start < a_end          # the two tabs' work overlapped
    for name in work:
        assert np.array_equal(together[name][0], alone[name][0])
        assert np.array_equal(together[name][1], alone[name][1])


def _browser_tools() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.mark.skipif(_browser_tools() is None and os.environ.get("FISEDIT_REQUIRE_BROWSER") != "1",
                    reason="needs chromium and chromedriver (apt-get install chromium "
                           "chromium-driver); FISEDIT_REQUIRE_BROWSER=1 makes this a failure")
def test_the_page_in_a_real_browser(served):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pool, url = served
    assert _browser_tools() is not None, "chromium and chromedriver are not installed"
    chromium, driver_path = _browser_tools()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1600"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(browser, 240)
        browser.get(url)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#generate"))

        def shown(elem_id):
            images = browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
            return images[0].get_attribute("src") if images else None

        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        original_src = wait.until(lambda b: shown("original"))
        browser.find_element(By.CSS_SELECTOR, "#edit").click()
        edited_src = wait.until(lambda b: shown("edited"))
        browser_tab = max(pool.tabs.values(), key=lambda tab: tab.last_used)
        active = browser_tab.last_edit[1].plan.levels[0].active
        original, edited = (np.asarray(PIL.Image.open(BytesIO(urllib.request.urlopen(src)
                                                              .read())).convert("RGB"))
                            .astype(np.int16) for src in (original_src, edited_src))
        only_inside(original, edited, active)
    finally:
        browser.quit()
