"""pytest-benchmark suite of quantization and exact code search on CPU, each case paired with its baseline
(same group): sentence-transformers quantize_embeddings, faiss IndexBinaryFlat / IndexFlatIP, usearch exact.

    pytest benchmarks/test_bench_quant.py --benchmark-only --benchmark-group-by=group
"""

import numpy as np
import pytest
import torch

pytest.importorskip("llmembed_fast._C", reason="C++ extension not built")
from llmembed_fast import quant  # noqa: E402

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def embeddings():
    return RNG.standard_normal((200_000, 1024), dtype=np.float32)


@pytest.fixture(scope="module")
def binary_corpus():
    return (
        RNG.integers(0, 256, (1_000_000, 128), dtype=np.uint8),
        RNG.integers(0, 256, (100, 128), dtype=np.uint8),
    )


@pytest.mark.parametrize("precision", ["ubinary", "int8"])
@pytest.mark.parametrize("provider", ["llmembed_fast", "sentence-transformers"])
def test_quantize(benchmark, embeddings, precision, provider):
    benchmark.group = f"quantize {precision} 200k x 1024"
    if provider == "llmembed_fast":
        x = torch.from_numpy(embeddings)
        benchmark(quant.quantize, x, precision)
    else:
        st = pytest.importorskip("sentence_transformers.util.quantization")
        benchmark(st.quantize_embeddings, embeddings, precision)


@pytest.mark.parametrize("nq", [1, 100])
@pytest.mark.parametrize("provider", ["llmembed_fast", "faiss"])
def test_hamming_topk(benchmark, binary_corpus, nq, provider):
    docs, q = binary_corpus
    benchmark.group = f"hamming top-10 1M x 1024b, {nq} queries"
    if provider == "llmembed_fast":
        benchmark(quant.hamming_topk, torch.from_numpy(q[:nq]), torch.from_numpy(docs), 10)
    else:
        faiss = pytest.importorskip("faiss")
        index = faiss.IndexBinaryFlat(1024)
        index.add(docs)
        benchmark(index.search, q[:nq], 10)


@pytest.mark.parametrize("provider", ["llmembed_fast", "faiss-flatip-f32", "usearch-exact-int8"])
def test_int8_topk(benchmark, embeddings, provider):
    benchmark.group = "int8 top-10 200k x 1024, 100 queries"
    queries = RNG.standard_normal((100, 1024), dtype=np.float32)
    ranges = quant.calibrate(embeddings)
    codes = quant.quantize(embeddings, "int8", ranges=ranges)
    if provider == "llmembed_fast":
        benchmark(
            quant.int8_topk, torch.from_numpy(queries), torch.from_numpy(codes), torch.from_numpy(ranges), 10
        )
    elif provider == "faiss-flatip-f32":
        faiss = pytest.importorskip("faiss")
        index = faiss.IndexFlatIP(1024)
        index.add(embeddings)
        benchmark(index.search, queries, 10)
    else:
        usearch = pytest.importorskip("usearch.index")
        qi = quant.quantize(queries, "int8", ranges=ranges)
        benchmark(usearch.search, codes, qi, 10, usearch.MetricKind.IP, exact=True)
