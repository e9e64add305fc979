"""Per-step U-Net latency against edit area: the sparse engine against dense eager and dense
torch.compile, measured side by side in one run (docs/design.md, "Measuring"), and
``fisedit-compiler bench``.

For one zoo model at its native resolution (sd15 512 px, sd21 768 px, sdxl 1024 px), CFG batch
2, it times per U-Net call:

* dense eager, and dense ``torch.compile`` in each requested mode (the best is the baseline);
* the engine's torch reference path (no Triton, no CUDA graph);
* the engine with Triton kernels and CUDA graphs (the product path);

for edit masks covering 1 ... 100% of the latent, as one square off the tile grid
(``placed_blob``, as users' squares mostly fall) and as scattered blobs,
plus dense, sparse and ideal MACs, the per-level active fractions, and each sparse result's
error against the oracle (``oracle.masked_dense``), so a fast wrong answer cannot pass
unnoticed. Times are medians of CUDA-event timings after warm-up, each call from an idle GPU;
every edit call includes its checks, input and cache copies and the output clone. An edit is
timed as a pass runs it: each generation has as many steps as one timing calls
(``recorded_steps``; one recorded step shared by all, ``pass_cache``), and successive calls
edit successive steps (``edit_pass``), so, as in a real edit, only a pass's first step
compares the whole U-Net state. The ``loop`` times call
the sparse step and the dense baseline back to back, as a pipeline's loop does: there, a
call's host work overlaps the GPU work of the call before wherever nothing synchronises.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import zoo
from .checks import check_choice, check_int
from .compiler import oracle
from .config import CONV_METHODS, SparseConfig
from .edit_flow.commands import check_output_folder
from .engine.timing import cuda_time_ms, host_time_ms, loop_time_ms
from .errors import FiseditError
from .execution.plan import blob_mask, scattered_mask

RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024}
# Where the bench's square edit sits: off the tile grid, as almost every placement of a square
# is (`benchmarks/bucket_fit.py --placements`: SD1.5's centred 5% square covers 16 level-0
# tiles, the same square at any of 50 seeded places 25). Until session 11 the bench timed the
# centred square, the best case at 1% and 5%.
BLOB_OFFSET = (3, 5)
AREAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
LAYOUTS = ("blob", "scattered")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
# A compile mode prefixed with this runs on the U-Net as a diffusers user tuning for speed
# would (``tuned_unet``), e.g. "tuned:reduce-overhead".
TUNED = "tuned:"
KNOWN_COMPILE_MODES = COMPILE_MODES + tuple(TUNED + mode for mode in COMPILE_MODES)
# The baseline's default modes: CUDA graphs, plain and tuned ("default" mode never wins, and
# max-autotune compiles SD1.5 for more than 5 minutes on an H200).
DEFAULT_COMPILE_MODES = ("reduce-overhead", TUNED + "reduce-overhead")
# Kernel name fragments -> category, first match wins (``profile_step``).
KERNEL_CATEGORIES = (
    # The implicit kernel, or the gather method's gather and epilogue (its GEMM is cuBLAS's).
    ("sparse conv", ("_sparse_conv2d", "_gather_taps", "_epilogue_kernel")),
    ("attention", ("_attention", "sdpa", "fmha", "flash")),
    ("group norm", ("_group_norm", "group_norm")),
    ("add + layer norm, GEGLU", ("_add_layer_norm", "_geglu", "layer_norm")),
    ("GEMM (cuBLAS)", ("nvjet", "gemm", "cutlass", "xmma", "sm90_")),
    ("cuDNN conv", ("conv", "cudnn")),
    ("copy, gather, scatter", ("copy", "memcpy", "memset", "index", "scatter", "gather", "cat",
                               "where")),
    ("other elementwise", ("elementwise", "reduce", "triton_")),
)


def placed_blob(size: tuple[int, int], area: float) -> torch.Tensor:
    """The bench's square edit of ``area``: ``blob_mask`` moved off the tile grid by
    ``BLOB_OFFSET``."""
    return blob_mask(size, area).roll(BLOB_OFFSET, dims=(0, 1))


def edited_inputs(inputs: dict, mask: torch.Tensor, seed: int = 1) -> dict:
    """A new prompt everywhere (where the U-Net reads text states: an unconditional U-Net's
    inputs have none) and new latents inside ``mask`` (outside they stay recorded)."""
    gen = torch.Generator().manual_seed(seed)
    sample = inputs["sample"]
    noise = torch.randn(sample.shape, generator=gen).to(sample)
    edited = dict(inputs, sample=torch.where(mask.to(sample.device), noise, sample))
    text = inputs.get("encoder_hidden_states")
    if isinstance(text, torch.Tensor):
        edited["encoder_hidden_states"] = text + 0.1 * torch.randn(text.shape,
                                                                   generator=gen).to(text)
    return edited


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return float((actual.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def environment() -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    import diffusers

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version(), "commit": commit or "unknown"}


@torch.no_grad()
def run(model: str = "sd15", areas=AREAS, layouts=LAYOUTS, compile_modes=DEFAULT_COMPILE_MODES,
        reference: bool = True, dtype: torch.dtype = torch.float16, batch: int = 2,
        config: SparseConfig | None = None, tolerance: float = 2e-2, reps: int = 20,
        calibrate: bool = True, profile_area: float | None = None, prepare: bool = True,
        log=print) -> dict:
    """The benchmark; returns the JSON-ready result (see the module docstring).

    The steps: load the model (``_setup``), time the dense baselines (``measure_dense``),
    compile, calibrate and record the engines (``build_engines``) and capture every capacity
    bucket's step (``engine.prepare``; without ``prepare`` each bucket is captured at its first
    edit, outside the timings), then per mask time every engine against the oracle and
    what buckets cost (``measure_mask``, ``bucket_costs``), profiling one area on request
    (``_profile_row``)."""
    if not torch.cuda.is_available():
        raise FiseditError("the benchmark measures GPU latency and needs a CUDA device; on CPU "
                           "use `fisedit-compiler dump --stage sparse` for MACs")
    config = config or SparseConfig()
    unet, inputs, result = _setup(model, dtype, batch)
    result["config"] = dataclasses.asdict(config)
    result["dense"], best_dense = measure_dense(unet, inputs, compile_modes, reps, log)
    engines, caches, calibration = build_engines(unet, inputs, config, calibrate, reference,
                                                 log, steps=recorded_steps(reps))
    if calibration is not None:
        result["calibration"] = calibration
    result["cache_mib_per_step"] = caches["triton"].nbytes() / 2**20     # one shared step
    if prepare:
        result["prepare"] = engines["triton"].prepare(caches["triton"], 0, **inputs)
        log(f"prepared edits: {result['prepare']['graphs_captured']} graphs in "
            f"{result['prepare']['prepare_s']:.1f} s")
    size = tuple(inputs["sample"].shape[-2:])
    for layout in layouts:
        for area in areas:
            if layout == "scattered" and area >= 1.0:
                log("scattered at 100%: not measured (the full mask is the blob row's)")
                continue
            mask = placed_blob(size, area) if layout == "blob" else scattered_mask(size, area)
            row = measure_mask(engines, caches, inputs, mask, result["dense"], tolerance, reps,
                               new_masks=prepare, best_dense=best_dense)
            row = {"layout": layout, "area": area, **row}
            if profile_area is not None and abs(area - profile_area) < 1e-9 \
                    and layout == "blob":
                row["profile"] = _profile_row(engines["triton"], caches["triton"], inputs, mask,
                                              row, reps, log)
            result["rows"].append(row)
            log(_format_row(row))
            torch.cuda.empty_cache()
    return result


def _setup(model: str, dtype: torch.dtype, batch: int):
    """The zoo U-Net on the GPU at its native resolution, its example inputs, and the result's
    header (model, shapes, environment)."""
    latent = RESOLUTION.get(model.removesuffix("-tiny"), 512) // 8
    unet = zoo.unet(model, dtype=dtype, device="cuda")
    inputs = zoo.example_inputs(unet, batch=batch, seed=0, height=latent, width=latent)
    size = tuple(inputs["sample"].shape[-2:])
    result = {"model": model, "resolution_px": latent * 8, "latent": list(size), "batch": batch,
              "dtype": str(dtype).removeprefix("torch."), "environment": environment(),
              "dense": {}, "rows": []}
    return unet, inputs, result


def tuned_unet(unet):
    """A copy of ``unet`` as a diffusers user tuning for speed runs it: channels_last, fused
    QKV projections, and Inductor's 1x1 convs as matmuls (a global Inductor setting, left on:
    it only affects code compiled after it)."""
    import copy

    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    fast = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    fast.fuse_qkv_projections()
    return fast


def compiled_dense(unet, mode: str):
    """``torch.compile`` of ``unet`` in ``mode`` ("default", "reduce-overhead", ...), of its
    tuned copy (``tuned_unet``) for a mode named ``tuned:<mode>``."""
    if mode.startswith(TUNED):
        unet, mode = tuned_unet(unet), mode.removeprefix(TUNED)
    return torch.compile(unet, mode=None if mode == "default" else mode)


def measure_dense(unet, inputs: dict, compile_modes, reps: int, log=print):
    """``(dense, best)``: dense eager and dense ``torch.compile`` in each mode, and the best
    compiled one as a callable (the baseline: ``best_compiled_ms``; eager where no mode is
    asked for), which ``measure_mask`` times again beside each row.

    Each mode compiles a fresh ``torch.compile`` wrapper. Dynamo keeps one cache per backend
    (a mode is a backend of its own), so a mode never reuses another's code, and nothing here
    resets Dynamo: the caller's other compiled code stays compiled."""
    calls = {"eager": lambda: unet(**inputs)}
    dense = {"eager_ms": cuda_time_ms(calls["eager"], reps=reps)}
    log(f"dense eager {dense['eager_ms']:.2f} ms")
    for mode in compile_modes:
        compiled = compiled_dense(unet, mode)
        calls[mode] = lambda compiled=compiled: compiled(**inputs)
        started = time.perf_counter()
        calls[mode]()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - started
        dense[f"compile[{mode}]_ms"] = cuda_time_ms(calls[mode], reps=reps)
        dense[f"compile[{mode}]_compile_s"] = compile_s
        log(f"dense torch.compile {mode}: {dense[f'compile[{mode}]_ms']:.2f} ms "
            f"(compiled in {compile_s:.0f} s)")
    compiled_times = {m: dense[f"compile[{m}]_ms"] for m in compile_modes}
    best_mode = min(compiled_times, key=compiled_times.get) if compiled_times else None
    dense["best_compiled_mode"] = best_mode
    dense["best_compiled_ms"] = compiled_times.get(best_mode, dense["eager_ms"])
    return dense, calls[best_mode or "eager"]


