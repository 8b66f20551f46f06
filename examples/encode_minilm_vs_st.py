"""CPU figure of benchmarks/RESULTS.md (issue 6): LLMEmbedder vs sentence-transformers encode (MiniLM).

    python examples/encode_minilm_vs_st.py [N_TEXTS]
"""

import sys
import time

from sentence_transformers import SentenceTransformer

from llmembed_fast.bench.cases_embedder import minilm_dir, skewed_texts
from llmembed_fast.embedder import LLMEmbedder

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
texts = skewed_texts(n, median_words=30, max_words=300, seed=1)
path = minilm_dir()
ours = LLMEmbedder.from_pretrained(path, device="cpu")
st = SentenceTransformer(path, device="cpu")
tokens = sum(len(x) for x in ours._tokenize(texts).ids)
ours.encode(texts[:64])
st.encode(texts[:64])
best = {}
for name, fn in [
    ("sentence-transformers", lambda: st.encode(texts, batch_size=32)),
    ("ours", lambda: ours.encode(texts)),
] * 2:
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    best[name] = min(best.get(name, dt), dt)
    print(f"{name:>22}: {dt:.2f} s  {tokens / dt:,.0f} tok/s", flush=True)
a, b = ours.encode(texts), st.encode(texts)
print(
    f"{n} texts, {tokens} tokens; speedup {best['sentence-transformers'] / best['ours']:.2f}x; "
    f"min cosine {(a * b).sum(1).min():.8f}"
)
