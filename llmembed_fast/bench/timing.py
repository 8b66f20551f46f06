"""Timing helpers: device-synchronized wall clock, warm-up, median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    min_time_s: float = 0.3,
    max_reps: int = 50,
    min_reps: int = 3,
    warmup: int = 1,
) -> dict:
    """Run ``fn`` ``warmup`` times, then repeat until ``min_time_s`` has passed (between ``min_reps`` and
    ``max_reps`` runs). Returns {"median_s", "min_s", "reps"}. CUDA work is synchronized around each run."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (len(times) < max_reps and time.perf_counter() - start < min_time_s):
        if device.type == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def peak_cuda_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory allocated while ``fn`` runs, above what was allocated before (None off CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
