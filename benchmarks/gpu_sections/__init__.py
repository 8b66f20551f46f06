"""Sections of benchmarks/gpu_suite.py, one module per feature.

Each module defines:
    correctness(ctx) -> list[dict]  each {"name", "ok": bool, "err": float, "tol": float, "detail": str}
    timings(ctx) -> list[dict]      each {"name", "ours_ms", "baselines": {name: ms}, "floor_ms" | None,
                                    "extra": {}}
ctx: device, smoke (tiny shapes, maybe on CPU through the Triton interpreter: `gpu_suite.py --smoke`),
time_left() -> s, bandwidth_Bps (copy, read+write), matmul_flops (bf16), bench(fn) -> ms,
peak_extra_bytes(fn) -> bytes. Sections use only torch, triton and this repository.
"""