def recorded_steps(reps: int) -> int:
    """Steps to record so that one timing (``cuda_time_ms``: warm-up and ``reps`` calls, or
    ``loop_time_ms``) plus one more call stays inside one edit pass (``edit_pass``)."""
    return reps + 4


def pass_cache(engine, inputs: dict, steps: int):
    """A cache of ``steps`` steps of ``inputs`` for ``edit_pass``: step 0 recorded, the others
    sharing its buffer (``EditCache.share_step``), at the memory of one step."""
    cache = engine.new_cache(steps)
    engine.record(cache, 0, **inputs)
    for step in range(1, steps):
        cache.share_step(step, 0)
    return cache


def edit_pass(engine, cache, plan, edited: dict):
    """A callable that edits the cache's next recorded step with ``plan`` at each call, as
    a pipeline's loop does (step 0 again after the last: a new pass). Every recorded step of
    the benchmark holds the same values, so each call computes the same edit."""
    calls = itertools.count()
    return lambda: engine.edit(cache, next(calls) % cache.num_steps, plan=plan, **edited)


def build_engines(unet, inputs: dict, config: SparseConfig, calibrate: bool, reference: bool,
                  log=print, steps: int = 1):
    """``(engines, caches, calibration)``: the engines to time, each with a cache of
    ``steps`` steps of ``inputs`` (``pass_cache``).

    ``triton`` is the product path (Triton kernels, CUDA graphs; its dense thresholds measured
    by ``cost_model.calibrate`` unless ``calibrate`` is off), ``torch_graphs`` the same graph on
    the torch ops under CUDA graphs (what the kernels must beat), and ``reference`` the plain
    reference path (without CUDA graphs), when asked for."""
    import fisedit_compiler as fc

    fast = fc.compile(unet, config)
    calibration = None
    if calibrate:
        from .engine.cost_model import calibrate as measure_thresholds

        calibration = measure_thresholds(fast, inputs, log=log)
        config = dataclasses.replace(config, dense_threshold=calibration["thresholds"])
        fast = fast.with_config(config)
        log(f"calibrated dense thresholds per level: {config.dense_threshold}")
    torch_path = dataclasses.replace(config, kernels="torch",
                                     conv_method=SparseConfig.conv_method)
    engines = {"triton": fast, "torch_graphs": fast.with_config(torch_path)}
    if reference:
        engines["reference"] = fast.with_config(
            dataclasses.replace(torch_path, cuda_graphs=False))
    caches = {name: pass_cache(engine, inputs, steps) for name, engine in engines.items()}
    return engines, caches, calibration


