"""Sections of benchmarks/gpu_suite.py, one module per feature.

Each module defines two functions returning iterables of records; generators are best (the suite prints
and saves each record as it comes, so a crash or a timeout keeps what was measured before it):
    correctness(ctx) yields {"name", "ok": bool, "err": float, "tol": float, "detail": str}
    timings(ctx) yields     {"name", "ours_ms", "baselines": {name: ms}, "floor_ms" | None, "extra": {}}
and either may yield {"name", "skipped": reason} for a case the budget (or the setup) left out.
ctx: device, smoke (tiny shapes, maybe on CPU through the Triton interpreter: `gpu_suite.py --smoke`),
full (the issues' largest configurations), time_left() -> s, bandwidth_Bps (copy, read+write),
matmul_flops (bf16), bench(fn) -> ms, peak_extra_bytes(fn) -> bytes. Sections use only torch, triton and
this repository.
"""
