"""GPU section: the fused contrastive loss (Triton LSE + gradient-tile kernels, cuBLAS gradient GEMMs).

correctness: loss and gradients (q, d, temperature) against the float64 materialized reference for every
dtype (fp32 with TF32 and with IEEE dots), shapes no tile divides (and odd ones) with hard negatives, plain
and every option at once;
a forward with more than 2^31 candidate elements (64-bit offsets) against the torch backend.
timings: forward + backward and peak extra memory against naive (matmul + F.cross_entropy) and Inf-CL
(when importable) at the issue's sizes, option costs relative to plain InfoNCE, and B = N = 262,144.
Sized to stay within ~90 s on an H100; big cases run only while ctx.time_left() allows.
"""

from __future__ import annotations

import os

import torch
from llmembed_fast.triton_kernels import contrastive as tk

import llmembed_fast as lf
from llmembed_fast.bench.cases_contrastive import fwd_bwd, infcl_loss, make_batch, naive_loss, option_kwargs
from llmembed_fast.ops import contrastive as opc
from llmembed_fast.reference.contrastive import contrastive_loss as ref_loss

from . import contrastive_tuning as tuning
from .envs import env

# relative error (max-abs over max-abs of the reference) allowed per dtype / precision
TOL = {"fp32-ieee": 1e-5, "fp32-tf32": 5e-3, "fp16": 5e-3, "bf16": 3e-2}


def _rel(got, want) -> float:
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check(name, B, N, D, dtype, allow_tf32, kw, dev, seed, default_labels=False):
    gen = torch.Generator().manual_seed(seed)
    q0 = torch.randn(B, D, generator=gen).to(dtype)
    d0 = torch.randn(N, D, generator=gen).to(dtype)
    labels = torch.arange(B) if default_labels else torch.randperm(N, generator=gen)[:B]
    q = q0.to(dev, copy=True).requires_grad_(True)
    d = d0.to(dev, copy=True).requires_grad_(True)
    tau = torch.tensor(0.05, device=dev, requires_grad=True)
    # default labels take the fused symmetric path; explicit ones the separate document->query term
    lab = None if default_labels else labels.to(dev)
    loss = lf.contrastive_loss(q, d, labels=lab, temperature=tau, allow_tf32=allow_tf32, **kw)
    loss.backward()
    q64, d64 = q0.double().requires_grad_(True), d0.double().requires_grad_(True)
    t64 = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    ref = ref_loss(q64, d64, labels=labels, temperature=t64, **kw)
    ref.backward()
    errs = {
        "loss": _rel(loss.detach().cpu(), ref.detach()),
        "dq": _rel(q.grad.cpu(), q64.grad),
        "dd": _rel(d.grad.cpu(), d64.grad),
        "dtau": _rel(tau.grad.cpu(), t64.grad),
    }
    key = (
        "bf16"
        if dtype == torch.bfloat16
        else "fp16"
        if dtype == torch.float16
        else ("fp32-tf32" if allow_tf32 else "fp32-ieee")
    )
    tol = TOL[key]
    err = max(errs.values())
    return {
        "name": f"{name} {key}",
        "ok": err <= tol,
        "err": err,
        "tol": tol,
        "detail": " ".join(f"{k} {v:.1e}" for k, v in errs.items()),
    }


