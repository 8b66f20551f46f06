"""Triton kernels of the embedding head: masked pooling and prefix L2 normalization, forward and backward.

Kernels and launchers only: inputs are assumed valid (``llmembed_fast.ops.pooling`` checks them).
All accumulation is float32; token and batch offsets are 64-bit.

Pooling modes are integer codes (``MODE_CODES``). A pooling call is two launches at most:
``pool_forward`` reads the pooled tokens' first ``D`` columns once and writes float32 ``[B, D]``;
``l2_prefix_forward`` turns a prefix of that into one normalized output (tiny, once per Matryoshka dim).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llmembed_fast._poison import empty

MODE_CODES = {"mean": 0, "weighted_mean": 1, "max": 2, "first": 3, "last": 4, "mean_sqrt_len": 5}
_MEAN, _WMEAN, _MAX, _FIRST, _LAST, _SQRT = 0, 1, 2, 3, 4, 5


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _pool_fwd_kernel(
    h_ptr,
    mask_ptr,
    seg_lo_ptr,
    seg_hi_ptr,
    out_ptr,
    info_ptr,
    argmax_ptr,
    L,
    D,
    stride_hb,
    stride_hl,
    stride_hh,
    stride_mb,
    stride_ml,
    L_BUCKET,
    MODE: tl.constexpr,
    SEGMENTS: tl.constexpr,
    BLOCK_SCAN: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One program: one row (or segment) x BLOCK_H columns. Loads are predicated on the mask, so
    padding and holes are never read; the token loop runs only from the first to the last pooled token."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < D
    col_off = cols.to(tl.int64) * stride_hh

    if SEGMENTS:
        lo = tl.load(seg_lo_ptr + row)
        hi = tl.load(seg_hi_ptr + row)
        count = (hi - lo).to(tl.int32)
        first = lo
        last = hi - 1
        base = h_ptr
        m_base = mask_ptr  # unused
    else:
        m_base = mask_ptr + row * stride_mb
        count = tl.full([], 0, tl.int32)
        first = tl.full([], 0, tl.int64) + L
        last = tl.full([], -1, tl.int64)
        for l0 in range(0, L, BLOCK_SCAN):  # one step up to 2048 tokens
            offs = l0 + tl.arange(0, BLOCK_SCAN)
            m = tl.load(m_base + offs.to(tl.int64) * stride_ml, mask=offs < L, other=0) != 0
            count += tl.sum(m.to(tl.int32), axis=0)
            first = tl.minimum(first, tl.min(tl.where(m, offs, L), axis=0).to(tl.int64))
            last = tl.maximum(last, tl.max(tl.where(m, offs, -1), axis=0).to(tl.int64))
        lo = first
        hi = last + 1
        base = h_ptr + row * stride_hb

    if MODE == 3 or MODE == 4:  # first / last: one token
        if MODE == 3:
            pos = tl.maximum(first, 0)
        else:
            pos = tl.maximum(last, 0)
        # a scalar condition joins a block mask through tl.where, not &: Triton 3.9's interpreter splats a
        # scalar comparison as int32, which masked loads and stores reject
        ok = tl.where(count > 0, col_ok, False)
        acc = tl.load(base + pos * stride_hl + col_off, mask=ok, other=0.0).to(tl.float32)
    elif MODE == 2:  # max, with the first position of the maximum
        acc = tl.full([BLOCK_H], float("-inf"), tl.float32)
        # starts at the first pooled token: where every pooled value is -inf it stays there (as torch.max)
        arg = tl.full([BLOCK_H], 0, tl.int64) + first
        for l0 in range(lo, hi, BLOCK_L):
            offs = (l0 + tl.arange(0, BLOCK_L)).to(tl.int64)
            m = offs < hi
            if not SEGMENTS:
                m = m & (tl.load(m_base + offs * stride_ml, mask=m, other=0) != 0)
            ld = m[:, None] & col_ok[None, :]
            x = tl.load(base + offs[:, None] * stride_hl + col_off[None, :], mask=ld, other=0.0).to(
                tl.float32
            )
            # a NaN is the maximum (as in torch.amax): searched as +inf, its first position wins (not a real
            # +inf before it), and a NaN maximum stays; positions within the tile as int32 (an int64 tile
            # costs registers)
            isn = (x != x) & ld
            x = tl.where(ld, tl.where(isn, float("inf"), x), float("-inf"))
            tmax = tl.max(x, axis=0)
            loc = tl.arange(0, BLOCK_L)
            has_nan = tl.max(isn.to(tl.int32), axis=0) > 0
            hit = tl.where(has_nan[None, :], isn, x == tmax[None, :])
            targ = l0 + tl.min(tl.where(hit, loc[:, None], BLOCK_L), axis=0).to(tl.int64)
            tmax = tl.where(has_nan, float("nan"), tmax)
            better = (tmax > acc) | (has_nan & (acc == acc))
            arg = tl.where(better, targ, arg)
            acc = tl.where(better, tmax, acc)
        acc = tl.where(count > 0, acc, 0.0)
        tl.store(argmax_ptr + row * D + cols, tl.where(count > 0, arg, -1).to(tl.int32), mask=col_ok)
    else:  # mean, weighted mean, mean / sqrt(len): weighted sums
        acc = tl.zeros([BLOCK_H], tl.float32)
        rank = tl.full([], 0, tl.int32)
        for l0 in range(lo, hi, BLOCK_L):
            offs = (l0 + tl.arange(0, BLOCK_L)).to(tl.int64)
            m = offs < hi
            if not SEGMENTS:
                m = m & (tl.load(m_base + offs * stride_ml, mask=m, other=0) != 0)
            x = tl.load(
                base + offs[:, None] * stride_hl + col_off[None, :],
                mask=m[:, None] & col_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            if MODE == 1:
                mi = m.to(tl.int32)
                w = (rank + tl.cumsum(mi, axis=0)) * mi
                rank += tl.sum(mi, axis=0)
                acc += tl.sum(x * w.to(tl.float32)[:, None], axis=0)
            else:
                acc += tl.sum(x, axis=0)
        cnt = tl.maximum(count, 1).to(tl.float32)
        if MODE == 0:
            acc = acc / cnt
        elif MODE == 5:
            acc = acc / tl.sqrt(cnt)
        else:
            acc = acc / (cnt * (cnt + 1.0) * 0.5)

    tl.store(out_ptr + row * D + cols, acc, mask=col_ok)
    if not SEGMENTS:
        if tl.program_id(1) == 0:
            tl.store(info_ptr + row * 3, count)
            tl.store(info_ptr + row * 3 + 1, first.to(tl.int32))
            tl.store(info_ptr + row * 3 + 2, last.to(tl.int32))


@triton.jit
def _pool_bwd_kernel(
    gp_ptr,
    mask_ptr,
    info_ptr,
    argmax_ptr,
    gh_ptr,
    L,
    H,
    D,
    stride_mb,
    stride_ml,
    L_BUCKET,
    MODE: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Writes every element of grad_hidden [B, L, H] (contiguous) for one row x BLOCK_H columns:
    weight(token) * grad_pooled for pooled tokens and columns < D, zero elsewhere."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_in = cols < H
    col_pool = cols < D
    g = tl.load(gp_ptr + row * D + cols, mask=col_pool, other=0.0)
    count = tl.load(info_ptr + row * 3)
    first = tl.load(info_ptr + row * 3 + 1)
    last = tl.load(info_ptr + row * 3 + 2)
    cnt = tl.maximum(count, 1).to(tl.float32)
    if MODE == 0:
        scale = 1.0 / cnt
    elif MODE == 5:
        scale = 1.0 / tl.sqrt(cnt)
    elif MODE == 1:
        scale = 2.0 / (cnt * (cnt + 1.0))
    else:
        scale = 1.0
    if MODE == 2:
        am = tl.load(argmax_ptr + row * D + cols, mask=col_pool, other=-1)
    out_base = gh_ptr + row * L * H
    rank = tl.full([], 0, tl.int32)
    for l0 in range(0, L, BLOCK_L):
        offs = l0 + tl.arange(0, BLOCK_L)
        l_in = offs < L
        if MODE == 2:
            val = tl.where(offs[:, None] == am[None, :], g[None, :], 0.0)
        else:
            if MODE == 3:
                w = tl.where((offs == first) & l_in, 1.0, 0.0)
            elif MODE == 4:
                w = tl.where((offs == last) & l_in, 1.0, 0.0)
            else:
                m = (
                    tl.load(mask_ptr + row * stride_mb + offs.to(tl.int64) * stride_ml, mask=l_in, other=0)
                    != 0
                ).to(tl.int32)
                if MODE == 1:
                    w = ((rank + tl.cumsum(m, axis=0)) * m).to(tl.float32) * scale
                    rank += tl.sum(m, axis=0)
                else:
                    w = m.to(tl.float32) * scale
            val = w[:, None] * g[None, :]
        tl.store(
            out_base + offs.to(tl.int64)[:, None] * H + cols[None, :],
            val.to(gh_ptr.dtype.element_ty),
            mask=l_in[:, None] & col_in[None, :],
        )


@triton.jit
def _segments_bwd_kernel(
    gp_ptr,
    seg_lo_ptr,
    seg_hi_ptr,
    argmax_ptr,
    gh_ptr,
    H,
    D,
    MODE: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Adds one segment's gradient into grad_hidden2d [T, H] (zero-initialized, contiguous).
    ATOMIC when segments overlap (then the buffer is float32)."""
    seg = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < D
    g = tl.load(gp_ptr + seg * D + cols, mask=col_ok, other=0.0)
    lo = tl.load(seg_lo_ptr + seg)
    hi = tl.load(seg_hi_ptr + seg)
    count = (hi - lo).to(tl.int32)
    if MODE == 2 or MODE == 3 or MODE == 4:
        if MODE == 2:
            pos = tl.load(argmax_ptr + seg * D + cols, mask=col_ok, other=-1).to(tl.int64)
        elif MODE == 3:
            pos = tl.zeros([BLOCK_H], tl.int64) + lo
        else:
            pos = tl.zeros([BLOCK_H], tl.int64) + hi - 1
        ok = tl.where(count > 0, col_ok & (pos >= 0), False)
        g = tl.where(ok, g, 0.0)
        ptrs = gh_ptr + tl.maximum(pos, 0) * H + cols
        if ATOMIC:
            tl.atomic_add(ptrs, g, mask=ok)
        else:
            tl.store(ptrs, g.to(gh_ptr.dtype.element_ty), mask=ok)
    else:
        cnt = tl.maximum(count, 1).to(tl.float32)
        if MODE == 0:
            scale = 1.0 / cnt
        elif MODE == 5:
            scale = 1.0 / tl.sqrt(cnt)
        else:
            scale = 2.0 / (cnt * (cnt + 1.0))
        for l0 in range(lo, hi, BLOCK_L):
            offs = (l0 + tl.arange(0, BLOCK_L)).to(tl.int64)
            m = offs < hi
            if MODE == 1:
                w = (offs - lo + 1).to(tl.float32) * scale
            else:
                w = tl.zeros([BLOCK_L], tl.float32) + scale
            val = w[:, None] * g[None, :]
            ptrs = gh_ptr + offs[:, None] * H + cols[None, :]
            ok = m[:, None] & col_ok[None, :]
            if ATOMIC:
                tl.atomic_add(ptrs, val, mask=ok)
            else:
                tl.store(ptrs, val.to(gh_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _l2_prefix_fwd_kernel(
    x_ptr,
    y_ptr,
    norm_ptr,
    d,
    stride_x,
    stride_y,
    eps,
    BLOCK_D: tl.constexpr,
):
    """y[r, :d] = x[r, :d] / max(||x[r, :d]||, eps); norm[r] = ||x[r, :d]|| (float32)."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, d, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * stride_x + c, mask=c < d, other=0.0).to(tl.float32)
        acc += x * x
    nrm = tl.sqrt(tl.sum(acc, axis=0))
    tl.store(norm_ptr + row, nrm)
    inv = 1.0 / tl.maximum(nrm, eps)
    for c0 in range(0, d, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * stride_x + c, mask=c < d, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + c, (x * inv).to(y_ptr.dtype.element_ty), mask=c < d)


@triton.jit
def _l2_prefix_bwd_kernel(
    x_ptr,
    g_ptr,
    norm_ptr,
    gx_ptr,
    d,
    stride_x,
    stride_g,
    stride_gx,
    eps,
    ACCUMULATE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """gx[r, :d] (+)= (g - y (y.g)) / n with y = x / n, n = ||x[r, :d]||; g / eps where n <= eps."""
    row = tl.program_id(0).to(tl.int64)
    nrm = tl.load(norm_ptr + row)
    inv = 1.0 / tl.maximum(nrm, eps)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, d, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * stride_x + c, mask=c < d, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + c, mask=c < d, other=0.0).to(tl.float32)
        acc += x * g
    dot = tl.sum(acc, axis=0) * inv  # y . g
    proj = tl.where(nrm > eps, dot * inv, 0.0)
    for c0 in range(0, d, BLOCK_D):
        c = c0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + row * stride_x + c, mask=c < d, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row * stride_g + c, mask=c < d, other=0.0).to(tl.float32)
        gx = (g - x * proj) * inv
        if ACCUMULATE:
            gx += tl.load(gx_ptr + row * stride_gx + c, mask=c < d, other=0.0).to(tl.float32)
        tl.store(gx_ptr + row * stride_gx + c, gx.to(gx_ptr.dtype.element_ty), mask=c < d)


# ----------------------------------------------------------------------------------------------------
# Launchers. Shapes/dtypes are already checked by the caller.
# ----------------------------------------------------------------------------------------------------


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_H, num_warps) of the token loops (segments backward; all kernels when interpreting)."""
    if _interpreting():  # few, large tiles: the interpreter's cost is per tile
        return 64, max(16, min(256, triton.next_power_of_2(D))), 1
    return 32, max(16, min(128, triton.next_power_of_2(D))), 4


# On a GPU the token-loop kernels are autotuned per (columns, length class, mode); the interpreter takes
# one config (it cannot run several). Every config overwrites all outputs, so tuning runs are harmless.
# Tuning is kept cheap because an encode loop meets many batch shapes: few length classes (not one per
# power of two), short benchmark runs, and no tuning at all for first/last (one token per row, no loop).
_TOKEN_CONFIGS = [
    triton.Config({"BLOCK_L": bl, "BLOCK_H": bh}, num_warps=w)
    for bl, bh, w in ((32, 128, 4), (64, 128, 4), (16, 256, 4), (32, 256, 8), (64, 64, 4), (128, 64, 8))
]


def _quick_bench(fn, quantiles=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# The forward's 64 x 128, 4-warp config spills 1.5 - 1.9 KB per thread on sm_90a in every mode (ptxas, see
# benchmarks/kernel_codegen.py --pooling): not worth its tuning runs. The backward keeps it (no spill).
_FWD_CONFIGS = [c for c in _TOKEN_CONFIGS if (c.kwargs["BLOCK_L"], c.kwargs["BLOCK_H"]) != (64, 128)]


def _autotuned(kernel, key, configs):
    try:
        return triton.autotune(configs, key=key, do_bench=_quick_bench)(kernel)
    except TypeError:  # a Triton without the do_bench argument
        return triton.autotune(configs, key=key)(kernel)


_fwd_tuned = _autotuned(_pool_fwd_kernel, ["D", "L_BUCKET", "MODE", "SEGMENTS"], _FWD_CONFIGS)
_bwd_tuned = _autotuned(_pool_bwd_kernel, ["H", "D", "L_BUCKET", "MODE"], _TOKEN_CONFIGS)


def _length_class(L: int) -> int:
    """Autotuning key for the sequence length: 0 (<= 256), 1 (<= 2048), 2 (longer)."""
    return 0 if L <= 256 else (1 if L <= 2048 else 2)


def _launch_tokens(tuned, plain, grid_rows: int, cols: int, *args, **kw):
    """Launch a token-loop kernel: autotuned on a GPU; one fixed config when interpreting, for first/last
    (no token loop to tune) or when LLMEMBED_FAST_AUTOTUNE=0."""
    if (
        _interpreting()
        or kw["MODE"] in (_FIRST, _LAST)
        or os.environ.get("LLMEMBED_FAST_AUTOTUNE", "1") == "0"
    ):
        BL, BH, nw = _blocks(cols)
        plain[(grid_rows, triton.cdiv(cols, BH))](*args, **kw, BLOCK_L=BL, BLOCK_H=BH, num_warps=nw)
    else:
        tuned[lambda meta: (grid_rows, triton.cdiv(cols, meta["BLOCK_H"]))](*args, **kw)


def _scan_block(L: int) -> int:
    # two compiled variants, not one per power of two of L (the scan loops when L is longer)
    return 256 if L <= 256 else 2048


def pool_forward(hidden: torch.Tensor, mask: torch.Tensor, mode: str, D: int):
    """hidden [B, L, H] (any strides), mask [B, L] -> (pooled f32 [B, D], info i32 [B, 3], argmax i32 [B, D]
    or None).

    info rows are (count, first, last) pooled positions (first = L, last = -1 when empty)."""
    B, L, _ = hidden.shape
    dev = hidden.device
    out = empty(B, D, device=dev, dtype=torch.float32)
    info = empty(B, 3, device=dev, dtype=torch.int32)
    argmax = empty(B, D, device=dev, dtype=torch.int32) if mode == "max" else None
    if B == 0:
        return out, info, argmax
    m = _mask_arg(mask)
    _launch_tokens(
        _fwd_tuned,
        _pool_fwd_kernel,
        B,
        D,
        hidden,
        m,
        info,
        info,
        out,
        info,
        argmax if argmax is not None else info,
        L,
        D,
        hidden.stride(0),
        hidden.stride(1),
        hidden.stride(2),
        m.stride(0),
        m.stride(1),
        _length_class(L),
        MODE=MODE_CODES[mode],
        SEGMENTS=False,
        BLOCK_SCAN=_scan_block(L),
    )
    return out, info, argmax


def pool_backward(
    grad_pooled: torch.Tensor,
    mask: torch.Tensor,
    info: torch.Tensor,
    argmax,
    mode: str,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """grad_pooled f32 [B, D] (contiguous) -> grad_hidden [B, L, H] of ``dtype``, every element written."""
    B, L, H = shape
    D = grad_pooled.shape[1]
    gh = empty(B, L, H, device=grad_pooled.device, dtype=dtype)
    if gh.numel() == 0:
        return gh
    m = _mask_arg(mask)
    _launch_tokens(
        _bwd_tuned,
        _pool_bwd_kernel,
        B,
        H,
        grad_pooled,
        m,
        info,
        argmax if argmax is not None else info,
        gh,
        L,
        H,
        D,
        m.stride(0),
        m.stride(1),
        _length_class(L),
        MODE=MODE_CODES[mode],
    )
    return gh


def segments_forward(hidden2d: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, mode: str, D: int):
    """hidden2d [T, H], starts/ends int64 [S] -> (pooled f32 [S, D], argmax i32 [S, D] of tokens, or None)."""
    S = starts.shape[0]
    dev = hidden2d.device
    out = empty(S, D, device=dev, dtype=torch.float32)
    argmax = empty(S, D, device=dev, dtype=torch.int32) if mode == "max" else None
    if S == 0:
        return out, argmax
    _launch_tokens(
        _fwd_tuned,
        _pool_fwd_kernel,
        S,
        D,
        hidden2d,
        starts,
        starts,
        ends,
        out,
        starts,
        argmax if argmax is not None else starts,
        0,
        D,
        0,
        hidden2d.stride(0),
        hidden2d.stride(1),
        0,
        0,
        0,
        MODE=MODE_CODES[mode],
        SEGMENTS=True,
        BLOCK_SCAN=16,
    )
    return out, argmax


def segments_backward(
    grad_pooled: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    argmax,
    mode: str,
    shape: tuple[int, int],
    dtype: torch.dtype,
    overlapping: bool,
) -> torch.Tensor:
    """grad_pooled f32 [S, D] -> grad_hidden2d [T, H] of ``dtype`` (zero where no segment pools)."""
    T, H = shape
    S, D = grad_pooled.shape
    acc_dtype = torch.float32 if overlapping else dtype
    gh = torch.zeros(T, H, device=grad_pooled.device, dtype=acc_dtype)
    if S and T:
        BL, BH, nw = _blocks(D)
        _segments_bwd_kernel[(S, triton.cdiv(D, BH))](
            grad_pooled,
            starts,
            ends,
            argmax if argmax is not None else starts,
            gh,
            H,
            D,
            MODE=MODE_CODES[mode],
            ATOMIC=overlapping,
            BLOCK_L=BL,
            BLOCK_H=BH,
            num_warps=nw,
        )
    return gh.to(dtype)


def _dblock(d: int) -> int:
    return max(16, min(4096 if _interpreting() else 1024, triton.next_power_of_2(d)))


def l2_prefix_forward(x: torch.Tensor, d: int, out_dtype: torch.dtype, eps: float):
    """x [N, >=d] (unit column stride) -> (x[:, :d] / ||x[:, :d]|| as ``out_dtype`` [N, d], norms f32 [N])."""
    N = x.shape[0]
    y = empty(N, d, device=x.device, dtype=out_dtype)
    norms = empty(N, device=x.device, dtype=torch.float32)
    if N:
        _l2_prefix_fwd_kernel[(N,)](
            x, y, norms, d, x.stride(0), y.stride(0), eps, BLOCK_D=_dblock(d), num_warps=4
        )
    return y, norms


def l2_prefix_backward(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    norms: torch.Tensor,
    d: int,
    grad_x: torch.Tensor,
    eps: float,
    accumulate: bool,
) -> None:
    """Writes (or adds, when ``accumulate``) the gradient of the prefix normalization into grad_x[:, :d]."""
    N = x.shape[0]
    if N:
        _l2_prefix_bwd_kernel[(N,)](
            x,
            grad_y,
            norms,
            grad_x,
            d,
            x.stride(0),
            grad_y.stride(0),
            grad_x.stride(0),
            eps,
            ACCUMULATE=accumulate,
            BLOCK_D=_dblock(d),
            num_warps=4,
        )
