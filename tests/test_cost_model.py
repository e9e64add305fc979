"""The cost model's thresholds from calibration measurements (engine/cost_model.py).

Timing needs a GPU; how measurements become thresholds does not, and is what decides whether
an edit can run slower than dense.
"""

import pytest

import fisedit_compiler as fc
from fisedit_compiler import zoo
from fisedit_compiler.engine import cost_model
from fisedit_compiler.engine.cost_model import CALIBRATION_MASKS, thresholds_from
from fisedit_compiler.execution.plan import MaskPlan


def measured(fractions, best_first_dense_level):
    return {"fractions": fractions, "best_first_dense_level": best_first_dense_level}


def test_threshold_lies_between_the_last_sparse_win_and_the_first_dense_win():
    thresholds = thresholds_from([measured([0.1, 0.2], 2), measured([0.3, 0.4], 1),
                                  measured([0.5, 0.6], 0)], levels=2)
    assert thresholds == pytest.approx((0.4, 0.3))
    # Plans made with them choose as measured: level 0 sparse at 0.3, both dense at 0.5.
    assert 0.3 <= thresholds[0] < 0.5 and 0.2 <= thresholds[1] < 0.4


def test_layouts_that_disagree_make_the_level_dense_where_any_lost():
    # A square won sparse at 0.39; scattered squares lost at 0.37 (session 4, run 3).
    thresholds = thresholds_from([measured([0.39], 1), measured([0.37], 0)], levels=1)
    assert 0.36 < thresholds[0] < 0.37          # 0.37 > threshold: dense


def test_only_the_first_dense_level_counts_as_a_dense_win():
    """Session 8, run 3: a 50% square was best all dense (its finest level at 0.56 decided
    that); a scattered 20% mask was best all sparse with its coarsest level at 0.59. The
    square's coarsest level was dense by rule, not by its fraction: it must not pull level 3's
    threshold under 0.59."""
    scattered, square = [0.371, 0.371, 0.371, 0.594], [0.5625] * 4
    thresholds = thresholds_from([measured(scattered, 4), measured(square, 0)], levels=4)
    assert 0.371 < thresholds[0] < 0.5625
    assert all(threshold > 0.594 for threshold in thresholds[1:])
    config = fc.SparseConfig()      # SD1.5's levels under the default tiles and dilation
    levels = [(64, 64), (32, 32), (16, 16), (8, 8)]
    for layout, area, fractions in [("scattered", 0.2, scattered), ("blob", 0.5, square)]:
        mask = CALIBRATION_MASKS[layout]((64, 64), area)
        sparse = MaskPlan(mask, levels, config.tiles_for(levels), config.dilation, 1.0)
        assert sparse.fractions() == pytest.approx(fractions, abs=1e-3)     # run 3's masks
        plan = MaskPlan(mask, levels, config.tiles_for(levels), config.dilation,
                        list(thresholds))
        assert plan.full == (layout == "blob")      # each as its measurement found fastest
        assert not any(level.dense for level in plan.levels) or plan.full


def test_a_level_that_never_won_dense_goes_halfway_to_full():
    assert thresholds_from([measured([0.2], 1), measured([0.8], 1)], levels=1) == \
        pytest.approx((0.9,))


def test_calibration_masks_cover_their_areas_in_both_layouts():
    levels, tiles = [(64, 64), (32, 32), (16, 16), (8, 8)], [8, 4, 2, 1]
    for make_mask in CALIBRATION_MASKS.values():
        small = MaskPlan(make_mask((64, 64), 0.02), levels, tiles, 0, 1.0).fractions()
        large = MaskPlan(make_mask((64, 64), 0.5), levels, tiles, 0, 1.0).fractions()
        assert all(0 < a < b for a, b in zip(small, large))


class FailedCaptures:
    """Stands in for an engine's CapturedSteps whose every capture failed."""

    def failed(self, plan):
        return True


def test_calibration_with_failed_captures_keeps_the_engines_thresholds(monkeypatch):
    """Candidates timed without their graphs (session 7: 27-56 ms instead of 3-8 ms) would make
    every level dense: the measured thresholds are dropped, with a warning."""
    unet = zoo.unet("sd15-tiny")
    inputs = zoo.example_inputs(unet, batch=2, seed=0)
    engine = fc.compile(unet, fc.SparseConfig(dense_threshold=0.4))
    timings = iter(range(1000, 0, -1))           # every sparse candidate "faster"
    measured = cost_model.calibrate(engine, inputs, areas=(0.05,), timer=lambda fn: next(timings))
    assert measured["capture_failures"] == 0 and measured["thresholds"] != 0.4
    monkeypatch.setattr(cost_model, "captured_steps_of", lambda engine, inputs: FailedCaptures())
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        failed = cost_model.calibrate(engine, inputs, areas=(0.05,),
                                      timer=lambda fn: next(timings))
    candidates = sum(len(m["ms_by_first_dense_level"]) for m in failed["measurements"])
    assert failed["capture_failures"] == candidates > 0 and failed["thresholds"] == 0.4


@pytest.mark.parametrize("areas, timer, message", [
    ((), None, r"at least one"), ((0.0,), None, r"\(0, 1\]"), ((1.5,), None, "out of range"),
    ((float("nan"),), None, "finite"), (None, None, "got NoneType"), ("0.1", None, "got str"),
    ((0.05,), 5, "timer must be a function"), ((0.05,), None, "on a CUDA device"),
    ("inputs", None, "calibrate's inputs must be a dict .* got NoneType")])
def test_calibration_refuses_bad_arguments_before_any_work(areas, timer, message):
    """Checked before the program is built or a step recorded (seconds on a real U-Net)."""
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    inputs = None if areas == "inputs" else zoo.example_inputs(unet, batch=2)
    with pytest.raises(fc.FiseditError, match=message):
        cost_model.calibrate(engine, inputs, areas=(0.05,) if inputs is None else areas,
                             timer=timer)
    assert not engine._programs


@pytest.mark.parametrize("timer, message", [
    (lambda fn: fn(), r"must be a number, got a torch.float32 tensor"),    # returned the edit
    (lambda fn: (fn(), None)[1], "must be a number, got NoneType"),        # returned nothing
    (lambda fn: float("nan"), "must be a finite number"), (lambda fn: -1.0, "-1.0 is out of range")])
def test_calibration_refuses_a_timers_result_that_is_not_milliseconds_at_once(timer, message):
    """A timer's result is checked as it comes: the first candidate's, not after them all."""
    unet = zoo.unet("sd15-tiny")
    engine = fc.compile(unet)
    calls = []

    def counted(fn):
        calls.append(fn)
        return timer(fn)

    with pytest.raises(fc.FiseditError, match=r"calibrate's timer result \(milliseconds\) "
                                              + message):
        cost_model.calibrate(engine, zoo.example_inputs(unet, batch=2), areas=(0.05,),
                             timer=counted)
    assert len(calls) == 1
