#!/usr/bin/env python3
"""int8 top-10 over 200k x 1024 codes, 1000 queries: lf.quant.int8_topk vs faiss IndexFlatIP (float32),
interleaved in one process, 2 threads each.

    python benchmarks/int8_vs_faiss.py [repeats]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch


def main() -> None:
    import faiss

    from llmembed_fast import quant

    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200_000, 1024), dtype=np.float32)
    qf = rng.standard_normal((1000, 1024), dtype=np.float32)
    r = quant.calibrate(x)
    codes = quant.quantize(x, "int8", ranges=r)
    ct, qt, rt = torch.from_numpy(codes), torch.from_numpy(qf), torch.from_numpy(r)
    index = faiss.IndexFlatIP(1024)
    index.add(x)
    times: dict[str, list[float]] = {"llmembed_fast int8_topk": [], "faiss IndexFlatIP": []}
    for _ in range(reps):
        t = time.perf_counter()
        quant.int8_topk(qt, ct, rt, 10)
        times["llmembed_fast int8_topk"].append(time.perf_counter() - t)
        t = time.perf_counter()
        index.search(qf, 10)
        times["faiss IndexFlatIP"].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:<26} " + " ".join(f"{v:.3f}" for v in ts) + " s")
    best = {k: min(v) for k, v in times.items()}
    print(f"speedup (min / min): {best['faiss IndexFlatIP'] / best['llmembed_fast int8_topk']:.2f}x")


if __name__ == "__main__":
    main()
