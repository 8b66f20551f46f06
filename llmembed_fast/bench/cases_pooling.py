"""Bench cases of the embedding head: lf.pool against sentence-transformers' Pooling (+ slice + normalize),
eager and under torch.compile.

GPU default: bf16, B=64, L=1024, H=4096, dims=1024, normalize, with (a) full lengths and (b) lengths uniform
in [1, L] (the issue's configuration). CPU default: float32, B=32, L=256, H=1024, dims=256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import llmembed_fast as lf

ST_MODE = {
    "mean": "mean",
    "weighted_mean": "weightedmean",
    "max": "max",
    "last": "lasttoken",
    "first": "cls",
    "mean_sqrt_len": "mean_sqrt_len_tokens",
}


def make_inputs(B: int, L: int, H: int, dtype: torch.dtype, device, lengths: str, seed: int = 0):
    """Random hidden states [B, L, H] and a right-padded int64 attention mask; lengths "full" or "uniform"."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    n = torch.full((B,), L) if lengths == "full" else torch.randint(1, L + 1, (B,), generator=gen)
    mask = (torch.arange(L)[None, :] < n[:, None]).to(device=device, dtype=torch.int64)
    return hidden, mask, int(n.sum())


def st_head(mode: str, H: int, dim: int):
    """The pipeline a sentence-transformers user runs: Pooling, then truncate_dim, then Normalize.
    Returns a callable (hidden, mask) -> [B, dim], or a string saying why it is unavailable."""
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling  # sentence-transformers >= 6
    except ImportError:
        try:
            from sentence_transformers.models import Pooling
        except ImportError:
            return "skipped: sentence-transformers not installed (pip install sentence-transformers)"
    pooling = Pooling(H, pooling_mode=ST_MODE[mode])

    def run(hidden, mask):
        emb = pooling({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
        return F.normalize(emb[:, :dim], p=2, dim=1)

    return run


def _fwd_bwd(fn, hidden, mask, grad):
    def run():
        hidden.grad = None
        out = fn(hidden, mask)
        out.backward(grad)

    return run


def cases(ctx) -> list:
    from llmembed_fast.bench.core import Case

    gpu = ctx.device.type == "cuda"
    if ctx.smoke:
        B, L, H, dim, dtype = 2, 16, 64, 32, torch.float32
    elif gpu:
        B, L, H, dim, dtype = 64, 1024, 4096, 1024, torch.bfloat16
    else:
        B, L, H, dim, dtype = (
            (64, 512, 4096, 1024, torch.float32) if ctx.full else (32, 256, 1024, 256, torch.float32)
        )
    want_compile = gpu or ctx.full
    elt = torch.finfo(dtype).bits // 8
    out: list = []
    for lengths in ("full", "uniform"):
        hidden, mask, tokens = make_inputs(B, L, H, dtype, ctx.device, lengths)
        modes = ("mean", "weighted_mean", "max", "last") if not ctx.smoke else ("mean",)
        for mode in modes:
            ours = lambda m=mode, h=hidden, k=mask: lf.pool(h, k, m, dims=dim, normalize=True)
            st = st_head(mode, H, dim)
            baselines = {
                "sentence-transformers": (lambda f=st, h=hidden, k=mask: f(h, k)) if callable(st) else st
            }
            if want_compile and callable(st):
                compiled = torch.compile(st, dynamic=False)
                baselines["torch.compile(ST)"] = lambda f=compiled, h=hidden, k=mask: f(h, k)
            elif callable(st):
                baselines["torch.compile(ST)"] = "skipped on CPU without --full (compilation takes minutes)"
            read = (B if mode == "last" else tokens) * dim * elt
            out.append(
                Case(
                    "pooling",
                    f"{mode} fwd {lengths} B{B} L{L} H{H}->{dim} {str(dtype)[6:]}",
                    ours,
                    baselines,
                    bytes_moved=read,
                    note="bytes = pooled tokens x used columns (the minimum the op must read)",
                )
            )
        # pooling alone (no Matryoshka slice to exploit): mean over all H columns
        if not ctx.smoke:
            st_full = st_head("mean", H, H)
            out.append(
                Case(
                    "pooling",
                    f"mean fwd {lengths} B{B} L{L} H{H}->{H} {str(dtype)[6:]}",
                    lambda h=hidden, k=mask: lf.pool(h, k, "mean", normalize=True),
                    {
                        "sentence-transformers": (lambda f=st_full, h=hidden, k=mask: f(h, k))
                        if callable(st_full)
                        else st_full
                    },
                    bytes_moved=tokens * H * elt,
                    note="no slicing: every column pooled",
                )
            )
        # forward + backward, mean pooling
        h = hidden.detach().requires_grad_(True)
        grad = torch.randn(B, dim, device=ctx.device, dtype=torch.float32)
        ours_fb = _fwd_bwd(lambda x, k: lf.pool(x, k, "mean", dims=dim, normalize=True), h, mask, grad)
        st = st_head("mean", H, dim)
        baselines = {"sentence-transformers": _fwd_bwd(st, h, mask, grad.to(dtype)) if callable(st) else st}
        if want_compile and callable(st):
            baselines["torch.compile(ST)"] = _fwd_bwd(
                torch.compile(st, dynamic=False), h, mask, grad.to(dtype)
            )
        out.append(
            Case(
                "pooling",
                f"mean fwd+bwd {lengths} B{B} L{L} H{H}->{dim} {str(dtype)[6:]}",
                ours_fb,
                baselines,
                bytes_moved=tokens * dim * elt + B * L * H * elt,
                note="bytes = forward read + grad_hidden written",
            )
        )
    return out
