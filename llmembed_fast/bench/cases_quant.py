"""Bench cases of quantization and exact search over codes (CPU), side by side with what a user would run:
sentence-transformers' quantize_embeddings (numpy), faiss IndexBinaryFlat / IndexFlatIP, usearch exact int8.

Default (fits ~30 s with setup on a 2-core CPU): quantize 50k x 1024, Hamming top-10 over 1M x 1024-bit codes
(1 and 20 queries), int8 top-10 over 20k x 1024 (100 queries). --full: the issue's sizes (quantize 1M x 1024,
1000 Hamming queries, int8 200k x 1024 with 1000 queries).
"""

from __future__ import annotations

import numpy as np
import torch

from llmembed_fast.bench.core import BenchContext, Case, Skip


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    return faiss


def _usearch_exact():
    try:
        from usearch.index import MetricKind, search
    except ImportError:
        return None
    return lambda data, q, k: search(data, q, k, MetricKind.IP, exact=True, threads=torch.get_num_threads())


def _st_quantize():
    try:
        from sentence_transformers.util.quantization import quantize_embeddings
    except ImportError:
        try:
            from sentence_transformers.quantization import quantize_embeddings
        except ImportError:
            return None
    return quantize_embeddings


def cases(ctx: BenchContext) -> list[Case]:
    from llmembed_fast import _ext, quant

    if ctx.device.type != "cpu":
        raise Skip(
            "its cases run on the CPU (--device cpu); the GPU ones are in benchmarks/gpu_sections/quant.py "
            "(bash benchmarks/run_gpu_suite.sh quant)"
        )
    _ext.require("quant bench")
    rng = np.random.default_rng(0)
    out: list[Case] = []
    faiss, us_search, st_quantize = _faiss(), _usearch_exact(), _st_quantize()
    kernels = _ext.extension().build_info()["kernels"]

    # quantize -> ubinary / int8
    n_q = 2_000 if ctx.smoke else (1_000_000 if ctx.full else 50_000)
    emb = rng.standard_normal((n_q, 1024), dtype=np.float32)
    emb_t = torch.from_numpy(emb)
    ranges = quant.calibrate(emb_t[: min(n_q, 10_000)])
    ranges_np = ranges.numpy()
    for prec in ("ubinary", "int8"):
        kw = {} if prec == "ubinary" else {"ranges": ranges}
        st_kw = {} if prec == "ubinary" else {"ranges": ranges_np}
        out.append(
            Case(
                "quant",
                f"quantize {prec} {n_q // 1000}k x 1024",
                ours=lambda p=prec, kw=kw: quant.quantize(emb_t, p, **kw),
                baselines={
                    "st quantize_embeddings": (lambda p=prec, kw=st_kw: st_quantize(emb, p, **kw))
                    if st_quantize
                    else "sentence-transformers not installed"
                },
                bytes_moved=emb.nbytes + n_q * (128 if prec == "ubinary" else 1024),
                note=kernels["quantize"],
            )
        )

    # Hamming top-10 over 1M x 1024-bit codes (20k under --smoke)
    n_h = 20_000 if ctx.smoke else 1_000_000
    docs = rng.integers(0, 256, (n_h, 128), dtype=np.uint8)
    qcodes = rng.integers(0, 256, (1000, 128), dtype=np.uint8)
    docs_t, q_t = torch.from_numpy(docs), torch.from_numpy(qcodes)
    fb = None
    if faiss is not None:
        fb = faiss.IndexBinaryFlat(1024)
        fb.add(docs)
    for nq in (1, 1000) if ctx.full else (1, 20):
        out.append(
            Case(
                "quant",
                f"hamming top-10 {n_h // 1000}k x 1024b, {nq} queries",
                ours=lambda nq=nq: quant.hamming_topk(q_t[:nq], docs_t, 10),
                baselines={
                    "faiss IndexBinaryFlat": (lambda nq=nq: fb.search(qcodes[:nq], 10))
                    if fb
                    else "faiss not installed"
                },
                bytes_moved=docs.nbytes,
                note=kernels["hamming"],
            )
        )

    # int8 top-10
    n_i = 2_000 if ctx.smoke else (200_000 if ctx.full else 20_000)
    nq_i = 10 if ctx.smoke else (1000 if ctx.full else 100)
    x = rng.standard_normal((n_i, 1024), dtype=np.float32)
    qf = rng.standard_normal((nq_i, 1024), dtype=np.float32)
    r = quant.calibrate(x)
    codes = quant.quantize(x, "int8", ranges=r)
    codes_t, qf_t, r_t = torch.from_numpy(codes), torch.from_numpy(qf), torch.from_numpy(r)
    baselines: dict = {}
    if faiss is not None:
        fi = faiss.IndexFlatIP(1024)
        fi.add(x)
        baselines["faiss IndexFlatIP f32"] = lambda: fi.search(qf, 10)
    else:
        baselines["faiss IndexFlatIP f32"] = "faiss not installed"
    if us_search is not None:
        qi = quant.quantize(qf, "int8", ranges=r)
        baselines["usearch exact int8"] = lambda: us_search(codes, qi, 10)
    else:
        baselines["usearch exact int8"] = "usearch not installed"
    out.append(
        Case(
            "quant",
            f"int8 top-10 {n_i // 1000}k x 1024, {nq_i} queries",
            ours=lambda: quant.int8_topk(qf_t, codes_t, r_t, 10),
            baselines=baselines,
            bytes_moved=codes.nbytes,
            flops=2 * nq_i * codes.size,
            note=kernels["int8_dot"],
        )
    )
    return out
