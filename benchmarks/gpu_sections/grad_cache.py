"""GPU section: gradient caching (lf.GradCache) on a random-init Qwen2-0.5B-shaped model, bf16, L=128.

correctness: GradCache's parameter gradients vs a graph-kept forward over the same chunks (same RNG), fp32
with dropout on and bf16 autocast. timings, in this order: cached vs uncached step (time, and peak memory of
one step each) at a batch that fits uncached (B = 256 on a card over 100 GiB, else 192; chunk 128); peak
memory at B = 1,024 vs the issue's 16,384 (chunk 256, one step per size, 16,384 run when the B = 1,024
step's time predicts it fits, else 4,096); then against
sentence-transformers' CachedMultipleNegativesRankingLoss at B = 4,096 (smaller B, or no warm-up, when the
budget is short). Peak memory counts the step's parameter gradients on every side (step_peak_bytes).
``LLMEMBED_FAST_GC_FULL=1``: three timed runs against ST instead of one.
"""
from __future__ import annotations

import os
import time

import torch

import llmembed_fast as lf
from llmembed_fast.bench.cases_grad_cache import (
    QWEN2_05B,
    qwen2_encoder,
    random_batch,
    step_fns,
    step_peak_bytes,
)

from .profiling import kernel_times

FULL = os.environ.get("LLMEMBED_FAST_GC_FULL", "0") == "1"
L = 128