def measure_mask(engines: dict, caches: dict, inputs: dict, mask: torch.Tensor, dense: dict,
                 tolerance: float, reps: int, new_masks: bool = True, best_dense=None) -> dict:
    """One table row: the mask's MACs and level fractions, then each engine's edit time and
    error against the oracle, and the product path's speedups over the dense baselines
    (``bucket_costs``; its new-mask timing only with ``new_masks``: it needs every bucket
    captured ahead, or it would time captures).

    ``best_dense`` (the baseline's callable) is timed again right after the row's edits:
    ``speedup_vs_compiled_beside`` divides by that time rather than by the baseline timed at
    the start of the run, which a GPU's drift over a run (~5% on an H200, session 8 run 4)
    would otherwise put into ratios near 1. The product path and the baseline are also timed
    in a loop (``loop_time_ms``): ``speedup_loop_beside``."""
    fast = engines["triton"]
    edited = edited_inputs(inputs, mask)
    plan = fast.plan(mask)
    stats = fast.stats(plan)
    row = {"mask_fraction": plan.raw_fraction,
           "levels": [("dense" if l["dense"] else round(l["fraction"], 4))
                      for l in stats["levels"]],
           "dense_gmacs": stats["dense_macs"] / 1e9,
           "sparse_gmacs": stats["sparse_macs"] / 1e9,
           "ideal_gmacs": stats["ideal_macs"] / 1e9}
    expected = oracle.masked_dense(fast, plan, inputs, edited)
    for name, engine in engines.items():
        edit = edit_pass(engine, caches[name], plan if name == "triton" else engine.plan(mask),
                         edited)
        row[f"{name}_error"] = relative_error(edit(), expected)
        row[f"{name}_ms"] = cuda_time_ms(edit, reps=reps)
        if name == "triton" and best_dense is not None:
            # A pass of its own: only its first call, a warm-up, compares the whole U-Net.
            row["triton_loop_ms"] = loop_time_ms(edit_pass(engine, caches[name], plan, edited),
                                                 calls=reps)
    row.update(bucket_costs(fast, caches["triton"], inputs, mask, reps, new_masks))
    if "exact_plan_ms" in row:
        row["padding_overhead"] = row["triton_ms"] / row["exact_plan_ms"]
    row["speedup_vs_eager"] = dense["eager_ms"] / row["triton_ms"]
    row["speedup_vs_compiled"] = dense["best_compiled_ms"] / row["triton_ms"]
    if best_dense is not None:
        row["dense_beside_ms"] = cuda_time_ms(best_dense, reps=reps)
        row["speedup_vs_compiled_beside"] = row["dense_beside_ms"] / row["triton_ms"]
        row["dense_beside_loop_ms"] = loop_time_ms(best_dense, calls=reps)
        row["speedup_loop_beside"] = row["dense_beside_loop_ms"] / row["triton_loop_ms"]
    row["ok"] = all(row[f"{name}_error"] <= tolerance for name in engines)
    return row