def correctness(ctx) -> list[dict]:
    dev = ctx.device
    out = []
    # multiples of 16 that no tile divides (every load and store masked), so the kernels Triton specializes
    # for them are the ones the timings (B, N, D multiples of 16) run: ~1 s of compiling per variant on the
    # GPU machine's CPU. Odd sizes (and unaligned Matryoshka bounds) have their own checks below.
    B, N, D = (7, 19, 37) if ctx.smoke else (304, 1104, 1008)
    all_opts = dict(
        symmetric=True,
        same_tower=True,
        false_negative_margin=0.1,
        matryoshka_dims=(D // 8, D // 2, D),
        matryoshka_weights=(0.25, 0.5, 1.0),
    )
    dtypes = [(torch.float32, False), (torch.float32, True), (torch.float16, True), (torch.bfloat16, True)]
    for i, (dtype, tf32) in enumerate(dtypes):
        for opt_name, kw in (("plain", {}), ("all options", all_opts)):
            if ctx.time_left() < 15:  # this section's share of the check time (gpu_suite)
                break
            if opt_name != "plain" and (dtype == torch.float16 or tf32):
                continue  # same kernels as fp32-ieee / bf16 with all options; keeps compile time down
            out.append(
                _check(f"contrastive {opt_name} B{B} N{N} D{D}", B, N, D, dtype, tf32, kw, dev, seed=i)
            )
    # symmetric with default labels: the fused path (column LSE in the query->document tiles)
    fused = dict(symmetric=True, false_negative_margin=0.1, matryoshka_dims=(D // 4, D))
    for j, (dtype, tf32) in enumerate(((torch.float32, False), (torch.bfloat16, True))):
        name = f"contrastive fused symmetric B{B} N{N} D{D}"
        out.append(_check(name, B, N, D, dtype, tf32, fused, dev, seed=20 + j, default_labels=True))
    # same_tower with default labels: both self-terms as triangles (perm labels above: the q-q one only)
    tri = dict(same_tower=True, false_negative_margin=0.1)
    for j, (dtype, tf32) in enumerate(((torch.float32, False), (torch.bfloat16, True))):
        for dims in (None, (D // 4, D)):
            if ctx.time_left() < 15:  # this section's share of the check time (gpu_suite)
                break
            name = f"contrastive same_tower triangles dims={dims} B{B} N{N} D{D}"
            kw = dict(tri, matryoshka_dims=dims)
            out.append(_check(name, B, N, D, dtype, tf32, kw, dev, seed=30 + j, default_labels=True))
    # Matryoshka dims whose inner bounds are multiples of 16: the single-loop kernels (the dims above take the
    # per-range loops), alone, with the fused symmetric term and with the triangles
    aligned = (64, 128, 512, D) if not ctx.smoke else (16, D)
    single_cases = (
        ("plain", dict(matryoshka_dims=aligned, false_negative_margin=0.1), False),
        ("fused symmetric", dict(matryoshka_dims=aligned, symmetric=True), True),
        ("same_tower triangles", dict(matryoshka_dims=aligned, same_tower=True), True),
    )
    for j, (dtype, tf32) in enumerate(((torch.float32, False), (torch.bfloat16, True))):
        for case, kw, arange in single_cases:
            if ctx.time_left() < 15:  # this section's share of the check time (gpu_suite)
                break
            name = f"contrastive single-loop dims={aligned} {case} B{B} N{N} D{D}"
            out.append(_check(name, B, N, D, dtype, tf32, kw, dev, seed=40 + j, default_labels=arange))
    # the opt-in cuBLAS-logits mode (LLMEMBED_FAST_CONTRASTIVE_LOGITS=gemm): the same checks
    with env("LLMEMBED_FAST_CONTRASTIVE_LOGITS", "gemm"):
        for j, (dtype, tf32) in enumerate(((torch.float32, False), (torch.bfloat16, True))):
            for opt_name, kw in (("plain", {}), ("all options", all_opts)):
                if ctx.time_left() < 15:  # opt-in mode: checked when time allows
                    break
                name = f"contrastive gemm-logits {opt_name} B{B} N{N} D{D}"
                out.append(_check(name, B, N, D, dtype, tf32, kw, dev, seed=30 + j))
        name = f"contrastive gemm-logits fused symmetric B{B} N{N} D{D}"
        out.append(_check(name, B, N, D, torch.bfloat16, True, fused, dev, seed=33, default_labels=True))
    if not ctx.smoke:  # small B, large-N split forward, odd everything
        out.append(_check("contrastive plain B1 N4099 D8", 1, 4099, 8, torch.bfloat16, True, {}, dev, seed=9))
        sym = dict(symmetric=True)
        out.append(
            _check("contrastive symmetric B65 N65 D384", 65, 65, 384, torch.bfloat16, True, sym, dev, seed=10)
        )
    # 64-bit offsets: N * D > 2^31 elements in the candidates
    if not ctx.smoke and ctx.time_left() > 90:
        B, N, D = 64, (1 << 21) + 3, 1024
        gen = torch.Generator(device=dev).manual_seed(5)
        q = torch.randn(B, D, device=dev, generator=gen, dtype=torch.bfloat16)
        d = torch.randn(N, D, device=dev, generator=gen, dtype=torch.bfloat16)
        labels = torch.randint(0, N, (B,), device=dev, generator=gen)
        with torch.no_grad():
            got = lf.contrastive_loss(q, d, labels=labels)
            with env("LLMEMBED_FAST_BACKEND", "torch"):
                want = lf.contrastive_loss(q, d, labels=labels)
        e = abs(got.item() - want.item()) / abs(want.item())
        out.append(
            {
                "name": f"contrastive fwd B{B} N{N} D{D} bf16 (int64 offsets)",
                "ok": e <= 1e-3,
                "err": e,
                "tol": 1e-3,
                "detail": f"ours {got.item():.6f} torch backend {want.item():.6f}",
            }
        )
        del q, d
        torch.cuda.empty_cache()
    return out


def _time_once_ms(fn) -> float:
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def _with_logits(mode: str, fn):
    """fn run with LLMEMBED_FAST_CONTRASTIVE_LOGITS=mode."""

    def run():
        with env("LLMEMBED_FAST_CONTRASTIVE_LOGITS", mode):
            fn()

    return run


def timings(ctx) -> list[dict]:
    dev = ctx.device
    recs = []
    # tuning data first (profile, tile configs, gradient-tile budget), then the figures
    if ctx.smoke:
        recs += tuning.sweep(ctx, 64, 32, configs=tuning.CONFIGS[:2])
        recs += tuning.budget_sweep(ctx, 64, 32)
    elif dev.type == "cuda":
        recs += tuning.profile(ctx, 65536, 1024)
        recs += tuning.profile(ctx, 65536, 1024, option="matryoshka5")  # 6x plain on the H200: why
        recs += tuning.profile(ctx, 65536, 1024, option="same_tower")
        if os.environ.get("LLMEMBED_FAST_SUITE_TUNING", "1") != "0":  # the sweeps take a minute or two
            recs += tuning.sweep(ctx, 65536, 1024)
            recs += tuning.budget_sweep(ctx, 65536, 1024)
            recs += tuning.sweep(ctx, 32768, 4096, configs=tuning.CONFIGS[:5])
    if ctx.smoke:
        sizes = [(64, 64, 32)]
    else:
        sizes = [(65536, 65536, 1024), (32768, 32768, 4096)]
    infcl = infcl_loss() if dev.type == "cuda" else "skipped: no CUDA"
    quick = dict(warmup=1, reps=3, min_s=0.0) if not ctx.smoke else {}
    for B, N, D in sizes:
        if ctx.time_left() < 25:
            break
        q, d = make_batch(B, N, D, torch.bfloat16, dev)
        ours = fwd_bwd(lf.contrastive_loss, q, d)
        t_ours = ctx.bench(ours, **quick)
        extra = {"peak_extra_MB": round(ctx.peak_extra_bytes(ours) / 2**20, 1)}
        base = {}
        # the opt-in cuBLAS-logits mode, side by side (same inputs; its checks run in correctness())
        gemm = _with_logits("gemm", ours)
        base["ours, gemm logits"] = ctx.bench(gemm, **quick)
        extra["gemm_peak_extra_MB"] = round(ctx.peak_extra_bytes(gemm) / 2**20, 1)
        naive = fwd_bwd(naive_loss, q, d)
        try:
            base["naive matmul+CE"] = ctx.bench(naive, **quick)
            extra["naive_peak_extra_MB"] = round(ctx.peak_extra_bytes(naive) / 2**20, 1)
        except torch.OutOfMemoryError:
            extra["naive"] = "out of memory"
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        if callable(infcl) and ctx.time_left() > 40:
            f = fwd_bwd(infcl, q, d)
            try:
                with torch.no_grad():  # same loss value, or the timing compares different work
                    extra["infcl_minus_ours"] = float(infcl(q, d) - lf.contrastive_loss(q, d))
                base["inf-cl"] = ctx.bench(f, warmup=1, reps=2, min_s=0.0) if not ctx.smoke else ctx.bench(f)
                extra["infcl_peak_extra_MB"] = round(ctx.peak_extra_bytes(f) / 2**20, 1)
            except Exception as exc:  # an API or build mismatch is reported, not fatal
                extra["inf-cl"] = f"{type(exc).__name__}: {exc}"[:120]
        elif not callable(infcl):
            extra["inf-cl"] = infcl
        floor = 6 * B * N * D / ctx.matmul_flops * 1e3
        recs.append(
            {
                "name": f"fwd+bwd plain B=N={B} D{D} bf16",
                "ours_ms": t_ours,
                "baselines": base,
                "floor_ms": floor,
                "extra": extra,
            }
        )
        # option costs relative to plain (at the first size only)
        if (B, N, D) == sizes[0]:
            for opt in ("symmetric", "same_tower", "matryoshka5", "fn_margin"):
                if ctx.time_left() < 20:
                    break
                kw = option_kwargs(opt, D)
                t = ctx.bench(fwd_bwd(lf.contrastive_loss, q, d, **kw), **quick)
                t_g = ctx.bench(_with_logits("gemm", fwd_bwd(lf.contrastive_loss, q, d, **kw)), **quick)
                more = {}
                # the new default path against the previous one, side by side: one loop per Matryoshka
                # range instead of one over D; the same-tower terms as full squares instead of triangles
                old = {"matryoshka5": (tk, "MATRYOSHKA_SINGLE_LOOP", "per_range_loops"),
                       "same_tower": (opc, "SELF_TERM_TRIANGLES", "full_squares")}.get(opt)  # fmt: skip
                if old is not None:
                    module, switch, label = old
                    setattr(module, switch, False)
                    try:
                        t_old = ctx.bench(fwd_bwd(lf.contrastive_loss, q, d, **kw), **quick)
                    finally:
                        setattr(module, switch, True)
                    more[f"{label}_ms"] = round(t_old, 3)
                    more[f"{label}_cost_vs_plain"] = round(t_old / t_ours, 3)
                recs.append(
                    {
                        "name": f"fwd+bwd {opt} B=N={B} D{D} bf16",
                        "ours_ms": t,
                        "baselines": {"ours plain": t_ours},
                        "floor_ms": None,
                        "extra": {
                            "cost_vs_plain": round(t / t_ours, 3),
                            "gemm_logits_ms": round(t_g, 3),
                            "gemm_cost_vs_gemm_plain": round(t_g / base["ours, gemm logits"], 3),
                            "options": str(kw),
                            **more,
                        },
                    }
                )
            # forward alone (no grad): the flash-style LSE pass
            with torch.no_grad():
                t_f = ctx.bench(lambda q=q, d=d: lf.contrastive_loss(q, d), **quick)
                t_nf = ctx.bench(lambda q=q, d=d: naive_loss(q, d), **quick)
            recs.append(
                {
                    "name": f"fwd only B=N={B} D{D} bf16",
                    "ours_ms": t_f,
                    "baselines": {"naive": t_nf},
                    "floor_ms": 2 * B * N * D / ctx.matmul_flops * 1e3,
                    "extra": {},
                }
            )
        del q, d, ours, naive
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # the largest batch: one run, time and memory
    if not ctx.smoke and dev.type == "cuda" and ctx.time_left() > 30:
        B = N = 262144
        D = 1024
        q, d = make_batch(B, N, D, torch.bfloat16, dev)
        fn = fwd_bwd(lf.contrastive_loss, q, d)
        fn()  # warm-up (compiles nothing new, sizes the allocator)
        t = _time_once_ms(fn)
        peak = ctx.peak_extra_bytes(fn)
        recs.append(
            {
                "name": f"fwd+bwd plain B=N={B} D{D} bf16 (one run)",
                "ours_ms": t,
                "baselines": {},
                "floor_ms": 6 * B * N * D / ctx.matmul_flops * 1e3,
                "extra": {"peak_extra_MB": round(peak / 2**20, 1)},
            }
        )
        del q, d
        torch.cuda.empty_cache()
    return recs
