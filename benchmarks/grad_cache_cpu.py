#!/usr/bin/env python3
"""One training step (forward + loss + backward) on CPU: lf.GradCache (default: rows sorted longest first
into chunks, the last chunk's graph reused), with ``sort_by_length=False`` and with
``reuse_last_chunk=False``, vs the uncached step, interleaved in one process, min of the repeats.
Random-init Qwen2 (hidden 256, 4 layers, sdpa), float32, right-padded random tokens of length L
(``--min-len``: lengths uniform in [min_len, L], so chunks have padding to trim), B query/document pairs.

    python benchmarks/grad_cache_cpu.py B CHUNK [repeats] [--L 64] [--min-len M] [--chunk-tokens T]

``--chunk-tokens T`` adds a side with ``chunk_tokens=T`` and no row cap (chunk_size = B).
"""

from __future__ import annotations

import argparse
import time

import torch

import llmembed_fast as lf
from llmembed_fast.bench.cases_grad_cache import qwen2_encoder, random_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("B", type=int)
    ap.add_argument("chunk", type=int)
    ap.add_argument("repeats", type=int, nargs="?", default=5)
    ap.add_argument("--L", type=int, default=64, help="padded length (default 64)")
    ap.add_argument("--min-len", type=int, default=None, help="shortest row (default: every row is L long)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="also time chunk_tokens=T (rows uncapped)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    enc = qwen2_encoder(torch.device("cpu"), hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    q = random_batch(args.B, args.L, 1000, "cpu", 1, min_len=args.min_len)
    d = random_batch(args.B, args.L, 1000, "cpu", 2, min_len=args.min_len)
    tokens = int(q["attention_mask"].sum() + d["attention_mask"].sum())
    print(f"B={args.B} chunk={args.chunk} L={args.L} min_len={args.min_len}: {tokens} tokens, "
          f"{2 * args.B * args.L} padded")

    def cached(**kw):
        gc = lf.GradCache(enc, lf.contrastive_loss, args.chunk, **kw)
        return lambda: gc.step(q, d)

    def uncached():
        lf.contrastive_loss(enc(q), enc(d)).backward()

    fns = {"uncached": uncached, "GradCache": cached(),
           "GradCache, sort_by_length=False": cached(sort_by_length=False),
           "GradCache, reuse_last_chunk=False": cached(reuse_last_chunk=False)}
    if args.chunk_tokens:
        gc_t = lf.GradCache(enc, lf.contrastive_loss, args.B, chunk_tokens=args.chunk_tokens)
        fns[f"GradCache, chunk_tokens={args.chunk_tokens}"] = lambda: gc_t.step(q, d)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
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
