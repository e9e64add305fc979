"""The cost model: per-level dense thresholds measured on the device, not guessed.

A level runs sparse or dense (and every level below a dense one is dense: docs/design.md,
"Mask plans"), so for one mask the choices are "the first dense level is d" for d = 0 (the
whole U-Net dense, which the engine runs as compiled dense) to L (all levels sparse). ``calibrate`` times every
choice, on the device, for masks of increasing area in two layouts, one square and scattered
squares, and sets each level's threshold between the largest active fraction at which keeping
it sparse was fastest and the smallest at which making it the first dense level was. Only the
first dense level counts as a dense win: the levels coarser than it are dense by the plan's
rule, whatever their fractions, so their fractions say nothing (session 8, run 3: counting
them set level 3's threshold at a 50% square's 0.56, which sent a scattered 20% edit, level 3
at 0.59, dense at 7.3-7.5 ms where all-sparse measured 6.1 ms). Where the layouts
disagree (sparse won at a larger fraction in one layout than the one where it lost in the
other), the threshold is set for the loser: dense from that fraction on. Scattered masks cost
more at the same fraction (more tile edges, and plans whose coarsest level alone turns dense),
and a square-only calibration let them run up to 1.3x slower than dense (session 4, run 3).
With those thresholds in ``SparseConfig.dense_threshold`` the plan picks, for masks like the
calibration ones, the fastest of the candidates, and in particular no edit runs slower than
the dense compiled step (the d = 0 candidate) by more than noise.
"""

from __future__ import annotations

import itertools
import warnings

import torch

from ..checks import check_float, check_inputs_dict
from ..errors import FiseditError
from ..execution.plan import MaskPlan, blob_mask, check_area, scattered_mask
from .timing import cuda_time_ms

CALIBRATION_AREAS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
CALIBRATION_MASKS = {"blob": blob_mask, "scattered": scattered_mask}


@torch.no_grad()
def calibrate(engine, inputs: dict, areas=CALIBRATION_AREAS, timer=None, log=None) -> dict:
    """Measure per-level dense thresholds for ``engine``'s U-Net at ``inputs``' signature.

    ``timer(fn) -> ms`` times one callable (default: ``timing.cuda_time_ms`` with 5 calls).
    Returns ``{"thresholds": tuple, "measurements": [...], "capture_failures": int}``; pass
    the thresholds as ``SparseConfig(dense_threshold=...)``. A sparse candidate whose CUDA
    graph could not be captured runs without it, several times slower, so the thresholds would
    send everything dense: then they are the engine's own, with a warning.
    """
    check_inputs_dict("calibrate's inputs", inputs)
    areas = _check_areas(areas)
    if timer is None:
        sample = inputs.get("sample")
        if not (isinstance(sample, torch.Tensor) and sample.is_cuda):
            raise FiseditError("calibrate times each candidate with CUDA events by default, "
                               "so its inputs must be on a CUDA device; on another device pass "
                               "timer=(a function that runs its argument and returns ms)")
        timer = lambda fn: cuda_time_ms(fn, warmup=2, reps=5)  # noqa: E731
    elif not callable(timer):
        raise FiseditError(f"calibrate's timer must be a function that runs its argument and "
                           f"returns milliseconds, got {type(timer).__name__}")
    program = engine.program(inputs)
    levels, tiles = program.levels, program.tiles
    cache = engine.new_cache()
    engine.record(cache, step=0, **inputs)
    device = inputs["sample"].device
    steps = captured_steps_of(engine, inputs)
    failures = 0
    measurements = []
    for area, (layout, make_mask) in itertools.product(areas, CALIBRATION_MASKS.items()):
        mask = make_mask(tuple(levels[0]), area)
        fractions = MaskPlan(mask, levels, tiles, engine.config.dilation, 1.0,
                             device=device).fractions()
        times = []
        for first_dense in range(len(levels) + 1):
            thresholds = [1.0] * first_dense + [0.0] * (len(levels) - first_dense)
            plan = MaskPlan(mask, levels, tiles, engine.config.dilation, thresholds,
                            device=device)
            ms = timer(lambda: engine.edit(cache, 0, plan=plan, **inputs))  # noqa: B023
            # Checked at once: a timer that returns the edit, or nothing, would otherwise fail
            # (or give thresholds from garbage) only after every candidate had run.
            times.append(check_float("calibrate's timer result (milliseconds)", ms, minimum=0))
            failures += steps is not None and steps.failed(plan)
        best = min(range(len(times)), key=times.__getitem__)
        measurements.append({"area": area, "layout": layout, "fractions": fractions,
                             "ms_by_first_dense_level": times, "best_first_dense_level": best})
        if log:
            log(f"calibrate {layout} {area:.0%}: fractions {[round(f, 3) for f in fractions]} "
                f"ms by first dense level {[round(t, 2) for t in times]} -> {best}")
    thresholds = thresholds_from(measurements, len(levels))
    if failures:
        warnings.warn(
            f"calibration: {failures} sparse candidates could not be captured as CUDA graphs "
            f"(see the warnings above) and were timed without them, so the measured thresholds "
            f"{thresholds} are not used; keeping SparseConfig.dense_threshold="
            f"{engine.config.dense_threshold!r}", RuntimeWarning, stacklevel=2)
        thresholds = engine.config.dense_threshold
    return {"thresholds": thresholds, "measurements": measurements,
            "capture_failures": failures}


def captured_steps_of(engine, inputs: dict):
    """The engine's ``CapturedSteps`` for ``inputs`` where its edits run as CUDA graphs, else
    None."""
    return (engine.captured_steps(**inputs) if engine._uses_graphs(inputs["sample"].device)
            else None)


def _check_areas(areas) -> tuple[float, ...]:
    """The edit areas to time: a non-empty sequence of fractions in (0, 1]."""
    if isinstance(areas, (str, bytes)) or not hasattr(areas, "__iter__"):
        raise FiseditError(f"calibrate's areas must be a sequence of fractions of the latent in "
                           f"(0, 1], e.g. {CALIBRATION_AREAS}, got {type(areas).__name__}")
    checked = tuple(check_area(area, "a calibration area") for area in areas)
    if not checked:
        raise FiseditError(f"calibrate's areas must be fractions of the latent in (0, 1], at "
                           f"least one, e.g. {CALIBRATION_AREAS}, got none")
    return checked


def thresholds_from(measurements: list[dict], levels: int) -> tuple:
    """Per-level dense thresholds from ``calibrate``'s measurements (each with per-level
    ``fractions`` and the ``best_first_dense_level``).

    A level is dense where its fraction exceeds its threshold: halfway between the largest
    fraction at which it was best sparse and the smallest at which it was best as the first
    dense level (the coarser levels after it are dense by rule: no evidence about them), or,
    where those conflict (masks of different layouts disagree), just below that smallest
    dense win, so the slower choice is never kept.
    """
    sparse_best = [0.0] * levels      # largest fraction at which sparse won, per level
    dense_best = [1.0] * levels       # smallest fraction at which it won as first dense level
    for measurement in measurements:
        first_dense = measurement["best_first_dense_level"]
        for level, fraction in enumerate(measurement["fractions"]):
            if level < first_dense:
                sparse_best[level] = max(sparse_best[level], fraction)
            elif level == first_dense:
                dense_best[level] = min(dense_best[level], fraction)
    return tuple((low + high) / 2 if low < high else high - 1e-9
                 for low, high in zip(sparse_best, dense_best))
