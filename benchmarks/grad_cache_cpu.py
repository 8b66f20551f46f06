#!/usr/bin/env python3
"""One training step (forward + loss + backward) on CPU: lf.GradCache with and without reuse_last_chunk vs
the uncached step, interleaved in one process, min of the repeats. Random-init Qwen2 (hidden 256, 4 layers,
sdpa), float32, L = 64, B query/document pairs.

    python benchmarks/grad_cache_cpu.py B CHUNK [repeats]
"""

from __future__ import annotations

import sys
import time

import torch

import llmembed_fast as lf
from llmembed_fast.bench.cases_grad_cache import qwen2_encoder, random_batch


def main() -> None:
    B, chunk = int(sys.argv[1]), int(sys.argv[2])
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    torch.set_num_threads(2)
    enc = qwen2_encoder(torch.device("cpu"), hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    q, d = random_batch(B, 64, 1000, "cpu", 1), random_batch(B, 64, 1000, "cpu", 2)

    def cached(reuse: bool):
        gc = lf.GradCache(enc, lf.contrastive_loss, chunk, reuse_last_chunk=reuse)
        return lambda: gc.step(q, d)

    def uncached():
        lf.contrastive_loss(enc(q), enc(d)).backward()

    fns = {"uncached": uncached, "GradCache": cached(True),
           "GradCache, reuse_last_chunk=False": cached(False)}
    best: dict[str, float] = {}
    for _ in range(reps):
        for name, fn in fns.items():
            enc.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    u = best["uncached"]
    for name, t in best.items():
        print(f"{name:36s} {t * 1e3:9.1f} ms  {t / u:.3f}x uncached")


if __name__ == "__main__":
    main()