def _profile_row(fast, cache, inputs: dict, mask: torch.Tensor, row: dict, reps: int,
                 log=print) -> dict:
    """``profile_step`` and ``split_edit_time`` of the product path at one mask, logged."""
    plan = fast.plan(mask)
    edited = edited_inputs(inputs, mask)
    profile = profile_step(fast, inputs, plan, edited)
    profile.update(split_edit_time(fast, cache, plan, edited, reps=reps))
    log(f"profile at {row['area']:.0%}: {profile['kernels_per_step']:.0f} kernels, "
        f"{profile['gpu_kernel_ms_per_step']:.2f} ms of GPU kernel time per "
        f"step; edit call {row['triton_ms']:.2f} ms = graph replay "
        f"{profile['replay_ms']:.2f} ms + host "
        f"{profile['host_ms']:.2f} ms before it")
    for name, entry in profile["categories"].items():
        log(f"  {entry['ms_per_step']:7.3f} ms {entry['calls_per_step']:5.0f}x [{name}]")
    for entry in profile["top"]:
        log(f"  {entry['ms_per_step']:7.3f} ms {entry['calls_per_step']:5.0f}x "
            f"{entry['us_min']:5.1f} / {entry['us_median']:5.1f} / {entry['us_max']:5.1f} us "
            f"{entry['kernel']}")
    return profile


