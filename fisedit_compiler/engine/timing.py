"""Timing helpers: medians of CUDA-event and host timings, for the cost model and the benchmarks."""

from __future__ import annotations

import time

import torch


def cuda_time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds per call of ``fn`` by CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def host_time_ms(fn, reps: int = 20) -> float:
    """Median host milliseconds of ``fn``, each call started with an idle GPU."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - started))
    torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2]


def synchronized_s(fn) -> float:
    """Seconds of ``fn`` from an idle device to its synchronised end: the whole call as a
    user waits for it (the host clock alone where there is no CUDA device)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def loop_time_ms(fn, calls: int = 20, warmup: int = 3) -> float:
    """Milliseconds per call of ``fn`` called ``calls`` times back to back, as a pipeline's
    loop calls the U-Net: one synchronisation at the end, so where nothing in ``fn``
    synchronises, each call's host work overlaps the GPU work of the call before."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls
