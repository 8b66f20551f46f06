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


def correctness(ctx):
    dev = ctx.device
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
    fused = dict(symmetric=True, false_negative_margin=0.1, matryoshka_dims=(D // 4, D))
    tri = dict(same_tower=True, false_negative_margin=0.1)
    aligned = (64, 128, 512, D) if not ctx.smoke else (16, D)
    fp32, bf16 = (torch.float32, False), (torch.bfloat16, True)
    # (name, B, N, D, (dtype, tf32), options, seed, default labels, logits mode): the paths no GPU run has
    # checked yet come first (triangles, the single Matryoshka loop, the cuBLAS-logits mode), so a short
    # budget drops the long-checked ones instead
    cases = []
    for j, dt in enumerate((bf16, fp32)):
        for dims in (None, (D // 4, D)):  # same_tower, default labels: both self-terms as triangles
            name = f"same_tower triangles dims={dims}"
            cases.append((name, B, N, D, dt, dict(tri, matryoshka_dims=dims), 30 + j, True, None))
        for case, kw, arange in (  # inner bounds that are multiples of 16: the single-loop kernels
            ("plain", dict(matryoshka_dims=aligned, false_negative_margin=0.1), False),
            ("fused symmetric", dict(matryoshka_dims=aligned, symmetric=True), True),
            ("same_tower triangles", dict(matryoshka_dims=aligned, same_tower=True), True),
        ):
            cases.append((f"single-loop dims={aligned} {case}", B, N, D, dt, kw, 40 + j, arange, None))
        for opt_name, kw in (("plain", {}), ("all options", all_opts)):  # the opt-in cuBLAS-logits mode
            cases.append((f"gemm-logits {opt_name}", B, N, D, dt, kw, 30 + j, False, "gemm"))
    cases.append(("gemm-logits fused symmetric", B, N, D, bf16, fused, 33, True, "gemm"))
    for i, dt in enumerate([fp32, (torch.float32, True), (torch.float16, True), bf16]):
        for opt_name, kw in (("plain", {}), ("all options", all_opts)):
            if opt_name != "plain" and (dt[0] == torch.float16 or dt[1]):
                continue  # same kernels as fp32-ieee / bf16 with all options; keeps compile time down
            cases.append((opt_name, B, N, D, dt, kw, i, False, None))
    for j, dt in enumerate((fp32, bf16)):  # symmetric with default labels: the fused column term
        cases.append(("fused symmetric", B, N, D, dt, fused, 20 + j, True, None))
    if not ctx.smoke:  # small B, large-N split forward, odd everything
        cases.append(("plain", 1, 4099, 8, bf16, {}, 9, False, None))
        cases.append(("symmetric", 65, 65, 384, bf16, dict(symmetric=True), 10, False, None))
    for name, b, n, dd, (dtype, tf32), kw, seed, arange, logits in cases:
        full = f"contrastive {name} B{b} N{n} D{dd}"
        if ctx.time_left() < 15:  # this section's share of the check time (gpu_suite)
            yield {"name": full, "skipped": "check budget spent"}
            continue
        with env("LLMEMBED_FAST_CONTRASTIVE_LOGITS", logits):
            yield _check(full, b, n, dd, dtype, tf32, kw, dev, seed=seed, default_labels=arange)
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
        yield {
            "name": f"contrastive fwd B{B} N{N} D{D} bf16 (int64 offsets)",
            "ok": e <= 1e-3,
            "err": e,
            "tol": 1e-3,
            "detail": f"ours {got.item():.6f} torch backend {want.item():.6f}",
        }
        del q, d
        torch.cuda.empty_cache()
    elif not ctx.smoke:
        yield {"name": "contrastive fwd (int64 offsets)", "skipped": "needs 90 s of check budget"}


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


def _peak_mb(ctx, fn, q, d) -> float:
    """Peak memory of fn above what is allocated before it, the gradients of q and d included (they are
    freed first: the previous run's would otherwise sit in the base and leave them out)."""
    q.grad = d.grad = None
    return round(ctx.peak_extra_bytes(fn) / 2**20, 1)


def _case(name, fn):
    """fn's records, or one record of the exception (OOM, a compile failure) so the next case still runs."""
    try:
        yield from fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table, the suite goes on
        yield {"name": name, "skipped": f"{type(exc).__name__}: {exc}"[:200]}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def timings(ctx):
    dev = ctx.device
    # tile and budget sweeps, profiles: tuning data, recorded in RESULTS.md and shipped; only on request
    if ctx.smoke:
        yield from tuning.sweep(ctx, 64, 32, configs=tuning.CONFIGS[:2])
        yield from tuning.budget_sweep(ctx, 64, 32)
    elif dev.type == "cuda" and os.environ.get("LLMEMBED_FAST_SUITE_TUNING", "0") == "1":
        yield from tuning.profile(ctx, 65536, 1024)
        yield from tuning.profile(ctx, 65536, 1024, option="matryoshka5")
        yield from tuning.profile(ctx, 65536, 1024, option="same_tower")
        yield from tuning.sweep(ctx, 65536, 1024)
        yield from tuning.budget_sweep(ctx, 65536, 1024)
        yield from tuning.sweep(ctx, 32768, 4096, configs=tuning.CONFIGS[:5])
    sizes = [(64, 64, 32)] if ctx.smoke else [(65536, 65536, 1024), (32768, 32768, 4096)]
    quick = dict(warmup=1, reps=3, min_s=0.0) if not ctx.smoke else {}
    plain_ms = {}

    def size_case(B, N, D):
        """ours (Triton logits, cuBLAS logits) against naive; at the first size the option costs."""
        q, d = make_batch(B, N, D, torch.bfloat16, dev)
        ours = fwd_bwd(lf.contrastive_loss, q, d)
        t_ours = ctx.bench(ours, **quick)
        plain_ms[(B, N, D)] = t_ours
        extra = {"peak_extra_MB": _peak_mb(ctx, ours, q, d), "peak_includes": "dq, dd"}
        base = {}
        gemm = _with_logits("gemm", ours)  # the opt-in cuBLAS-logits mode, same inputs
        base["ours, gemm logits"] = ctx.bench(gemm, **quick)
        extra["gemm_peak_extra_MB"] = _peak_mb(ctx, gemm, q, d)
        naive = fwd_bwd(naive_loss, q, d)
        try:
            base["naive matmul+CE"] = ctx.bench(naive, **quick)
            extra["naive_peak_extra_MB"] = _peak_mb(ctx, naive, q, d)
        except torch.OutOfMemoryError:
            extra["naive"] = "out of memory"
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        yield {
            "name": f"fwd+bwd plain B=N={B} D{D} bf16",
            "ours_ms": t_ours,
            "baselines": base,
            "floor_ms": 6 * B * N * D / ctx.matmul_flops * 1e3,
            "extra": extra,
        }
        if (B, N, D) != sizes[0]:
            return
        # option costs relative to plain, each in both logits modes; the new default path against the
        # previous one, side by side: one loop over D for the Matryoshka ranges instead of one per range;
        # the same-tower terms as triangles instead of full squares
        for opt in ("same_tower", "matryoshka5", "symmetric", "fn_margin"):
            if ctx.time_left() < 20:
                yield {"name": f"fwd+bwd {opt} B=N={B} D{D} bf16", "skipped": "timing budget spent"}
                continue
            kw = option_kwargs(opt, D)
            t = ctx.bench(fwd_bwd(lf.contrastive_loss, q, d, **kw), **quick)
            t_g = ctx.bench(_with_logits("gemm", fwd_bwd(lf.contrastive_loss, q, d, **kw)), **quick)
            more = {}
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
            yield {
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
        with torch.no_grad():  # forward alone: the flash-style LSE pass
            t_f = ctx.bench(lambda: lf.contrastive_loss(q, d), **quick)
            t_nf = ctx.bench(lambda: naive_loss(q, d), **quick)
        yield {
            "name": f"fwd only B=N={B} D{D} bf16",
            "ours_ms": t_f,
            "baselines": {"naive": t_nf},
            "floor_ms": 2 * B * N * D / ctx.matmul_flops * 1e3,
            "extra": {},
        }

    for B, N, D in sizes:
        if ctx.time_left() < 25:
            yield {"name": f"fwd+bwd B=N={B} D{D} bf16", "skipped": "timing budget spent"}
            continue
        yield from _case(f"fwd+bwd B=N={B} D{D} bf16", lambda B=B, N=N, D=D: size_case(B, N, D))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # Inf-CL after the figures that were never measured (it was: 13.5x slower at 65,536 on the H200)
    infcl = infcl_loss() if dev.type == "cuda" else "skipped: no CUDA"

    def infcl_case(B, N, D):
        q, d = make_batch(B, N, D, torch.bfloat16, dev)
        f = fwd_bwd(infcl, q, d)
        with torch.no_grad():  # same loss value, or the timing compares different work
            diff = float(infcl(q, d) - lf.contrastive_loss(q, d))
        t = ctx.bench(f, warmup=1, reps=2, min_s=0.0) if not ctx.smoke else ctx.bench(f)
        ours = plain_ms.get((B, N, D))
        yield {
            "name": f"Inf-CL fwd+bwd B=N={B} D{D} bf16",
            "ours_ms": ours if ours is not None else float("nan"),
            "baselines": {"inf-cl": t},
            "floor_ms": None,
            "extra": {"infcl_minus_ours": diff, "infcl_peak_extra_MB": _peak_mb(ctx, f, q, d)},
        }

    for B, N, D in sizes:
        name = f"Inf-CL fwd+bwd B=N={B} D{D} bf16"
        if not callable(infcl):
            yield {"name": name, "skipped": str(infcl)}
        elif ctx.time_left() < 40:
            yield {"name": name, "skipped": "timing budget spent"}
        else:
            yield from _case(name, lambda B=B, N=N, D=D: infcl_case(B, N, D))
    # the largest batch: one run, time and memory
    if not ctx.smoke and dev.type == "cuda":
        B = N = 262144
        D = 1024
        if ctx.time_left() < 30:
            yield {"name": f"fwd+bwd plain B=N={B} D{D} bf16 (one run)", "skipped": "timing budget spent"}
            return

        def largest():
            q, d = make_batch(B, N, D, torch.bfloat16, dev)
            fn = fwd_bwd(lf.contrastive_loss, q, d)
            fn()  # warm-up (compiles nothing new, sizes the allocator)
            t = _time_once_ms(fn)
            yield {
                "name": f"fwd+bwd plain B=N={B} D{D} bf16 (one run)",
                "ours_ms": t,
                "baselines": {},
                "floor_ms": 6 * B * N * D / ctx.matmul_flops * 1e3,
                "extra": {"peak_extra_MB": _peak_mb(ctx, fn, q, d), "peak_includes": "dq, dd"},
            }

        yield from _case(f"fwd+bwd plain B=N={B} D{D} bf16 (one run)", largest)
