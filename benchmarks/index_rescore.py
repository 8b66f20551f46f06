"""Index.search with rescoring: the fixed-order C++ scoring (``score_rows``) against the gather + einsum
formula it replaced (what a user would write in torch), side by side in one process, same candidates.

    python benchmarks/index_rescore.py [N] [Q] [repeats]      # default 200000 1000 3, D = 1024, k = 10, x4

Prints per rescore kind: whole search time with each rescoring, the rescoring step alone, and whether both
return the same ids.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from llmembed_fast import quant
from llmembed_fast.quant.codes import dequant_params


def einsum_rescore(index, q, cand, k):
    """The previous implementation: gather the candidates' vectors as float64, one einsum."""
    if index.rescore == "int8":
        offset, scale = dequant_params(index.ranges)
        vecs = offset + (index._data("int8")[cand].view(torch.uint8) ^ 0x80).to(torch.float64) * scale
    else:
        vecs = index._data("float")[cand].to(torch.float64)
    scores = torch.einsum("qd,qcd->qc", q.to(torch.float64), vecs)
    by_id = torch.sort(cand, dim=1, stable=True)
    scores, cand = scores.gather(1, by_id.indices), by_id.values
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order).to(torch.float32), cand.gather(1, order)


def main(argv):
    n = int(argv[0]) if argv else 200_000
    nq = int(argv[1]) if len(argv) > 1 else 1000
    reps = int(argv[2]) if len(argv) > 2 else 3
    d, k, mult = 1024, 10, 4
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((n, d), dtype=np.float32)
    queries = torch.from_numpy(rng.standard_normal((nq, d), dtype=np.float32))
    print(f"N={n} Q={nq} D={d} k={k} rescore_multiplier={mult} threads={torch.get_num_threads()}")
    for rescore in ("int8", "float"):
        index = quant.Index(d, precision="binary", rescore=rescore).add(docs)
        ours_rescore = index._rescore
        cand = torch.from_numpy(np.asarray(quant.hamming_topk(
            quant.quantize(queries, "ubinary"), index._data("bits"), k * mult)[1]))
        best = {"search": [], "search_einsum": [], "step": [], "step_einsum": []}
        for _ in range(reps):  # interleaved
            t = time.perf_counter()
            _, ids = index.search(queries, k, rescore_multiplier=mult)
            best["search"].append(time.perf_counter() - t)
            index._rescore = lambda q, c, kk, _i=index: einsum_rescore(_i, q, c, kk)
            t = time.perf_counter()
            _, ids_e = index.search(queries, k, rescore_multiplier=mult)
            best["search_einsum"].append(time.perf_counter() - t)
            index._rescore = ours_rescore
            t = time.perf_counter()
            ours_rescore(queries, cand, k)
            best["step"].append(time.perf_counter() - t)
            t = time.perf_counter()
            einsum_rescore(index, queries, cand, k)
            best["step_einsum"].append(time.perf_counter() - t)
        m = {key: min(v) for key, v in best.items()}
        same = bool(torch.equal(torch.as_tensor(np.asarray(ids)), torch.as_tensor(np.asarray(ids_e))))
        print(f"rescore={rescore:5}: search {m['search']:.3f} s vs {m['search_einsum']:.3f} s with einsum "
              f"({m['search_einsum'] / m['search']:.2f}x); rescoring step {m['step'] * 1e3:.1f} ms vs "
              f"{m['step_einsum'] * 1e3:.1f} ms ({m['step_einsum'] / m['step']:.1f}x); same ids: {same}")


if __name__ == "__main__":
    main(sys.argv[1:])
