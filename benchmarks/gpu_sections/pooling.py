"""GPU section: the fused embedding head (pool -> Matryoshka slice -> L2 normalize)."""

from __future__ import annotations

import torch

import llmembed_fast as lf
from llmembed_fast import reference as R
from llmembed_fast.bench.cases_pooling import make_inputs, st_head

MODES = lf.POOLING_MODES
TOL_OUT = 2e-5
TOL_GRAD = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _rel(got, want) -> float:
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _mask(B, L, padding, gen):
    n = torch.randint(1, L + 1, (B,), generator=gen)
    n[-1] = 0
    pos = torch.arange(L)
    if padding == "right":
        m = pos[None] < n[:, None]
    elif padding == "left":
        m = pos[None] >= (L - n)[:, None]
    else:
        m = (pos[None] < n[:, None]) & (torch.rand(B, L, generator=gen) > 0.3)
        m[:, :5] = False
    return m


def correctness(ctx) -> list[dict]:
    out = []
    dev = ctx.device
    B, L, H, dims = (3, 37, 123, (16, 123)) if ctx.smoke else (5, 301, 1000, (256, 1000))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mode in MODES:
            worst_o = worst_g = 0.0
            for seed, padding in enumerate(("right", "left", "holes")):
                gen = torch.Generator().manual_seed(1000 * seed + MODES.index(mode))
                hidden = torch.randn(B, L, H, generator=gen).to(dev, dtype).requires_grad_(True)
                mask = _mask(B, L, padding, gen).to(dev)
                outs = lf.pool(hidden, mask, mode, dims=dims, normalize=True)
                grads = [torch.randn(o.shape, generator=gen).to(dev) for o in outs]
                torch.autograd.backward(outs, grads)
                h64 = hidden.detach().double().requires_grad_(True)
                ref = R.pool(h64, mask, mode, dims=dims, normalize=True)
                torch.autograd.backward(ref, [g.double() for g in grads])
                worst_o = max([worst_o] + [_rel(o, r.detach()) for o, r in zip(outs, ref, strict=False)])
                worst_g = max(worst_g, _rel(hidden.grad, h64.grad))
            name = f"pool {mode} {str(dtype)[6:]} B{B} L{L} H{H} dims{dims}"
            out.append(
                {
                    "name": name + " out",
                    "ok": worst_o <= TOL_OUT,
                    "err": worst_o,
                    "tol": TOL_OUT,
                    "detail": "",
                }
            )
            out.append(
                {
                    "name": name + " grad",
                    "ok": worst_g <= TOL_GRAD[dtype],
                    "err": worst_g,
                    "tol": TOL_GRAD[dtype],
                    "detail": "",
                }
            )
    # segments (packed batch and overlapping late-chunking spans)
    for mode in MODES:
        gen = torch.Generator().manual_seed(77)
        hidden = torch.randn(900, 384, generator=gen).to(dev, torch.bfloat16).requires_grad_(True)
        starts, ends = [0, 100, 100, 350, 400], [100, 100, 380, 700, 900]
        outs = lf.pool_segments(hidden, starts, ends, mode, dims=(64, 384), normalize=True)
        grads = [torch.randn(o.shape, generator=gen).to(dev) for o in outs]
        torch.autograd.backward(outs, grads)
        h64 = hidden.detach().double().requires_grad_(True)
        ref = R.pool_segments(h64, starts, ends, mode, dims=(64, 384), normalize=True)
        torch.autograd.backward(ref, [g.double() for g in grads])
        eo = max(_rel(o, r.detach()) for o, r in zip(outs, ref, strict=False))
        eg = _rel(hidden.grad, h64.grad)
        out.append(
            {
                "name": f"pool_segments {mode} bf16 overlapping",
                "ok": eo <= TOL_OUT and eg <= TOL_GRAD[torch.bfloat16],
                "err": max(eo, eg / TOL_GRAD[torch.bfloat16] * TOL_OUT),
                "tol": TOL_OUT,
                "detail": f"out {eo:.2e} grad {eg:.2e}",
            }
        )
    # 64-bit offsets: rows whose tokens lie past element 2^31 of hidden (see _offsets_checks)
    if ctx.time_left() > 60 and not ctx.smoke:
        out += _offsets_checks(torch.device("cuda"), 2, 300_000, 4096, 512, cut=200_000)
        torch.cuda.empty_cache()
    return out