def _rel(got: dict, want: dict) -> float:
    worst = 0.0
    for k, w in want.items():
        g = got[k]
        if not torch.isfinite(g).all():
            return float("inf")
        worst = max(worst, ((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item())
    return worst


def _grads(m) -> dict:
    out = {k: p.grad.detach().clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return out


def correctness(ctx) -> list[dict]:
    dev = ctx.device
    small = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=1000)
    enc = qwen2_encoder(dev, dropout=0.1, **small)
    out = []
    for name, ac_dtype, tol in (("fp32 dropout", None, 1e-4),
                                ("bf16 autocast dropout", torch.bfloat16, 3e-2)):
        B, N, chunk = (6, 8, 4) if ctx.smoke else (48, 64, 20)
        q = random_batch(B, 32, 1000, dev, 1, min_len=4)
        d = random_batch(N, 32, 1000, dev, 2, min_len=4)
        ac = ((lambda ac_dtype=ac_dtype: torch.autocast(dev.type, dtype=ac_dtype)) if ac_dtype
              else torch.enable_grad)
        torch.manual_seed(3)
        with ac():
            qe = torch.cat([enc({k: v[i:i + chunk] for k, v in q.items()}) for i in range(0, B, chunk)])
            de = torch.cat([enc({k: v[i:i + chunk] for k, v in d.items()}) for i in range(0, N, chunk)])
            ref = lf.contrastive_loss(qe, de)
        ref.backward()
        want = _grads(enc)
        torch.manual_seed(3)
        with ac():
            loss = lf.GradCache(enc, lf.contrastive_loss, chunk, trim_padding=False).step(q, d)
        err = max(_rel(_grads(enc), want), abs(loss.item() - ref.item()) / abs(ref.item()))
        out.append({"name": f"GradCache grads vs graph-kept chunks, {name}, B{B} N{N} chunk{chunk}",
                    "ok": err <= tol, "err": err, "tol": tol,
                    "detail": "relative norm error, worst parameter"})
    # the defaults the timings run (padding trimmed per chunk, rows sorted by length), without dropout so
    # that one uncached step over the whole batch is the reference
    enc0 = qwen2_encoder(dev, dropout=0.0, **small)
    B, N, chunk = (6, 8, 4) if ctx.smoke else (48, 64, 20)
    q = random_batch(B, 32, 1000, dev, 3, min_len=4)
    d = random_batch(N, 32, 1000, dev, 4, min_len=4)
    ref = lf.contrastive_loss(enc0(q), enc0(d))
    ref.backward()
    want = _grads(enc0)
    loss = lf.GradCache(enc0, lf.contrastive_loss, chunk).step(q, d)
    err = max(_rel(_grads(enc0), want), abs(loss.item() - ref.item()) / abs(ref.item()))
    out.append({"name": f"GradCache defaults (trim, sort) vs uncached, fp32, B{B} N{N} chunk{chunk}",
                "ok": err <= 1e-4, "err": err, "tol": 1e-4, "detail": "relative norm error, worst parameter"})
    return out


def timings(ctx):
    dev = ctx.device
    # fixed margins in seconds: the smoke run's tiny shapes take a tenth of them (a --smoke --budget-s 60 run
    # still reaches every case)
    m = 0.1 if ctx.smoke else 1.0
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if ctx.smoke else dict(QWEN2_05B)
    enc = qwen2_encoder(dev, **cfg)
    vocab = enc.model.config.vocab_size
    bf16 = torch.bfloat16 if dev.type == "cuda" else None
    if bf16 is not None:
        enc = enc.to(bf16)
    kw = dict(warmup=1, reps=3, min_s=0.0)
    one = dict(warmup=1, reps=1, min_s=0.0)

    def batches(B, seed=0):
        return (random_batch(B, L if not ctx.smoke else 16, vocab, dev, seed + 1),
                random_batch(B, L if not ctx.smoke else 16, vocab, dev, seed + 2))

    def peak(fn):  # gradients set to None before the baseline: their allocation counts, on every side
        return step_peak_bytes(ctx.peak_extra_bytes, enc, fn)

    if os.environ.get("LLMEMBED_FAST_SUITE_GC_PROFILE", "0") == "1" and dev.type == "cuda":
        yield from _profile(ctx, enc, batches)
        return
    # 1) cached vs uncached at a batch that fits uncached, sized to the card: one 256-row chunk of 128 tokens
    #    peaked at 43.7 GB on the H200 (~1.3 MB per token), so an uncached step keeps ~2 x B x 128 x 1.3 MB:
    #    B=512 ran out of the H200's 140 GB, B=256 (~85-90 GB) fits only there, B=192 (~65 GB) an 80 GB H100.
    #    On out-of-memory, B steps down by 64 with chunk 128 kept: 64-row chunks of 128 tokens left the 0.5B
    #    model host-bound on an H200 (2.2x wall, 1.39x kernel time), a figure about the host, not the code.
    big = dev.type == "cuda" and torch.cuda.get_device_properties(dev).total_memory > 100 * 2**30
    B, chunk = (8, 4) if ctx.smoke else ((256, 128) if big else (192, 128))
    tried = []  # the batch sizes that ran out of memory before B, recorded with the figure
    while True:
        q, d = batches(B)
        fns = step_fns(enc, q, d, chunk)
        try:
            t_un = ctx.bench(fns["uncached"], **kw)
            break
        except torch.OutOfMemoryError:
            del q, d, fns
            enc.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if B <= 16:
                raise
            tried.append(B)
            # keep 128-row chunks while B stays above one chunk; below that (never expected) halve both
            B, chunk = (B - 64, chunk) if B - 64 > chunk else (B // 2, max(1, chunk // 2))
    t_gc = ctx.bench(fns["gradcache"], **kw)
    t_nr = ctx.bench(fns["gradcache_no_reuse"], **kw)  # every chunk run twice (before reuse_last_chunk)
    mem = {"peak_MB_cached": round(peak(fns["gradcache"]) / 2**20, 1),  # one step each, grads counted
           "peak_MB_uncached": round(peak(fns["uncached"]) / 2**20, 1)}
    yield {"name": f"step Qwen2-0.5B-shape bf16 L{L} B{B} chunk{chunk}: cached vs uncached",
           "ours_ms": t_gc, "baselines": {"uncached": t_un, "cached, reuse_last_chunk=False": t_nr},
           "floor_ms": None,
           "extra": {"cached/uncached": round(t_gc / t_un, 3),
                     "no_reuse/uncached": round(t_nr / t_un, 3), "target": "<= 1.35", **mem,
                     "B_ran": B, "out_of_memory_at_B": tried,
                     "peak_includes": "parameter gradients (set to None before the baseline)"}}
    # seconds per row of a cached step (at a smaller chunk more host-bound: an over-estimate for larger ones)
    step_s = t_gc / B / 1e3
    del q, d, fns
    # 2) peak memory does not grow with B, at the B = 16,384 vs 1,024 (same chunk): first, one step
    #    per size (no warm-up: the peak is what is measured; step 1 ran a B-row forward uncached),
    #    the small size's wall time predicting the large one's; 4,096 when 16,384 does not fit
    chunk = 4 if ctx.smoke else 256
    small, larger = (8, (64, 32)) if ctx.smoke else (1024, (16384, 4096))
    name = f"peak extra memory B{larger[0]} vs B{small}, chunk{chunk}"
    need = small * step_s * 1.2 + 10 * m
    warm = False  # the chunk's shapes have run (the comparison below may then skip its warm-up)
    if ctx.time_left() < need:
        yield {"name": name, "skipped": f"timing budget spent: one B{small} step predicted {need:.0f} s "
                                        f"with margin, {ctx.time_left():.0f} s left"}
    else:
        peaks, notes = {}, {}
        q, d = batches(small, 20)
        fns = step_fns(enc, q, d, chunk)
        t = time.perf_counter()
        peaks[small] = peak(fns["gradcache"])
        t_small = time.perf_counter() - t
        step_s = t_small / small  # measured at this chunk
        warm = True
        del q, d, fns
        for B in larger:
            # per row a large B re-runs more of its chunks (all but each tower's last): 254 chunk forwards
            # for 128 chunks at 16,384 vs 14 for 8 at 1,024, ~6% more time per row; 25% margin
            pred = B * step_s * 1.25 + 5 * m  # + batch building and allocator growth
            if ctx.time_left() < pred + 5 * m:
                notes[f"B{B}"] = (f"skipped: one step predicted {pred:.0f} s from B{small}'s "
                                  f"{t_small:.1f} s, {ctx.time_left():.0f} s left")
                continue
            q, d = batches(B, 20)
            fns = step_fns(enc, q, d, chunk)
            t = time.perf_counter()
            peaks[B] = peak(fns["gradcache"])
            took = time.perf_counter() - t
            notes[f"B{B}_step_s"] = round(took, 1)
            notes[f"B{B}_predicted_s"] = round(pred, 1)
            step_s = took / B  # the better estimate for the comparison below
            del q, d, fns
            break
        b = max(peaks)
        if b == small:
            yield {"name": name, "skipped": "; ".join(f"{k} {v}" for k, v in notes.items())}
        else:
            yield {"name": f"peak extra memory B{b} vs B{small}, chunk{chunk}", "ours_ms": float("nan"),
                   "baselines": {}, "floor_ms": None,
                   "extra": {f"peak_MB_B{small}": round(peaks[small] / 2**20, 1),
                             f"peak_MB_B{b}": round(peaks[b] / 2**20, 1),
                             "ratio": round(peaks[b] / max(peaks[small], 1), 4), "target": "<= 1.05",
                             f"B{small}_step_s": round(t_small, 1), **notes,
                             "runs": "one step per size, gradients counted"}}
    # 3) vs sentence-transformers CachedMNRL at the B = 4096, chunk 256: a warm-up and one run each
    #    (FULL: three) when time allows, else one run each right after the memory steps ran the same chunk
    #    shapes (a step is seconds long; first-call costs are tens of ms), else at a smaller B
    B_opts = (8, 4) if ctx.smoke else (4096, 2048, 1024)

    def need_s(B, runs):  # ours + ST (ST's step ~1-1.3x ours in run 2), with margin
        return runs * B * step_s * 2.3 + 5 * m

    plans = [(B_opts[0], dict(warmup=1, reps=3, min_s=0.0) if FULL else one, "3 after a warm-up" if FULL
              else "1 after a warm-up")]
    if warm:
        lab = "1 each, no separate warm-up (the memory steps just ran this chunk's shapes)"
        plans += [(Bc, dict(warmup=0, reps=1, min_s=0.0), lab) for Bc in B_opts]
    else:
        plans += [(Bc, one, "1 after a warm-up") for Bc in B_opts[1:]]
    plan = next(((Bc, r, lab) for Bc, r, lab in plans
                 if ctx.time_left() > need_s(Bc, r["warmup"] + r["reps"])), None)
    if plan is None:
        Bc = B_opts[0]
        yield {"name": f"step B{Bc} chunk{chunk} vs sentence-transformers CachedMNRL",
               "skipped": f"timing budget spent: predicted {need_s(Bc, 1):.0f} s for one run each at "
                          f"B{Bc} ({need_s(B_opts[-1], 1):.0f} s at B{B_opts[-1]}), "
                          f"{ctx.time_left():.0f} s left"}
        return
    B, reps, runs = plan
    q, d = batches(B, 10)
    fns = step_fns(enc, q, d, chunk)
    t_gc = ctx.bench(fns["gradcache"], **reps)
    base, extra = {}, {}
    n_runs = reps["warmup"] + reps["reps"]
    # ST's step is ~1-2x ours: skip it rather than overrun the section's share
    if not callable(fns["st_cached_mnrl"]):
        extra["st"] = fns["st_cached_mnrl"]
    elif ctx.time_left() > 1.3 * n_runs * t_gc / 1e3 + 5 * m:
        base["st_cached_mnrl"] = ctx.bench(fns["st_cached_mnrl"], **reps)
    else:
        extra["st"] = f"skipped: {ctx.time_left():.0f} s left after ours ({n_runs * t_gc / 1e3:.0f} s)"
    yield {"name": f"step B{B} chunk{chunk} vs sentence-transformers CachedMNRL", "ours_ms": t_gc,
           "baselines": base, "floor_ms": None,
           "extra": {"speedup": round(base["st_cached_mnrl"] / t_gc, 3) if base else None, **extra,
                     "runs": runs, "target": ">= 1.5 at B4096"}}
    del q, d, fns
    # 4) mixed lengths (uniform in [16, L], right-padded, as real pairs are): the rows sorted longest first
    #    into chunks (the default) vs the rows in order (sort_by_length=False, sentence-transformers' chunks)
    #    vs sentence-transformers CachedMNRL; one run each after a warm-up, when time is left
    B, Lm, lo = (8, 16, 8) if ctx.smoke else (1024, L, 16)
    need = 3 * 2 * B * step_s * 0.8 + 5 * m  # ~0.55 of the fixed-length tokens: 0.8 with margin
    name = f"step B{B} chunk{chunk}, lengths uniform in [{lo}, {Lm}]: sorted chunks vs in-order vs ST"
    if ctx.time_left() < need:
        yield {"name": name,
               "skipped": f"timing budget: {need:.0f} s predicted, {ctx.time_left():.0f} s left"}
        return
    q, d = random_batch(B, Lm, vocab, dev, 31, min_len=lo), random_batch(B, Lm, vocab, dev, 32, min_len=lo)
    fns = step_fns(enc, q, d, chunk)
    t_gc = ctx.bench(fns["gradcache"], **one)
    base = {"sort_by_length=False": ctx.bench(fns["gradcache_unsorted"], **one)}
    if callable(fns["st_cached_mnrl"]):
        base["st_cached_mnrl"] = ctx.bench(fns["st_cached_mnrl"], **one)
    tokens = int(q["attention_mask"].sum() + d["attention_mask"].sum())
    yield {"name": name, "ours_ms": t_gc, "baselines": base, "floor_ms": None,
           "extra": {"tokens": tokens, "padded_tokens": 2 * B * Lm, "runs": "1 after a warm-up",
                     "speedup_vs_st": round(base["st_cached_mnrl"] / t_gc, 3) if "st_cached_mnrl" in base
                     else None}}


def _profile(ctx, enc, batches, B: int = 128, chunk: int = 64, top: int = 10) -> list[dict]:
    """Kernel time of one cached and one uncached step (after a warm-up), largest kernels first."""
    q, d = batches(B)
    fns = step_fns(enc, q, d, chunk)
    recs = []
    for name in ("gradcache", "uncached"):
        fns[name]()
        total, rows = kernel_times(fns[name], f"grad_cache {name} B{B} chunk{chunk}", top)
        recs.append({"name": f"profile {name} step B{B} chunk{chunk} (kernel time)", "ours_ms": total,
                     "baselines": {}, "floor_ms": None, "extra": {"top": rows}})
    return recs
