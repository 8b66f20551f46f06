"""Bench cases of gradient caching: one training step (forward + loss + backward, no optimizer) of
``lf.GradCache`` against the uncached step and sentence-transformers' CachedMultipleNegativesRankingLoss.

CPU default: a tiny random Qwen2 (hidden 64, 2 layers), B=64 pairs, L=32, chunk 16, float32.
``--full``: hidden 256, 4 layers, B=256, L=64, chunk 32. The GPU figures (Qwen2-0.5B shape, bf16) are in
benchmarks/gpu_sections/grad_cache.py.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import llmembed_fast as lf

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936)


def qwen2_encoder(device, dtype=torch.float32, *, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, dropout=0.0, seed=0):
    """Random-init Qwen2 (``attn_implementation="sdpa"``) + mean pooling, as an nn.Module chunk -> [b, H]."""
    from transformers import AutoModel, Qwen2Config

    from llmembed_fast.embedder.hf_model import dtype_kwarg

    cfg = Qwen2Config(hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads, vocab_size=vocab_size,
                      max_position_embeddings=4096, attention_dropout=dropout, pad_token_id=0)
    torch.manual_seed(seed)
    # built where it runs (as the embedder section does): the 0.5B model's random init on the host CPU, then a
    # copy, took ~12 s on 2 cores, out of the grad_cache section's timing share
    with torch.device(device):
        model = AutoModel.from_config(cfg, attn_implementation="sdpa", **{dtype_kwarg(): dtype})
    return MeanPooled(model).train()


class MeanPooled(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        h = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state
        return lf.pool(h, batch["attention_mask"], "mean")


class STLike(nn.Sequential):
    """A sentence-transformers-shaped model (features dict -> {"sentence_embedding"}) around an encoder, so
    CachedMultipleNegativesRankingLoss can run on the same network."""

    def __init__(self, encoder):
        super().__init__(_STModule(encoder))


class _STModule(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, features):
        return {"sentence_embedding": self.encoder(features)}


def random_batch(n: int, L: int, vocab: int, device, seed: int, min_len: int | None = None) -> dict:
    """Token ids with right padding, lengths uniform in [min_len, L] (default L: no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, L), generator=g)
    lengths = torch.full((n,), L) if min_len is None else torch.randint(min_len, L + 1, (n,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    return {"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device)}


def step_peak_bytes(peak_extra_bytes, encoder, fn) -> int:
    """Peak memory of one step ``fn`` (from :func:`step_fns`) above what was allocated before it, with the
    parameter gradients counted: they are set to None before the baseline is taken, so the step allocates
    them inside the measurement, as a training step after ``optimizer.zero_grad()`` does. (Each step also
    sets them to None first; gradients left by an earlier step would sit in the baseline and be freed during
    the measured step, understating its peak by up to their size.) The same for every side measured:
    cached, uncached, any batch size. ``peak_extra_bytes``: fn -> bytes (the suite's ``ctx.peak_extra_bytes``
    or ``lambda f: timing.peak_cuda_extra_bytes(f, device)``)."""
    encoder.zero_grad(set_to_none=True)
    return peak_extra_bytes(fn)


def step_fns(encoder, q, d, chunk: int, temperature: float = 0.05, autocast_dtype=None):
    """{"gradcache": fn, "gradcache_no_reuse": fn, "gradcache_unsorted": fn, "uncached": fn, "st_cached_mnrl":
    fn or reason}: one forward/backward each ("gradcache_no_reuse": ``reuse_last_chunk=False``, every chunk
    run twice; "gradcache_unsorted": ``sort_by_length=False``, chunks of the rows in order). Each
    step starts with ``zero_grad(set_to_none=True)`` (gradients allocated anew, as in training); measure its
    memory with :func:`step_peak_bytes`."""
    dev = next(encoder.parameters()).device
    ctx = ((lambda: torch.autocast(dev.type, dtype=autocast_dtype)) if autocast_dtype
           else contextlib.nullcontext)
    def cached_fn(gc):
        def cached():
            encoder.zero_grad(set_to_none=True)
            with ctx():
                gc.step(q, d, temperature=temperature)
        return cached

    def uncached():
        encoder.zero_grad(set_to_none=True)
        with ctx():
            loss = lf.contrastive_loss(encoder(q), encoder(d), temperature=temperature)
        loss.backward()

    out = {"gradcache": cached_fn(lf.GradCache(encoder, lf.contrastive_loss, chunk)),
           "gradcache_no_reuse": cached_fn(lf.GradCache(encoder, lf.contrastive_loss, chunk,
                                                        reuse_last_chunk=False)),
           "gradcache_unsorted": cached_fn(lf.GradCache(encoder, lf.contrastive_loss, chunk,
                                                        sort_by_length=False)),
           "uncached": uncached}
    try:
        try:  # sentence-transformers 5.4 on
            from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
        except ImportError:
            from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
    except ImportError:
        out["st_cached_mnrl"] = "skipped: sentence-transformers not installed"
        return out
    st_loss = CachedMultipleNegativesRankingLoss(STLike(encoder), scale=1.0 / temperature,
                                                 mini_batch_size=chunk)

    def st():
        encoder.zero_grad(set_to_none=True)
        with ctx():
            loss = st_loss([dict(q), dict(d)], None)
        loss.backward()

    out["st_cached_mnrl"] = st
    return out


def cases(ctx) -> list:
    from llmembed_fast.bench.core import Case

    dev = ctx.device
    if ctx.smoke:
        cfg, B, L, chunk = dict(hidden_size=32, intermediate_size=64), 8, 8, 4
    elif dev.type == "cuda":
        cfg, B, L, chunk = dict(QWEN2_05B), 256, 128, 64
    elif ctx.full:
        cfg, B, L, chunk = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4), 256, 64, 32
    else:
        cfg, B, L, chunk = {}, 64, 32, 16
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    enc = qwen2_encoder(dev, **cfg)
    vocab = enc.model.config.vocab_size
    q = random_batch(B, L, vocab, dev, 1, min_len=L // 2)
    d = random_batch(B, L, vocab, dev, 2, min_len=L // 2)
    fns = step_fns(enc, q, d, chunk, autocast_dtype=dtype if dev.type == "cuda" else None)
    H = enc.model.config.hidden_size
    return [Case("grad_cache", f"train step B{B} L{L} chunk{chunk} H{H} {str(dtype)[6:]}", fns["gradcache"],
                 {"uncached": fns["uncached"], "GradCache, reuse_last_chunk=False": fns["gradcache_no_reuse"],
                  "GradCache, sort_by_length=False": fns["gradcache_unsorted"],
                  "sentence-transformers CachedMNRL": fns["st_cached_mnrl"]},
                 note="speedup < 1 vs uncached is the price of caching (one extra forward); ideal ~0.75x")]