def _row_ref(h_row, m_row, mode: str, D: int, step: int = 1 << 16):
    """float64 pooled row (un-normalized) of h_row[:, :D] [L, H] over the tokens m_row [L] selects, computed
    a chunk of tokens at a time (at most `step` x D float64 elements live at once)."""
    idx = m_row.nonzero().squeeze(1)
    if mode == "last":
        return h_row[idx[-1], :D].double()
    acc = torch.full((D,), float("-inf") if mode == "max" else 0.0, dtype=torch.float64, device=h_row.device)
    for l0 in range(0, h_row.shape[0], step):
        x = h_row[l0 : l0 + step, :D][m_row[l0 : l0 + step]].double()
        acc = torch.maximum(acc, x.amax(0)) if mode == "max" else acc + x.sum(0)
    return acc if mode == "max" else acc / idx.numel()


def _offsets_checks(dev, B: int, L: int, H: int, D: int, cut: int) -> list[dict]:
    """mean / last / max pooling of hidden [B, L, H] bf16 whose last row lies past element 2^31 - 1 (B*L*H >
    2^31): row 0 keeps tokens [0, cut), the last row keeps every token, so the kernels read element offsets
    up to (B*L - 1)*H + D - 1. The last row's tokens past 2^31 are marked (+1 on their first D columns, and
    one token at 50, the row's max) so its mean, max and last outputs depend on them: offsets computed in
    32 bits would read other tokens (or fault). Each row is compared with a float64 reference computed on
    its own [L, D] slice, a chunk of tokens at a time (memory stays bounded)."""
    hidden = torch.empty(B, L, H, device=dev, dtype=torch.bfloat16).normal_()
    mask = torch.ones(B, L, dtype=torch.bool, device=dev)
    mask[0, cut:] = False
    first_hi = -(-(2**31) // H) - (B - 1) * L  # first token of the last row at element offset >= 2^31
    if 0 < first_hi < L - 7:
        hidden[B - 1, first_hi:, :D] += 1.0
        hidden[B - 1, L - 7, :D] = 50.0
    max_off = ((B - 1) * L + L - 1) * H + D - 1
    out = []
    for mode in ("mean", "last", "max"):
        got = lf.pool(hidden, mask, mode, dims=D)
        errs = [_rel(got[b], _row_ref(hidden[b], mask[b], mode, D)) for b in range(B)]
        out.append(
            {
                "name": f"pool {mode} bf16 B{B} L{L} H{H} (int64 offsets)",
                "ok": max(errs) <= 1e-4,
                "err": max(errs),
                "tol": 1e-4,
                "detail": f"rows' errors {', '.join(f'{e:.1e}' for e in errs)}; "
                f"largest offset read {max_off:.4g} (2^31 = {2**31:.4g})",
            }
        )
    del hidden
    return out


def _time_config(ctx, B, L, H, dim, dtype, lengths) -> list[dict]:
    """Forward, forward+backward (mean) and the other modes' forwards for one length distribution."""
    hidden, mask, tokens = make_inputs(B, L, H, dtype, ctx.device, lengths, seed=1)
    # Floors: the bytes the op must touch over the measured copy bandwidth (which counts bytes read +
    # written). Forward: the pooled tokens' hidden states in the `dim` columns it keeps (the Matryoshka slice:
    # the other H - dim columns are never read), the mask, and the float32 [B, dim] output. Backward: the
    # grad_hidden [B, L, H] it writes in full (pool_backward writes every element, zeros of the padding and
    # of the dropped columns included), plus the mask and the [B, dim] output gradient it reads.
    # The figure (every H column of the pooled tokens) stays in extra as issue_floor_all_cols_ms.
    ms_per_byte = 1e3 / ctx.bandwidth_Bps
    elt = hidden.element_size()
    small = (mask.numel() * mask.element_size() + B * dim * 4) * ms_per_byte  # mask + [B, dim] f32
    fwd_floor = tokens * dim * elt * ms_per_byte + small
    bwd_floor = B * L * H * elt * ms_per_byte + small
    all_cols_floor = tokens * H * elt * ms_per_byte
    st = st_head("mean", H, dim)
    comp = torch.compile(st, dynamic=False) if callable(st) and not ctx.smoke else None
    recs = []

    def ours():
        return lf.pool(hidden, mask, "mean", dims=dim, normalize=True)

    base = {}
    if callable(st):
        base["st_eager"] = ctx.bench(lambda: st(hidden, mask))
    if comp is not None:
        base["torch.compile"] = ctx.bench(lambda: comp(hidden, mask))
    t_ours = ctx.bench(ours)
    peak = ctx.peak_extra_bytes(ours)
    recs.append(
        {
            "name": f"fwd mean {lengths} B{B} L{L} H{H}->{dim} bf16",
            "ours_ms": t_ours,
            "baselines": base,
            "floor_ms": fwd_floor,
            "extra": {
                "floor": "used cols+mask+out",
                "issue_floor_all_cols_ms": round(all_cols_floor, 4),
                "peak_extra_MB": round(peak / 2**20, 2),
                "output_MB": round(B * dim * 4 / 2**20, 2),
            },
        }
    )

    h = hidden.detach().requires_grad_(True)
    g = torch.randn(B, dim, device=ctx.device)

    def fwd_bwd(fn, grad):
        def run():
            h.grad = None
            fn(h, mask).backward(grad)

        return run

    base_fb = {}
    if callable(st):
        base_fb["st_eager"] = ctx.bench(fwd_bwd(st, g.to(dtype)))
    if comp is not None:
        comp_fb = torch.compile(st, dynamic=False)
        base_fb["torch.compile"] = ctx.bench(fwd_bwd(comp_fb, g.to(dtype)))
    t_fb = ctx.bench(fwd_bwd(lambda x, m: lf.pool(x, m, "mean", dims=dim, normalize=True), g))
    recs.append(
        {
            "name": f"fwd+bwd mean {lengths} B{B} L{L} H{H}->{dim} bf16",
            "ours_ms": t_fb,
            "baselines": base_fb,
            "floor_ms": fwd_floor + bwd_floor,
            "extra": {
                "bwd_ms(derived)": round(t_fb - t_ours, 4),
                "bwd_floor_ms": round(bwd_floor, 4),
                "floor": "fwd used cols+mask+out, bwd full grad written",
                "issue_floor_all_cols_ms": round(all_cols_floor + B * L * H * elt * ms_per_byte, 4),
            },
        }
    )

    for mode in ("weighted_mean", "max", "last"):
        if ctx.time_left() < 15:
            break
        st_m = st_head(mode, H, dim)
        base = {"st_eager": ctx.bench(lambda f=st_m: f(hidden, mask))} if callable(st_m) else {}
        t = ctx.bench(lambda m=mode: lf.pool(hidden, mask, m, dims=dim, normalize=True))
        read = (B if mode == "last" else tokens) * dim * elt * ms_per_byte + small
        recs.append(
            {
                "name": f"fwd {mode} {lengths} B{B} L{L} H{H}->{dim} bf16",
                "ours_ms": t,
                "baselines": base,
                "floor_ms": read,
                "extra": {"floor": "used cols+mask+out"},
            }
        )
    return recs


def timings(ctx) -> list[dict]:
    if ctx.smoke:
        B, L, H, dim = 2, 16, 64, 32
    else:
        B, L, H, dim = 64, 1024, 4096, 1024
    recs = []
    for lengths in ("full", "uniform"):
        if ctx.time_left() < 20:
            break
        recs.extend(_time_config(ctx, B, L, H, dim, torch.bfloat16, lengths))
    return recs
