"""Timing: on the GPU with CUDA events, on the CPU the best of a few runs (its own module, so kernels.py and cuda_graphs.py both import it
without importing each other)."""
from __future__ import annotations

import time

import torch


def cuda_time(fn, reps: int = 20, warmup: int = 3, before=None) -> float:
    """Median seconds of fn() on the GPU, timed with CUDA events; before() runs untimed ahead of each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def cpu_time(fn, reps: int = 3, warmup: int = 1) -> float:
    """The fastest of reps runs of fn() after warmup untimed ones: on a shared CPU, the least
    disturbed one."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def phase_printer(prefix: str = "", enabled: bool = True):
    """A function that prints `[<prefix>t s] what` with the seconds since it was made, flushed at
    once: on a leased GPU the phases of a long command (load, compile, capture, train) must show
    where the minutes go even when the command is killed before it ends."""
    t0 = time.perf_counter()

    def stamp(what: str) -> None:
        if enabled:
            print(f"[{prefix}{time.perf_counter() - t0:6.1f} s] {what}", flush=True)
    return stamp


def busy_time(intervals) -> float:
    """Length of the union of (start, end) intervals: how long at least one of them was running.
    busy_time([(0, 2), (1, 3), (5, 6)]) == 4 (kernels that overlap count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
        elif b > end:
            total += b - end
        end = max(end, b)
    return total


def trace(fn, rows: int = 18) -> dict:
    """Where the time of fn() goes: run it once under torch.profiler (host ops, and the GPU's kernels
    where there is a GPU) and return the wall time, the time the GPU was busy (union of its kernels'
    intervals; None on a CPU) and the `rows` host ops with the most self time, as a table.

    Why: a graph-replayed step that takes longer than its graph (PARD's proposer on the H100: ~1.3-1.5 ms
    against 1.03 ms) loses the rest to launches, copies and syncs, which only a trace tells apart. The
    profiler adds its own cost per op, so compare the shares, not the absolute times, with an untraced run."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == DeviceType.CUDA]                    # microseconds
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)
    return dict(wall_s=wall, gpu_busy_s=busy_time(kernels) / 1e6 if kernels else None,
                gpu_kernels=len(kernels), host_ops=table)
