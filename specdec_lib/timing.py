"""GPU timing with CUDA events (its own module, so kernels.py and cuda_graphs.py both import it
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


def phase_printer(prefix: str = "", enabled: bool = True):
    """A function that prints `[<prefix>t s] what` with the seconds since it was made, flushed at
    once: on a leased GPU the phases of a long command (load, compile, capture, train) must show
    where the minutes go even when the command is killed before it ends."""
    t0 = time.perf_counter()

    def stamp(what: str) -> None:
        if enabled:
            print(f"[{prefix}{time.perf_counter() - t0:6.1f} s] {what}", flush=True)
    return stamp
