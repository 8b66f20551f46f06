#!/usr/bin/env python3
"""Hamming top-k by code size: llmembed_fast's hamming_topk at SIMD levels avx2 and avx512 (and, with
``--before``, another build of the package, e.g. the previous commit's) against faiss IndexBinaryFlat,
on the same random codes, interleaved, min of the repeats, 2 threads each. ``--op int8``: int8_topk by
dimension instead (sizes are dimensions; Gaussian embeddings quantized to int8, Gaussian float queries)
against faiss IndexFlatIP on the dequantized float32 documents.

Each llmembed_fast build runs in its own worker process (two builds cannot share one process); the
workers and faiss take turns on every size and repeat, so load on a shared machine hits them alike.
Every Hamming result's distances are checked against faiss (equal distances may come in any order in faiss, so
only distances are compared). int8: every build's ids and scores must equal the first build's (all are exact),
and faiss's float32 ids must agree on >= 99% of them.

    python benchmarks/hamming_sizes.py [--sizes 48,96,112,128,512] [--queries 1000] [--docs 1000000]
        [--large-docs 500000 --large-queries 200 (codes of >= 256 bytes)] [--repeats 3] [--k 10]
        [--before /path/to/old/build (a folder holding the llmembed_fast package)]
    python benchmarks/hamming_sizes.py --op int8 [--sizes 96,100,200,384,390] [--docs 100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

LEVELS = ("avx2", "avx512")


def worker() -> None:
    """Runs hamming_topk (or int8_topk, with a ranges file) on request: one JSON line in (files, k, level),
    one line out (seconds); the results go to the request's out file (distances, or scores and ids)."""
    import torch

    from llmembed_fast import _ext, quant

    torch.set_num_threads(2)
    cache: dict[str, np.ndarray] = {}
    for line in sys.stdin:
        req = json.loads(line)
        paths = [req[key] for key in ("q", "d", "ranges") if key in req]
        if set(cache) != set(paths):  # a new size: load its codes once
            cache = {p: np.load(p) for p in paths}
        q, d = cache[req["q"]], cache[req["d"]]
        _ext.extension().set_simd(req["level"])
        if "ranges" in req:
            t = time.perf_counter()
            scores, ids = quant.int8_topk(q, d, cache[req["ranges"]], req["k"])
            sec = time.perf_counter() - t
            np.save(req["out"], np.stack([np.asarray(scores, np.float64), np.asarray(ids, np.float64)]))
        else:
            t = time.perf_counter()
            dist, _ = quant.hamming_topk(q, d, req["k"])
            sec = time.perf_counter() - t
            np.save(req["out"], dist)
        print(json.dumps({"sec": sec}), flush=True)


