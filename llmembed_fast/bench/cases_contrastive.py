"""Bench cases of the contrastive loss: lf.contrastive_loss (forward + backward) against the naive loss a
user writes (normalize, matmul, ``F.cross_entropy`` on float32 logits) and Inf-CL when it is installed.

CPU default: float32, B = N = 1024, D = 256 (plain, symmetric, 5 Matryoshka dims). ``--full`` adds the
issue's CPU target B = N = 16384, D = 256. GPU default: bf16, B = N = 16384, D = 1024, plus the option
costs; ``--full`` the issue's B = N = 65536, D = 1024 and B = N = 32768, D = 4096.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import llmembed_fast as lf


def make_batch(B: int, N: int, D: int, dtype: torch.dtype, device, seed: int = 0):
    """Random queries [B, D] and candidates [N, D] (leaf tensors that require grad); labels = arange(B)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, D, generator=gen, device=device).to(dtype).requires_grad_(True)
    d = torch.randn(N, D, generator=gen, device=device).to(dtype).requires_grad_(True)
    # positives correlated with their queries, as after some training
    with torch.no_grad():
        d[:B] = (0.6 * q.float() + 0.8 * d[:B].float()).to(dtype)
    return q, d


def naive_loss(q, d, temperature: float = 0.05, symmetric: bool = False):
    """What people write: cosine similarities by one matmul, float32 logits, cross-entropy (B x N memory)."""
    labels = torch.arange(q.shape[0], device=q.device)
    logits = (F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T).float() / temperature
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits[:, : q.shape[0]].T, labels))
    return loss


def infcl_loss():
    """Inf-CL's single-device loss as (q, d, temperature) -> loss, or a string saying why it is
    unavailable."""
    try:
        from inf_cl import cal_flash_loss
    except Exception as exc:  # not installed, or no GPU build
        return f"skipped: inf-cl not importable ({type(exc).__name__}); pip install --no-deps inf-cl"

    def run(q, d, temperature=0.05):
        # Inf-CL tiles the feature dim in heads of head_dim (16..256); it upcasts to fp32 itself.
        head_dim = next(h for h in (256, 128, 64, 32, 16) if q.shape[-1] % h == 0)
        qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
        return cal_flash_loss(qn, dn, scale=1.0 / temperature, head_dim=head_dim).mean()

    return run


def fwd_bwd(loss_fn, q, d, **kw):
    """A callable running loss_fn(q, d, **kw).backward() with fresh gradients."""

    def run():
        q.grad = None
        d.grad = None
        loss_fn(q, d, **kw).backward()

    return run


OPTIONS = {
    "plain": {},
    "symmetric": dict(symmetric=True),
    "same_tower": dict(same_tower=True),
    "matryoshka5": None,  # filled per D: five nested dims
    "fn_margin": dict(false_negative_margin=0.1),
}


def option_kwargs(name: str, D: int) -> dict:
    if name == "matryoshka5":
        dims = sorted({max(1, D // 16), max(1, D // 8), max(1, D // 4), max(1, D // 2), D})
        return dict(matryoshka_dims=tuple(dims))
    return dict(OPTIONS[name])


def cases(ctx) -> list:
    from llmembed_fast.bench.core import Case

    gpu = ctx.device.type == "cuda"
    out: list = []
    if ctx.smoke:
        configs, opts = [(64, 64, 32, torch.float32)], ("plain",)
    elif gpu:
        configs = [(16384, 16384, 1024, torch.bfloat16)]
        if ctx.full:
            configs += [(65536, 65536, 1024, torch.bfloat16), (32768, 32768, 4096, torch.bfloat16)]
        opts = ("plain", "symmetric", "same_tower", "matryoshka5", "fn_margin")
    else:
        configs = [(1024, 1024, 256, torch.float32)]
        if ctx.full:
            configs.append((16384, 16384, 256, torch.float32))
        opts = ("plain", "symmetric", "matryoshka5")
    infcl = infcl_loss() if gpu else "skipped: Inf-CL needs CUDA"
    # compiled, naive keeps only the logits and fuses the softmax: the baseline to beat when memory fits
    want_compile = gpu or ctx.full
    compiled_naive = torch.compile(naive_loss, dynamic=False) if want_compile else None
    for B, N, D, dtype in configs:
        q, d = make_batch(B, N, D, dtype, ctx.device)
        tag = f"B{B} N{N} D{D} {str(dtype)[6:]}"
        flops = 6 * B * N * D  # the three GEMMs any exact loss needs (forward, dq, dd)
        for opt in opts:
            kw = option_kwargs(opt, D)
            sym = kw.get("symmetric", False)
            base = {}
            if opt in ("plain", "symmetric"):
                naive_ok = gpu or B * N <= 4096 * 4096 or ctx.full
                base["naive matmul+CE"] = (
                    fwd_bwd(naive_loss, q, d, symmetric=sym)
                    if naive_ok
                    else "skipped: B x N too large without --full"
                )
                if not naive_ok:
                    base["torch.compile naive"] = base["naive matmul+CE"]  # the same skip reason
                elif compiled_naive is None:
                    base["torch.compile naive"] = "skipped: on CPU only with --full (compiling takes minutes)"
                else:
                    base["torch.compile naive"] = fwd_bwd(compiled_naive, q, d, symmetric=sym)
                if opt == "plain":
                    base["inf-cl"] = fwd_bwd(infcl, q, d) if callable(infcl) else infcl
            if opt != "plain":
                base["ours plain"] = fwd_bwd(lf.contrastive_loss, q, d)
            out.append(
                Case(
                    "contrastive",
                    f"fwd+bwd {opt} {tag}",
                    fwd_bwd(lf.contrastive_loss, q, d, **kw),
                    base,
                    flops=flops,
                    note="flops = 6*B*N*D; 'ours plain' gives the option's cost",
                )
            )
    return out
