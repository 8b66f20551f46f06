#!/usr/bin/env python3
"""int8 top-10 over 200k x 1024 codes, 1000 queries: lf.quant.int8_topk vs faiss IndexFlatIP (float32),
interleaved in one process, 2 threads each. With SIMD levels named (scalar, avx2, avx512), ours runs once
per level (capped with the extension's ``set_simd``; a level above the CPU's is skipped), beside faiss.

    python benchmarks/int8_vs_faiss.py [repeats] [level ...]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch


def main() -> None:
    import faiss

    from llmembed_fast import _ext, quant

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    C = _ext.extension()
    detected = C.build_info().get("simd_detected") if C is not None else None
    order = ("scalar", "avx2", "avx512")
    levels = [lv for lv in sys.argv[2:] if detected is None or order.index(lv) <= order.index(detected)]
    levels = levels or [None]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 1024), dtype=np.float32)
    qf = rng.standard_normal((1000, 1024), dtype=np.float32)
    r = quant.calibrate(x)
    codes = quant.quantize(x, "int8", ranges=r)
    ct, qt, rt = torch.from_numpy(codes), torch.from_numpy(qf), torch.from_numpy(r)
    index = faiss.IndexFlatIP(1024)
    index.add(x)
    ours = {lv: f"llmembed_fast int8_topk{'' if lv is None else ' ' + lv}" for lv in levels}
    times: dict[str, list[float]] = {name: [] for name in ours.values()}
    times["faiss IndexFlatIP"] = []
    try:
        for _ in range(reps):
            for lv, name in ours.items():
                if lv is not None:
                    C.set_simd(lv)
                t = time.perf_counter()
                quant.int8_topk(qt, ct, rt, 10)
                times[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            index.search(qf, 10)
            times["faiss IndexFlatIP"].append(time.perf_counter() - t)
    finally:
        if detected is not None:
            C.set_simd(detected)
    print(f"CPU SIMD detected: {detected}; kernels: {quant_kernels()}")
    for name, ts in times.items():
        print(f"{name:<34} " + " ".join(f"{v:.3f}" for v in ts) + " s")
    best = {k: min(v) for k, v in times.items()}
    for name in ours.values():
        print(f"{name}: speedup over faiss (min / min): {best['faiss IndexFlatIP'] / best[name]:.2f}x")


def quant_kernels() -> dict:
    import llmembed_fast as lf

    return lf.info().get("extension", {}).get("kernels", {})


if __name__ == "__main__":
    main()