class Worker:
    def __init__(self, path: str):
        env = dict(os.environ, PYTHONPATH=path)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, **req) -> float:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["sec"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--op", choices=("hamming", "int8"), default="hamming")
    ap.add_argument("--sizes", help="code sizes in bytes (hamming; default 48,96,112,128,512) or dimensions "
                    "(int8; default 96,100,128,200,384,390,1000,1024)")
    ap.add_argument("--queries", type=int, help="default 1000 (hamming), 200 (int8)")
    ap.add_argument("--docs", type=int, help="default 1,000,000 (hamming), 100,000 (int8)")
    ap.add_argument("--large-docs", type=int, default=500_000, help="documents for codes of >= 256 bytes")
    ap.add_argument("--large-queries", type=int, default=200, help="queries for codes of >= 256 bytes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--before", help="folder holding another llmembed_fast build to time beside this one")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    int8 = args.op == "int8"
    args.sizes = args.sizes or ("96,100,128,200,384,390,1000,1024" if int8 else "48,96,112,128,512")
    args.queries = args.queries or (200 if int8 else 1000)
    args.docs = args.docs or (100_000 if int8 else 1_000_000)

    import faiss

    faiss.omp_set_num_threads(2)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    builds = {"after": Worker(here)}
    if args.before:
        builds["before"] = Worker(args.before)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nb in (int(s) for s in args.sizes.split(",")):
            large = nb >= 256 and not int8
            n, nq = (args.large_docs, args.large_queries) if large else (args.docs, args.queries)
            rng = np.random.default_rng(nb)
            files = {"q": os.path.join(tmp, f"q{nb}.npy"), "d": os.path.join(tmp, f"d{nb}.npy")}
            if int8:
                from llmembed_fast import quant

                x = rng.standard_normal((n, nb), dtype=np.float32)
                q = rng.standard_normal((nq, nb), dtype=np.float32)
                ranges = quant.calibrate(x)
                d = quant.quantize(x, "int8", ranges=ranges)
                files["ranges"] = os.path.join(tmp, f"r{nb}.npy")
                np.save(files["ranges"], np.asarray(ranges))
                index = faiss.IndexFlatIP(nb)
                index.add(np.ascontiguousarray(quant.dequantize(d, ranges), dtype=np.float32))
                del x
            else:
                d = rng.integers(0, 256, (n, nb), dtype=np.uint8)
                q = rng.integers(0, 256, (nq, nb), dtype=np.uint8)
                index = faiss.IndexBinaryFlat(nb * 8)
                index.add(d)
            np.save(files["q"], q)
            np.save(files["d"], d)
            times: dict[str, list[float]] = {}
            want = first = None
            for _ in range(args.repeats):
                t = time.perf_counter()
                want, faiss_ids = index.search(q, args.k)
                times.setdefault("faiss", []).append(time.perf_counter() - t)
                for name, w in builds.items():
                    for level in LEVELS:
                        out = os.path.join(tmp, "out.npy")
                        sec = w.run(**files, k=args.k, level=level, out=out)
                        times.setdefault(f"{name} {level}", []).append(sec)
                        got = np.load(out)
                        if int8:
                            first = got if first is None else first
                            shared = [len(set(a) & set(b)) for a, b in zip(got[1], faiss_ids, strict=True)]
                            agree = np.mean(shared) / args.k
                            if not np.array_equal(got, first) or agree < 0.99:
                                raise SystemExit(f"{name} {level}: results differ at {nb} dims "
                                                 f"(ids shared with faiss: {agree:.4f})")
                        elif not np.array_equal(got, want):
                            raise SystemExit(f"{name} {level}: distances differ from faiss at {nb} bytes")
            best = {key: min(v) for key, v in times.items()}
            rows.append((nb, n, nq, best))
            del index, d
    for w in builds.values():
        w.close()

    cols = [f"{name} {level}" for name in ("before", "after") if name in builds for level in LEVELS]
    head = f"{'dims' if int8 else 'bytes':>5} {'docs':>8} {'queries':>7} {'faiss':>8}"
    head += "".join(f" {c:>14}" for c in cols)
    if "before" in builds:
        head += "".join(f" {'before/after ' + lv:>19}" for lv in LEVELS)
    head += "".join(f" {'faiss/after ' + lv:>18}" for lv in LEVELS)
    print(head)
    for nb, n, nq, best in rows:
        line = f"{nb:>5} {n:>8} {nq:>7} {best['faiss']:>8.3f}" + "".join(f" {best[c]:>14.3f}" for c in cols)
        if "before" in builds:
            line += "".join(f" {best[f'before {lv}'] / best[f'after {lv}']:>19.2f}" for lv in LEVELS)
        line += "".join(f" {best['faiss'] / best[f'after {lv}']:>18.2f}" for lv in LEVELS)
        print(line)
    print(f"seconds: min of {args.repeats}, top-{args.k}, 2 threads; " + (
        "ids and scores equal across builds and levels, >= 99% of ids shared with faiss" if int8
        else "distances equal faiss in every run"))


if __name__ == "__main__":
    main()
