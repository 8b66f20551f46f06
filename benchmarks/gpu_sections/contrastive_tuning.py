"""Helpers of the contrastive section (not a section itself): a tile-config sweep of the two Triton kernels,
a sweep of the backward's gradient-tile budget, and a kernel-time profile of one forward + backward.

Each swept config is checked against the default config's loss and gradients on the same inputs before it
is timed, so a config that computes something else shows up as an error, not as a speed-up.
"""

from __future__ import annotations

import torch
from llmembed_fast.triton_kernels import contrastive as tk

import llmembed_fast as lf
from llmembed_fast.bench.cases_contrastive import fwd_bwd, make_batch, option_kwargs

from .profiling import kernel_times

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages); the first is the default for bf16/fp16
CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 4, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
]


def _cfg(c) -> dict:
    bm, bn, bd, w, st = c
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=w, num_stages=st)


def _outputs(q, d, **kw):
    q.grad = d.grad = None
    loss = lf.contrastive_loss(q, d, **kw)
    loss.backward()
    return loss.detach().float(), q.grad.detach().float().clone(), d.grad.detach().float().clone()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def sweep(ctx, B: int, D: int, configs=CONFIGS) -> list[dict]:
    """Forward-only and forward+backward time per tile config at B = N, bf16 (plain loss)."""
    q, d = make_batch(B, B, D, torch.bfloat16, ctx.device)
    quick = dict(warmup=1, reps=3, min_s=0.0)
    tk.CONFIG_OVERRIDE.clear()
    ref = _outputs(q, d)
    recs = []
    for c in configs:
        if ctx.time_left() < 15:
            break
        cfg = _cfg(c)
        tk.CONFIG_OVERRIDE.update(lse=cfg, grad=cfg)
        try:
            got = _outputs(q, d)
            err = max(_rel(g, r) for g, r in zip(got, ref, strict=True))
            with torch.no_grad():
                t_f = ctx.bench(lambda q=q, d=d: lf.contrastive_loss(q, d), **quick)
            t_fb = ctx.bench(fwd_bwd(lf.contrastive_loss, q, d), **quick)
            recs.append(
                {
                    "name": f"tile sweep B=N={B} D{D} bf16 cfg={c}",
                    "ours_ms": t_fb,
                    "baselines": {},
                    "floor_ms": 6 * B * B * D / ctx.matmul_flops * 1e3,
                    "extra": {
                        "fwd_ms": round(t_f, 3),
                        "bwd_ms(derived)": round(t_fb - t_f, 3),
                        "max_rel_diff_vs_default_cfg": f"{err:.1e}",
                    },
                }
            )
        except Exception as exc:  # e.g. out of shared memory for this config
            recs.append(
                {
                    "name": f"tile sweep B=N={B} D{D} bf16 cfg={c}",
                    "ours_ms": float("nan"),
                    "baselines": {},
                    "floor_ms": None,
                    "extra": {"error": f"{type(exc).__name__}: {exc}"[:160]},
                }
            )
        finally:
            tk.CONFIG_OVERRIDE.clear()
    del q, d
    torch.cuda.empty_cache()
    return recs


def budget_sweep(ctx, B: int, D: int) -> list[dict]:
    """Forward+backward time vs the backward's gradient-tile budget (rows per block), plain and 5 dims."""
    q, d = make_batch(B, B, D, torch.bfloat16, ctx.device)
    quick = dict(warmup=1, reps=3, min_s=0.0)
    default = tk.H_BUDGET_BYTES
    recs = []
    try:
        for opt in ("plain", "matryoshka5"):
            kw = option_kwargs(opt, D)
            times = {}
            for budget in (256 << 20, 1 << 30, 2 << 30):
                if ctx.time_left() < 15:
                    break
                tk.H_BUDGET_BYTES = budget
                fn = fwd_bwd(lf.contrastive_loss, q, d, **kw)
                times[f"{budget >> 20}MB"] = ctx.bench(fn, **quick)
                times[f"peak_extra_MB@{budget >> 20}MB"] = round(ctx.peak_extra_bytes(fn) / 2**20, 1)
            if times:
                recs.append(
                    {
                        "name": f"H budget sweep {opt} B=N={B} D{D} bf16",
                        "ours_ms": times.get("256MB", float("nan")),
                        "baselines": {k: v for k, v in times.items() if not k.startswith("peak")},
                        "floor_ms": None,
                        "extra": {k: v for k, v in times.items() if k.startswith("peak")},
                    }
                )
    finally:
        tk.H_BUDGET_BYTES = default
    del q, d
    torch.cuda.empty_cache()
    return recs


def profile(ctx, B: int, D: int, top: int = 12, option: str = "plain") -> list[dict]:
    """CUDA kernel times of one forward + backward (after a warm-up) with ``option`` (an option_kwargs
    name), largest first."""
    q, d = make_batch(B, B, D, torch.bfloat16, ctx.device)
    fn = fwd_bwd(lf.contrastive_loss, q, d, **option_kwargs(option, D))
    fn()
    total, rows = kernel_times(fn, f"{option} fwd+bwd B=N={B} D{D} bf16", top)
    del q, d, fn
    torch.cuda.empty_cache()
    return [
        {
            "name": f"profile {option} fwd+bwd B=N={B} D{D} bf16 (kernel time)",
            "ours_ms": total,
            "baselines": {},
            "floor_ms": None,
            "extra": {"top": rows},
        }
    ]