@torch.no_grad()
def bucket_costs(engine, cache, inputs: dict, mask, reps: int, new_masks: bool = True) -> dict:
    """What capacity buckets cost and save for one mask, on the CUDA-graph path.

    ``exact_plan_ms``: the step on a plan of the mask's own shapes (a graph captured for this
    mask alone), so ``padding_overhead`` is the bucketed step (``triton_ms``, which replays its
    bucket's graph after writing the plan's tables) over it. ``new_mask_ms``: a mask of the
    same size at ``reps`` new places, each planned and edited once (planning, table upload,
    replay; after ``engine.prepare`` no capture), the median.
    """
    if not (engine.config.cuda_graphs and inputs["sample"].is_cuda):
        return {}
    edited = edited_inputs(inputs, mask)
    exact = engine.plan(mask, bucketed=False)
    if exact.full or exact.empty:
        return {}
    row = {"exact_plan_ms": cuda_time_ms(edit_pass(engine, cache, exact, edited), reps=reps)}
    if not new_masks:
        return row
    times, plan_times = [], []
    for shift in range(1, reps + 1):
        moved = mask.roll((3 * shift, 5 * shift), dims=(0, 1))
        moved_inputs = edited_inputs(inputs, moved)
        torch.cuda.synchronize()
        started = time.perf_counter()
        plan = engine.plan(moved)
        planned = time.perf_counter()
        engine.edit(cache, 0, plan=plan, **moved_inputs)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - started))
        plan_times.append(1000 * (planned - started))
    row["new_mask_ms"] = sorted(times)[len(times) // 2]
    row["plan_ms"] = sorted(plan_times)[len(plan_times) // 2]
    return row


@torch.no_grad()
def profile_step(engine, inputs: dict, plan, edited: dict, calls: int = 5,
                 top: int = 15) -> dict:
    """Where one sparse step's time goes: the kernels it launches and their GPU time.

    Runs ``engine`` without CUDA graphs under ``torch.profiler`` (a replayed graph hides its
    kernels) and reports per step: the number of kernel launches, the summed GPU kernel time,
    and the top kernels by GPU time with their shortest, median and longest launch. Comparing
    the summed kernel time with the replayed step's latency separates kernel work from launch
    gaps and host work. The profiled calls are the later steps of one edit pass
    (``edit_pass``), as the timed ones are: a pass's first step also checks the weights and
    loads the pass constants, work of the pass, not of a step.
    """
    eager = engine.with_config(dataclasses.replace(engine.config, cuda_graphs=False))
    run = edit_pass(eager, pass_cache(eager, inputs, calls + 1), plan, edited)
    durations: dict[str, list[float]] = {}          # kernel name -> each launch's us
    for event in gpu_events(run, calls):            # the pass's first step not profiled
        durations.setdefault(event.name, []).append(event.device_time_total)
    launches = sum(len(times) for times in durations.values()) / calls
    gpu_ms = sum(sum(times) for times in durations.values()) / calls / 1000.0
    ranked = sorted(durations.items(), key=lambda item: -sum(item[1]))[:top]
    categories: dict[str, list] = {}
    for name, times in durations.items():
        entry = categories.setdefault(kernel_category(name), [0, 0.0])
        entry[0] += len(times) / calls
        entry[1] += sum(times) / calls / 1000.0
    return {"kernels_per_step": launches, "gpu_kernel_ms_per_step": gpu_ms,
            "categories": {name: {"calls_per_step": count, "ms_per_step": ms}
                           for name, (count, ms) in sorted(categories.items(),
                                                           key=lambda item: -item[1][1])},
            "top": [{"kernel": name[:90], "calls_per_step": len(times) / calls,
                     "ms_per_step": sum(times) / calls / 1000.0, **_spread_us(times)}
                    for name, times in ranked]}


def gpu_events(run, calls: int) -> list:
    """The GPU activities (kernels, copies) of ``calls`` calls of ``run``, by torch.profiler,
    after one call not profiled (it loads kernels; in an edit pass, it is the pass's first
    step). A replayed CUDA graph hides its kernels: profile the calls eagerly."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    return [event for event in prof.events() if event.device_type.name == "CUDA"]


def _spread_us(times: list[float]) -> dict:
    """The shortest, median and longest launch of a kernel, in us: one kernel serves layers
    of every level, so a narrow spread says a fixed cost bounds it and a wide one the work."""
    ordered = sorted(times)
    return {"us_min": ordered[0], "us_median": ordered[len(ordered) // 2],
            "us_max": ordered[-1]}


def kernel_category(name: str) -> str:
    """The ``KERNEL_CATEGORIES`` entry a GPU kernel's name falls in ("other" if none)."""
    lowered = name.lower()
    return next((category for category, fragments in KERNEL_CATEGORIES
                 if any(fragment.lower() in lowered for fragment in fragments)), "other")


@torch.no_grad()
def split_edit_time(engine, cache, plan, edited: dict, reps: int = 20) -> dict:
    """The replayed CUDA graph alone against the whole ``engine.edit`` call.

    ``replay_ms`` times only the captured graph of ``plan`` (GPU work of the step);
    ``host_ms`` is the wall time the edit call spends on the host from an idle GPU until it
    returns (validation, cache copies, the replay launch, the output clone's launch), the
    median over ``reps`` calls, successive steps of a pass (``edit_pass``). Their sum near
    the edit's latency means host work is serial with the GPU's; the profile's kernel time
    against ``replay_ms`` shows launch gaps inside the graph.
    """
    captured = engine.captured_steps(**edited).capture(plan)
    return {"replay_ms": cuda_time_ms(captured.replay, reps=reps),
            "host_ms": host_time_ms(edit_pass(engine, cache, plan, edited), reps)}


def _area_label(row: dict) -> str:
    """The row's requested area and, where the mask marks another fraction by more than a
    tenth of it (scattered blobs overlap and stop at the latent's edge; an area below a few
    latent pixels rounds to whole ones), the fraction it marks."""
    label = f"{100 * row['area']:.3g}%"
    if abs(row.get("mask_fraction", row["area"]) - row["area"]) > 0.1 * row["area"]:
        label += f" ({100 * row['mask_fraction']:.3g}% marked)"
    return label


def _format_row(row: dict) -> str:
    ref = f"{row['reference_ms']:8.2f}" if "reference_ms" in row else "       -"
    buckets = (f" exact {row['exact_plan_ms']:.2f} pad {row['padding_overhead']:.2f}x"
               if "exact_plan_ms" in row else "")
    if "new_mask_ms" in row:
        buckets += f" new {row['new_mask_ms']:.2f} (plan {row['plan_ms']:.2f})"
    if "dense_beside_ms" in row:
        buckets += (f" dense beside {row['dense_beside_ms']:.2f} "
                    f"({row['speedup_vs_compiled_beside']:.2f}x); loop "
                    f"{row['triton_loop_ms']:.2f} vs {row['dense_beside_loop_ms']:.2f} "
                    f"({row['speedup_loop_beside']:.2f}x)")
    return (f"{row['layout']:9s} {_area_label(row):>6s} {row['triton_ms']:8.2f} "
            f"{row['torch_graphs_ms']:8.2f} {ref} "
            f"{row['speedup_vs_eager']:6.2f}x {row['speedup_vs_compiled']:6.2f}x "
            f"{row['sparse_gmacs']:7.1f} {row['ideal_gmacs']:7.1f} "
            f"{row['triton_error']:.1e} {'ok' if row['ok'] else 'FAIL'}  {row['levels']}"
            f"{buckets}")


def table(result: dict) -> str:
    """The result as a markdown table."""
    dense = result["dense"]
    env = result["environment"]
    lines = [f"{result['model']} {result['resolution_px']} px, batch {result['batch']}, "
             f"{result['dtype']}, {env['device']}, torch {env['torch']}, triton {env['triton']},"
             f" commit {env['commit']}: dense eager {dense['eager_ms']:.2f} ms, best "
             f"torch.compile ({dense['best_compiled_mode']}) {dense['best_compiled_ms']:.2f} ms;"
             f" cache {result['cache_mib_per_step']:.1f} MiB/step",
             "",
             "| layout | area | engine ms (Triton + CUDA graph) | torch ops + CUDA graph ms | "
             "reference ms | vs eager | vs compiled | vs compiled beside | in a loop: engine "
             "vs compiled beside | GMACs sparse | GMACs ideal | oracle err | levels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ref = f"{row['reference_ms']:.2f}" if "reference_ms" in row else "-"
        beside = (f"{row['speedup_vs_compiled_beside']:.2f}x ({row['dense_beside_ms']:.2f} ms)"
                  if "dense_beside_ms" in row else "-")
        loop = (f"{row['triton_loop_ms']:.2f} vs {row['dense_beside_loop_ms']:.2f} ms "
                f"({row['speedup_loop_beside']:.2f}x)" if "triton_loop_ms" in row else "-")
        lines.append(
            f"| {row['layout']} | {_area_label(row)} | {row['triton_ms']:.2f} | "
            f"{row['torch_graphs_ms']:.2f} | {ref} | "
            f"{row['speedup_vs_eager']:.2f}x | {row['speedup_vs_compiled']:.2f}x | {beside} | "
            f"{loop} | "
            f"{row['sparse_gmacs']:.1f} | {row['ideal_gmacs']:.1f} | "
            f"{row['triton_error']:.1e} | {row['levels']} |")
    return "\n".join(lines)


def plot(results: list[dict], path: str | Path) -> bool:
    """Speedup against edit area, one line per model and layout; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for result in results:
        for layout in LAYOUTS:
            rows = [r for r in result["rows"] if r["layout"] == layout]
            if rows:
                axis.plot([100 * r["area"] for r in rows],
                          [r["speedup_vs_compiled"] for r in rows], marker="o",
                          label=f"{result['model']} {layout}")
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("edit area (% of latent)")
    axis.set_ylabel("speedup vs best torch.compile")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return True


def add_bench_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time sparse edit steps against dense eager and torch.compile (GPU)",
        description="Per-step U-Net latency against edit area: the sparse engine against "
                    "dense eager and dense torch.compile, measured side by side in one run, "
                    "with MACs and each result's error against the oracle. Needs a GPU.")
    parser.add_argument("--model", action="append", choices=sorted(RESOLUTION) + [
        f"{m}-tiny" for m in sorted(RESOLUTION)], help="zoo model (repeatable; default sd15)")
    parser.add_argument("--areas", default=",".join(str(a) for a in AREAS),
                        help="comma-separated edit areas as fractions of the latent "
                             "(default: %(default)s)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS),
                        help="comma-separated mask layouts: blob, scattered "
                             "(default: %(default)s)")
    parser.add_argument("--compile-modes", default=",".join(DEFAULT_COMPILE_MODES),
                        help="comma-separated torch.compile modes for the dense baseline, the "
                             "fastest of which is the baseline (default: %(default)s); each "
                             f"one of {', '.join(COMPILE_MODES)}, or '{TUNED}MODE', which "
                             "compiles the U-Net in channels_last with fused QKV projections "
                             "and 1x1 convs as matmuls")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the engine's torch reference path")
    parser.add_argument("--reps", type=int, default=20,
                        help="timed calls per measurement (default: %(default)s)")
    parser.add_argument("--profile-area", type=float, metavar="AREA",
                        help="profile the blob edit of this area: kernels per step, GPU "
                             "kernel time, top kernels")
    parser.add_argument("--no-prepare", action="store_true",
                        help="capture each bucket's step at its first edit instead of all "
                             "of them ahead (engine.prepare): quicker for a few areas")
    parser.add_argument("--no-group-projections", action="store_true",
                        help="run the attention projections as separate GEMMs "
                             "(SparseConfig.group_projections=False), to measure that lever")
    parser.add_argument("--no-hoist-pass-constants", action="store_true",
                        help="compute the text K/V and other pass constants at every step "
                             "(SparseConfig.hoist_pass_constants=False), to measure that lever")
    parser.add_argument("--no-fold-text-queries", action="store_true",
                        help="run each cross-attention's query projection at every step "
                             "(SparseConfig.fold_text_queries=False), to measure that lever")
    parser.add_argument("--conv-method", choices=CONV_METHODS, default=SparseConfig.conv_method,
                        help="how sparse convs run on the GPU (SparseConfig.conv_method; "
                             "default: %(default)s)")
    parser.add_argument("--tile", default=",".join(str(side) for side in SparseConfig.tile),
                        help="output tile side per level, finest first, comma-separated "
                             "(SparseConfig.tile; default: %(default)s): smaller tiles plan a "
                             "mask to less active area for more tables, to measure that lever")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="keep the default dense thresholds instead of measuring them")
    parser.add_argument("--out", metavar="DIR", default="bench-out",
                        help="writes results.json, results.md and speedup.png (the plot "
                             "needs matplotlib: pip install 'fisedit-compiler[plot]'; "
                             "default: %(default)s)")
    parser.set_defaults(run=run_bench_command)


def _command_settings(args) -> dict:
    """``run``'s keyword arguments from the options, each checked before any model work (or
    the CUDA check): a typo in a layout or a mode is refused, not run as something else."""
    areas = _parse_areas(args.areas)
    layouts = args.layouts.split(",")
    for layout in layouts:
        check_choice("--layouts", layout, LAYOUTS)
    compile_modes = [mode for mode in args.compile_modes.split(",") if mode]  # "": eager only
    for mode in compile_modes:
        check_choice("--compile-modes", mode, KNOWN_COMPILE_MODES)
    # A value given twice would measure the same thing twice, into two rows of one table.
    for option, values in (("--model", args.model or []), ("--areas", areas),
                           ("--layouts", layouts), ("--compile-modes", compile_modes)):
        repeated = sorted({str(value) for value in values if values.count(value) > 1})
        if repeated:
            raise FiseditError(f"{option} names {', '.join(repeated)} more than once; give "
                               "each value once")
    check_int("--reps", args.reps, minimum=1)
    if not any(layout == "blob" or area < 1.0 for layout in layouts for area in areas):
        raise FiseditError(
            f"--layouts {args.layouts} with --areas {args.areas} measures nothing: a scattered "
            "mask covers less than the whole latent (its 100% is the blob's); add an area "
            "below 1.0 or the blob layout")
    profile = args.profile_area
    if profile is not None and ("blob" not in layouts
                                or not any(abs(area - profile) < 1e-9 for area in areas)):
        raise FiseditError(f"--profile-area {profile} profiles the blob edit of that area, "
                           f"and this run has none (--areas {args.areas}, --layouts "
                           f"{args.layouts}); add it to --areas and blob to --layouts, or leave "
                           "--profile-area out")
    return dict(areas=areas, layouts=layouts, compile_modes=compile_modes,
                reference=not args.no_reference, reps=args.reps,
                calibrate=not args.no_calibrate, profile_area=profile,
                prepare=not args.no_prepare,
                config=SparseConfig(group_projections=not args.no_group_projections,
                                    hoist_pass_constants=not args.no_hoist_pass_constants,
                                    fold_text_queries=not args.no_fold_text_queries,
                                    conv_method=args.conv_method, tile=_parse_tile(args.tile)))


def _parse_tile(text: str) -> tuple[int, ...]:
    """``--tile``: comma-separated tile sides, finest level first, each a whole number >= 1."""
    items = text.split(",")
    bad = [item for item in items if not (item.isdigit() and int(item) >= 1)]
    if bad:
        raise FiseditError(f"--tile takes comma-separated tile sides per level, finest first, "
                           f"such as 4,2,1; {bad[0]!r} is not a whole number >= 1")
    return tuple(map(int, items))


def _parse_areas(text: str) -> list[float]:
    """``--areas``: comma-separated fractions of the latent, each in (0, 1]."""
    areas = []
    for item in text.split(","):
        try:
            area = float(item)
        except ValueError:
            raise FiseditError(f"--areas takes comma-separated fractions of the latent such as "
                               f"0.01,0.1,1.0; {item!r} is not a number") from None
        if not 0 < area <= 1:      # NaN fails this too
            raise FiseditError(f"--areas {item} is out of range: an edit area is a fraction of "
                               "the latent in (0, 1], e.g. 0.05 for 5%")
        areas.append(area)
    return areas


def run_bench_command(args) -> int:
    settings = _command_settings(args)
    check_output_folder("--out", args.out)
    out = Path(args.out)
    results, plotted = [], True
    for model in args.model or ["sd15"]:
        result = run(model, **settings, log=lambda text: print(text, flush=True))
        results.append(result)
        # Made once there is a result to write: a run failing before leaves no folder. All
        # three files are written after each model, so that a later model's failure leaves
        # them in agreement (with an earlier run's files in the folder replaced).
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        markdown = "\n\n".join(table(result) for result in results)
        (out / "results.md").write_text(markdown + "\n")
        plotted = plot(results, out / "speedup.png")
        if not plotted:     # an earlier run's plot would disagree with these results
            (out / "speedup.png").unlink(missing_ok=True)
    print(markdown)
    if not plotted:
        print("matplotlib not installed: no plot (pip install 'fisedit-compiler[plot]', then "
              "fisedit_compiler.bench.plot on results.json makes it)", file=sys.stderr)
    return 0 if all(row["ok"] for result in results for row in result["rows"]) else 1
