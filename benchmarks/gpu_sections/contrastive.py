"""GPU section: the fused contrastive loss (Triton LSE + gradient-tile kernels, cuBLAS gradient GEMMs).

correctness: loss and gradients (q, d, temperature) against the float64 materialized reference for every
dtype (fp32 with TF32 and with IEEE dots), shapes no tile divides (and odd ones) with hard negatives, plain
and every option at once; the variants behind the headline timings (plain and fused symmetric, bf16, one
dim) among the first, so a short budget cannot drop them, and right after them per-query losses and
gradients with more than 2^31 candidate elements (64-bit offsets, positives past 2^31 elements) against the
torch backend.
timings: forward + backward and peak extra memory against naive (matmul + F.cross_entropy), eager and
torch.compile'd (dynamic=False), at the issue's first size, then option costs relative to plain InfoNCE
there, then the second size, the forward alone (with both naive baselines), Inf-CL (when importable), and
B = N = 262,144.
Sized to stay within ~100 s on an H100 (each torch.compile of a new shape takes ~20-40 s of it); big cases
and compiles run only while ctx.time_left() allows, else they are recorded as skipped with the reason.
"""

from __future__ import annotations

import os
import time

import torch
from llmembed_fast.triton_kernels import contrastive as tk

import llmembed_fast as lf
from llmembed_fast import _matmul
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


def _margin_clear_of_ties(q0, d0, labels, kw, gap: float = 2e-6) -> float:
    """A false-negative margin within 0.01 of kw's whose thresholds s_pos(i) + margin are no closer than
    ``gap`` to any similarity in query i's rows (its own and its positive's, against every query and document,
    at every Matryoshka dim): a pair at the threshold flips between float32 and the float64 reference (a
    measure-zero discontinuity, but ~1 in 10^6 pairs is within float32 rounding of it), moving one document's
    gradient by ~10% of its size, and a check of ~10^6 pairs would fail on it by chance."""
    base = kw["false_negative_margin"]
    gaps = []
    for dim in kw.get("matryoshka_dims") or (q0.shape[1],):
        qn = torch.nn.functional.normalize(q0[:, :dim].double(), dim=1)
        dn = torch.nn.functional.normalize(d0[:, :dim].double(), dim=1)
        every = torch.cat([qn, dn])
        pos = (qn * dn[labels]).sum(1, keepdim=True)
        gaps.append(torch.cat([qn @ every.T, dn[labels] @ every.T], 1) - pos)
    g = torch.cat(gaps, 1).flatten()
    for k in range(100):
        m = base + (k // 2 + 1) * 1e-4 * (1 if k % 2 else -1) if k else base
        if (g - m).abs().min().item() > gap:
            return m
    return base


def _check(name, B, N, D, dtype, allow_tf32, kw, dev, seed, default_labels=False):
    gen = torch.Generator().manual_seed(seed)
    q0 = torch.randn(B, D, generator=gen).to(dtype)
    d0 = torch.randn(N, D, generator=gen).to(dtype)
    labels = torch.arange(B) if default_labels else torch.randperm(N, generator=gen)[:B]
    if kw.get("false_negative_margin") is not None:
        kw = dict(kw, false_negative_margin=_margin_clear_of_ties(q0, d0, labels, kw))
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
    # the rows that are no query's positive on their own scale: dd's max is a positive's, so under dd's
    # bf16 tolerance those rows' gradients could be zero or doubled and pass
    neg = torch.ones(N, dtype=torch.bool)
    neg[labels] = False
    if neg.any():
        errs["dd_neg"] = _rel(d.grad.cpu()[neg], d64.grad[neg])
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
    # every never-run path in bf16 (the timed dtype) before any fp32 repeat, so the budget reaches the
    # logits modes the timings run
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
        # the opt-in cuBLAS-logits mode, and the plain term's logits kept from forward to backward
        for opt_name, kw in (("plain", {}), ("all options", all_opts)):
            if not (opt_name == "plain" and dt == bf16):  # that one runs with the headline variants
                cases.append((f"gemm-logits {opt_name}", B, N, D, dt, kw, 30 + j, False, "gemm"))
        for opt_name, kw, arange in (("plain", {}, False), ("fused symmetric", fused, True),
                                     ("all options", all_opts, False)):
            if not (opt_name == "plain" and dt == bf16):
                cases.append((f"keep-logits {opt_name}", B, N, D, dt, kw, 50 + j, arange, "keep"))
        if dt == bf16:
            cases.append(("gemm-logits fused symmetric", B, N, D, bf16, fused, 33, True, "gemm"))
    # right after the first triangles check: the variants behind the headline timings (bf16, one dim),
    # so a short budget cannot drop them: plain (explicit labels run the same kernels as the default ones)
    # and symmetric with default labels (the fused column term)
    cases[1:1] = [
        ("plain", B, N, D, bf16, {}, 3, False, None),
        ("fused symmetric one-dim", B, N, D, bf16, dict(symmetric=True), 22, True, None),
        # the logits modes the size timings run (plain, bf16), before the 64-bit-offsets check's ~35 s
        ("gemm-logits plain", B, N, D, bf16, {}, 30, False, "gemm"),
        ("keep-logits plain", B, N, D, bf16, {}, 50, False, "keep"),
    ]
    for i, dt in enumerate([fp32, (torch.float32, True), (torch.float16, True), bf16]):
        for opt_name, kw in (("plain", {}), ("all options", all_opts)):
            if opt_name != "plain" and (dt[0] == torch.float16 or dt[1]):
                continue  # same kernels as fp32-ieee / bf16 with all options; keeps compile time down
            if opt_name == "plain" and dt == bf16:
                continue  # checked first (above)
            cases.append((opt_name, B, N, D, dt, kw, i, False, None))
    for j, dt in enumerate((fp32, bf16)):  # the fused column term with a margin and two dims
        cases.append(("fused symmetric", B, N, D, dt, fused, 20 + j, True, None))
    if not ctx.smoke:  # small B, large-N split forward, odd everything
        cases.append(("plain", 1, 4099, 8, bf16, {}, 9, False, None))
        cases.append(("symmetric", 65, 65, 384, bf16, dict(symmetric=True), 10, False, None))
    for i, (name, b, n, dd, (dtype, tf32), kw, seed, arange, logits) in enumerate(cases):
        if i == 5:  # after the first triangles check, the two headline variants and the two logits modes
            yield from _offsets_or_skip(ctx, dev)
        full = f"contrastive {name} B{b} N{n} D{dd}"
        if ctx.time_left() < 15:  # this section's share of the check time (gpu_suite)
            yield {"name": full, "skipped": "check budget spent"}
            continue
        try:  # one variant's failure (a compile error on this GPU) is its record; the other checks go on
            with env("LLMEMBED_FAST_CONTRASTIVE_LOGITS", logits):
                rec = _check(full, b, n, dd, dtype, tf32, kw, dev, seed=seed, default_labels=arange)
        except torch.OutOfMemoryError as exc:
            rec = {"name": full, "skipped": f"out of memory: {exc}"[:200]}
        except Exception as exc:  # noqa: BLE001
            rec = {"name": full, "ok": False, "err": float("inf"), "tol": 0.0,
                   "detail": f"{type(exc).__name__}: {exc}"[:300]}
        yield rec


# Check seconds the 64-bit-offsets check needs (estimated, not measured): a 4 GiB randn, one forward and
# backward per backend (~1e12 FLOPs each: milliseconds), the Triton kernels' compiles for this shape (N not
# a multiple of 16: a few seconds each), copies of a few rows back: tens of seconds at most. It used to run
# after every other check under a 90 s guard, which the checks' share (~66 s with run_gpu_suite.sh's
# defaults, 3/5 of 120 s less the ceilings) could never meet: it never ran.
_OFFSETS_NEED_S = 35.0


def _offsets_or_skip(ctx, dev):
    """64-bit offsets: N * D > 2^31 elements in the candidates (d is 4 GiB; the gradients' float32
    accumulators and the torch backend's float32 copy of d: ~30 GB at the peak, estimated). An exception
    is recorded (out of memory: skipped; anything else: a failed check), so the checks after it still run
    now that it no longer comes last."""
    name = "contrastive fwd+bwd (int64 offsets)"
    if not ctx.smoke and ctx.time_left() <= _OFFSETS_NEED_S:
        yield {"name": name,
               "skipped": f"needs {_OFFSETS_NEED_S:.0f} s of check budget, {ctx.time_left():.0f} s left"}
        return
    try:
        if ctx.smoke:  # the check's plumbing at a tiny size (no row past 2^31 elements there)
            yield from _offsets_check(dev, 8, 67, 32, far_start=67 - 9, label="(offsets check, smoke size)")
        else:
            D = 1024
            far = -(-(1 << 31) // D)  # the first row past 2^31 elements
            yield from _offsets_check(dev, 64, (1 << 21) + 61, D, far_start=far, label="(int64 offsets)")
    except torch.OutOfMemoryError as exc:
        yield {"name": name, "skipped": f"out of memory: {exc}"[:200]}
    except Exception as exc:  # noqa: BLE001 - a failed check; the other checks go on
        yield {"name": name, "ok": False, "err": float("inf"), "tol": 0.0,
               "detail": f"{type(exc).__name__}: {exc}"[:300]}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _offsets_check(dev, B, N, D, far_start, label):
    """Loss per query (reduction="none") and gradients, Triton against the torch backend, with the positives
    of the first queries at rows >= far_start (past 2^31 elements at the GPU size) and correlated with their
    queries: a wrong offset there moves those queries' losses by O(1) (their positive term and most of their
    log-sum-exp) and the far rows' gradients entirely. Two records: the losses (float32 both, from the same
    bf16 inputs: tol 1e-3) and dq of those queries with dd of the rows past far_start (bf16: TOL["bf16"])."""
    k = min(8, B // 2, N - far_start)
    gen = torch.Generator(device=dev).manual_seed(5)
    q = torch.randn(B, D, device=dev, generator=gen, dtype=torch.bfloat16)
    d = torch.randn(N, D, device=dev, generator=gen, dtype=torch.bfloat16)
    labels = torch.randint(0, far_start, (B,), device=dev, generator=gen)
    labels[:k] = torch.linspace(far_start, N - 1, k, device=dev).round().long()
    far = labels[:k]
    d[far] = (0.6 * q[:k].float() + 0.8 * d[far].float()).to(d.dtype)
    q.requires_grad_(True)
    d.requires_grad_(True)
    res = {}
    for backend in ("triton", "torch"):
        with env("LLMEMBED_FAST_BACKEND", backend):
            rows = lf.contrastive_loss(q, d, labels=labels, reduction="none")
            rows.mean().backward()
        res[backend] = (rows.detach().cpu(), q.grad[:k].cpu(), d.grad[far_start:].cpu())
        q.grad = d.grad = None
        del rows
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    (rows, dq, dd), (rows_t, dq_t, dd_t) = res["triton"], res["torch"]
    e_all, e_far = _rel(rows, rows_t.double()), _rel(rows[:k], rows_t[:k].double())
    e_loss = max(e_all, e_far)
    yield {
        "name": f"contrastive fwd B{B} N{N} D{D} bf16 {label}",
        "ok": e_loss <= 1e-3,
        "err": e_loss,
        "tol": 1e-3,
        "detail": f"per-query losses: all {e_all:.1e}, the {k} with positives at rows >= {far_start} "
        f"{e_far:.1e} (ours {[round(x, 4) for x in rows[:k].tolist()]}, "
        f"torch backend {[round(x, 4) for x in rows_t[:k].tolist()]})",
    }
    e_dq, e_dd = _rel(dq, dq_t.double()), _rel(dd, dd_t.double())
    neg = torch.ones(N - far_start, dtype=torch.bool)  # the far rows that are no query's positive
    neg[(labels[labels >= far_start] - far_start).cpu()] = False
    e_neg = _rel(dd[neg], dd_t[neg].double()) if neg.any() else 0.0
    tol = TOL["bf16"]
    yield {
        "name": f"contrastive bwd B{B} N{N} D{D} bf16 {label}",
        "ok": max(e_dq, e_dd, e_neg) <= tol,
        "err": max(e_dq, e_dd, e_neg),
        "tol": tol,
        "detail": f"dq of those {k} queries {e_dq:.1e}, dd of the {N - far_start} rows >= {far_start} "
        f"{e_dd:.1e} (of the {int(neg.sum())} that are no positive: {e_neg:.1e})",
    }
    del q, d, res
    if dev.type == "cuda":
        torch.cuda.empty_cache()


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


# Seconds a torch.compile'd baseline needs before it starts: compiling a new shape takes ~20-40 s on the GPU
# machine (forward + backward; the forward alone, without autograd, less), then two warm-up calls, the
# timing and the peak. In smoke runs (CPU, backend aot_eager) a few seconds.
_COMPILE_NEED_S = {"fwd+bwd": 45.0, "fwd": 30.0, "smoke": 5.0}


def _compiled_baseline(ctx, base, extra, q, d, quick, grad, need_s):
    """torch.compile(naive_loss, dynamic=False) on the same inputs (bf16, temperature 0.05, normalized, as
    the eager naive case): forward + backward (grad) or the forward alone (called under no_grad). Two warm-up
    calls (the first compiles: its time is recorded), then ctx.bench and the peak extra memory as naive's.
    Adds base["torch.compile naive"] and extra["compiled_*"]; returns None, or why it was left out (budget,
    a compile failure, out of memory): the caller records that as a skipped record, the section goes on.
    Smoke runs (CPU) compile with backend="aot_eager" (dynamo + AOT autograd, no code generation: inductor's
    C++ build takes ~10 s there)."""
    if ctx.time_left() < need_s:
        why = f"needs ~{need_s:.0f} s (compiling a new shape), {max(0.0, ctx.time_left()):.0f} s left"
        extra["compiled"] = "skipped: budget"
        return why
    backend = "aot_eager" if ctx.smoke else "inductor"
    comp = torch.compile(naive_loss, dynamic=False, backend=backend)
    value = {}

    def run():
        q.grad = d.grad = None
        loss = comp(q, d)
        if grad:
            loss.backward()
        value["loss"] = loss

    try:
        if q.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()  # compiles
        if q.is_cuda:
            torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        run()
        with torch.no_grad():  # same loss value as ours, or the timing compares different work
            diff = float(value.pop("loss").detach() - lf.contrastive_loss(q, d))
        ms = ctx.bench(run, **quick)
        peak = _peak_mb(ctx, run, q, d)
    except Exception as exc:  # noqa: BLE001 - a compile failure or an OOM is a result, not a crash
        value.clear()
        q.grad = d.grad = None
        if q.is_cuda:
            torch.cuda.empty_cache()
        oom = isinstance(exc, torch.OutOfMemoryError)
        extra["compiled"] = "skipped: out of memory" if oom else "skipped: error"
        return f"{type(exc).__name__}: {exc}"[:200]
    value.clear()
    q.grad = d.grad = None
    base["torch.compile naive"] = ms
    extra["compiled_peak_extra_MB"] = peak
    extra["compiled_compile_s"] = round(compile_s, 1)
    extra["compiled_minus_ours"] = f"{diff:.1e}"
    if backend != "inductor":
        extra["compiled_backend"] = backend
    return None


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
    plain_ms, gemm_ms = {}, {}
    # torch.compile(naive_loss) of its own per size and grad mode (each is a new graph to compile anyway)
    need = _COMPILE_NEED_S["smoke" if ctx.smoke else "fwd+bwd"]

    def size_case(B, N, D):
        """ours (Triton logits, cuBLAS logits) against naive, eager and torch.compile'd."""
        q, d = make_batch(B, N, D, torch.bfloat16, dev)
        ours = fwd_bwd(lf.contrastive_loss, q, d)
        t_ours = ctx.bench(ours, **quick)
        plain_ms[(B, N, D)] = t_ours
        extra = {"peak_extra_MB": _peak_mb(ctx, ours, q, d), "peak_includes": "dq, dd"}
        base = {}
        gemm = _with_logits("gemm", ours)  # the opt-in cuBLAS-logits mode, same inputs
        base["ours, gemm logits"] = gemm_ms[(B, N, D)] = ctx.bench(gemm, **quick)
        extra["gemm_peak_extra_MB"] = _peak_mb(ctx, gemm, q, d)
        # the opt-in kept-logits mode: three GEMMs instead of four where the float32 logits fit its budget
        # (8 GiB: kept at 32,768^2, not at 65,536^2, where it runs as the gemm mode)
        keep = _with_logits("keep", ours)
        base["ours, kept logits"] = ctx.bench(keep, **quick)
        extra["keep_peak_extra_MB"] = _peak_mb(ctx, keep, q, d)
        extra["keep_kept"] = B * N * 4 <= tk.KEEP_BUDGET_BYTES  # False: it ran as the gemm mode
        naive = fwd_bwd(naive_loss, q, d)
        try:
            base["naive matmul+CE"] = ctx.bench(naive, **quick)
            extra["naive_peak_extra_MB"] = _peak_mb(ctx, naive, q, d)
        except torch.OutOfMemoryError:
            extra["naive"] = "out of memory"
            q.grad = d.grad = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        why = _compiled_baseline(ctx, base, extra, q, d, quick, grad=True, need_s=need)
        # which cuBLAS paths the gradient GEMMs took so far (one addmm with out_dtype, or pieces + adds)
        extra["matmul_paths_so_far"] = dict(_matmul.PATHS)
        yield {
            "name": f"fwd+bwd plain B=N={B} D{D} bf16",
            "ours_ms": t_ours,
            "baselines": base,
            "floor_ms": 6 * B * N * D / ctx.matmul_flops * 1e3,
            "extra": extra,
        }
        if why:
            yield {"name": f"torch.compile naive fwd+bwd B=N={B} D{D} bf16", "skipped": why}

    def options_case(B, N, D):
        """At the first size, right after its own case and before the second size: the option costs (the
        single-loop Matryoshka and same_tower triangles, never timed on a GPU, with their old paths). After
        both sizes, as before, two cold inductor compiles could leave them under their 20 s guard."""
        q, d = make_batch(B, N, D, torch.bfloat16, dev)
        t_ours = plain_ms.get((B, N, D))
        if t_ours is None:  # the size's own case did not run
            t_ours = plain_ms[(B, N, D)] = ctx.bench(fwd_bwd(lf.contrastive_loss, q, d), **quick)
        t_gemm_plain = gemm_ms.get((B, N, D))
        # option costs relative to plain, each in both logits modes; the new default path against the
        # previous one, side by side: one loop over D for the Matryoshka ranges instead of one per range;
        # the same-tower terms as triangles instead of full squares
        for opt in ("same_tower", "matryoshka5", "symmetric", "fn_margin"):
            if ctx.time_left() < 20:
                yield {"name": f"fwd+bwd {opt} B=N={B} D{D} bf16", "skipped": "timing budget spent"}
                continue
            if t_gemm_plain is None:
                t_gemm_plain = ctx.bench(_with_logits("gemm", fwd_bwd(lf.contrastive_loss, q, d)), **quick)
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
                    "gemm_cost_vs_gemm_plain": round(t_g / t_gemm_plain, 3),
                    "options": str(kw),
                    **more,
                },
            }

    def fwd_only_case(B, N, D):
        """At the first size, after the second size's case: the forward alone, with both naive baselines."""
        if ctx.time_left() < 10:
            yield {"name": f"fwd only B=N={B} D{D} bf16", "skipped": "timing budget spent"}
            return
        q, d = make_batch(B, N, D, torch.bfloat16, dev)
        with torch.no_grad():  # forward alone: the flash-style LSE pass
            fwd = lambda: lf.contrastive_loss(q, d)  # noqa: E731
            nfwd = lambda: naive_loss(q, d)  # noqa: E731
            t_f = ctx.bench(fwd, **quick)
            base = {"naive": ctx.bench(nfwd, **quick)}
            extra = {
                "peak_extra_MB": _peak_mb(ctx, fwd, q, d),
                "naive_peak_extra_MB": _peak_mb(ctx, nfwd, q, d),
            }
            why = _compiled_baseline(
                ctx, base, extra, q, d, quick, grad=False,
                need_s=_COMPILE_NEED_S["smoke" if ctx.smoke else "fwd"],
            )  # fmt: skip
        yield {
            "name": f"fwd only B=N={B} D{D} bf16",
            "ours_ms": t_f,
            "baselines": base,
            "floor_ms": 2 * B * N * D / ctx.matmul_flops * 1e3,
            "extra": extra,
        }
        if why:
            yield {"name": f"torch.compile naive fwd only B=N={B} D{D} bf16", "skipped": why}

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

    def infcl_or_skip(B, N, D, need_s):
        name = f"Inf-CL fwd+bwd B=N={B} D{D} bf16"
        if not callable(infcl):
            yield {"name": name, "skipped": str(infcl)}
        elif ctx.time_left() < need_s:
            yield {"name": name, "skipped": "timing budget spent"}
        else:
            yield from _case(name, lambda: infcl_case(B, N, D))

    def largest_or_skip(need_s):
        """The largest batch (an issue target: it runs on one card): one run, time and memory."""
        B = N = 262144
        D = 1024
        name = f"fwd+bwd plain B=N={B} D{D} bf16 (one run)"
        if ctx.smoke or dev.type != "cuda":
            return
        if ctx.time_left() < need_s:
            yield {"name": name, "skipped": "timing budget spent"}
            return

        def largest():
            q, d = make_batch(B, N, D, torch.bfloat16, dev)
            fn = fwd_bwd(lf.contrastive_loss, q, d)
            fn()  # warm-up (compiles nothing new, sizes the allocator)
            t = _time_once_ms(fn)
            yield {
                "name": name,
                "ours_ms": t,
                "baselines": {},
                "floor_ms": 6 * B * N * D / ctx.matmul_flops * 1e3,
                "extra": {"peak_extra_MB": _peak_mb(ctx, fn, q, d), "peak_includes": "dq, dd"},
            }

        yield from _case(name, largest)
        torch.cuda.empty_cache()

    # The targets first: sizes[0] (65,536), its option costs, Inf-CL there (~5 s: four calls of ~1.1 s
    # on the H200) and the largest batch (one run, ~3 s), then sizes[1] (its compiled baseline only with
    # >= 45 s left), then the forward alone at sizes[0] (no target) and Inf-CL at the other sizes. Inf-CL and
    # the largest batch came last and the budget had always run out before them.
    for i, (B, N, D) in enumerate(sizes):
        if ctx.time_left() < 25:
            yield {"name": f"fwd+bwd B=N={B} D{D} bf16", "skipped": "timing budget spent"}
        else:
            yield from _case(f"fwd+bwd B=N={B} D{D} bf16", lambda B=B, N=N, D=D: size_case(B, N, D))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if i == 0:
            name = f"fwd+bwd options B=N={B} D{D} bf16"
            if ctx.time_left() < 20:
                yield {"name": name, "skipped": "timing budget spent"}
            else:
                yield from _case(name, lambda B=B, N=N, D=D: options_case(B, N, D))
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            yield from infcl_or_skip(B, N, D, need_s=12)
            yield from largest_or_skip(need_s=12)
    B, N, D = sizes[0]
    yield from _case(f"fwd only B=N={B} D{D} bf16", lambda: fwd_only_case(B, N, D))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    for B, N, D in sizes[1:]:
        yield from infcl_or_skip(B, N, D, need_s=40)
