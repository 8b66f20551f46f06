"""Triton kernels of the contrastive loss: flash-style row log-sum-exp (forward), gradient tiles (backward).

Kernels and launchers only (``llmembed_fast.ops.contrastive`` checks inputs, builds the terms and runs
the GEMMs). Same launcher interface as ``llmembed_fast.reference.contrastive_chunked`` (see its docstring
for the meaning of a term, ``a2``, ``b``, ``special``, ``thr2`` and ``bounds``).

* ``_row_lse_kernel``: one program = BLOCK_M rows x a contiguous range of columns. For each column tile it
  accumulates the dot products range by range of the Matryoshka ``bounds`` with ``tl.dot`` (bf16/fp16 on
  tensor cores, fp32 as TF32 or IEEE, float32 accumulation), turns the running prefix into the base-2
  logits of each dim with the row/column scales (normalization and 1/temperature), masks, and updates an
  online max / sum-of-exp2 per row and dim. Only [splits, K, M] partial LSEs reach memory; the column
  range is split across programs when there are few row blocks, and the partials are merged on the host.
* ``_grad_tile_kernel``: one program = one BLOCK_M x BLOCK_N tile of a block of rows. Recomputes the
  logits, forms g = w * (p - positive) and writes H[r] = sum_{k>=r} g_k * scale (K suffix sums, so the
  GEMMs over each column range see every dim that contains it; for K > 1 each dim's tile is written as it
  is formed, then the program reads its own tiles back from L2 to form the suffix sums), plus per-tile row
  and column sums of g * z for the normalization and temperature gradients. No atomics.
* ``COLS`` (the fused symmetric term, default labels in one process): the forward also writes each tile's
  log-sum-exp down its columns ([row tiles, K, B] per block of rows, ``COL_PART_BUDGET_BYTES``, merged on
  the host block by block), and the backward adds the document->query gradient of column i (query i's
  positive) to the same tile, so the symmetric loss costs one extra exp pass per tile instead of a second
  B x B term.
* ``TRI`` (a same-tower term in one process, symmetric on its first M columns): the same column machinery
  on the upper triangle only. Pair (i, j), i < j, is computed once in row i; its column side feeds row j's
  log-sum-exp (forward) and gradient (backward), so the term costs half the tiles, each with two exp
  passes. Forward programs start at their block's diagonal; gradient launches cover columns [c0, N).
* ``SINGLE`` (Matryoshka dims whose inner bounds are multiples of BLOCK_D): one pipelined loop over D whose
  body updates dim k when its range ends (a runtime branch), instead of one loop per range, each of which
  restarts the software pipeline.

Why the gradient GEMMs are not fused here: for the issue's D (1024 - 4096) a [BLOCK_M, D] float32 dq
accumulator does not fit on chip, so a flash-attention-style dq/dd kernel would either reread and rewrite
gradient tiles in HBM or recompute the logits D / BLOCK_D times. Instead the tiles of a block of rows
(bounded, ``H_BUDGET_BYTES``) go to two cuBLAS GEMMs (``llmembed_fast.ops.contrastive``).

Gather (rows d[labels]) is a runtime argument; exclusion and the false-negative margin are compile-time
switches (``EXCL``, ``HAS_THR``: the plain loss's mask is the bounds check alone), so a kernel is compiled
per dtype, Matryoshka count, COLS / TRI, those switches and loop kind; the Matryoshka bounds are integer
arguments so their divisibility by 16 is known and the loads along D stay vectorized. Offsets are
64-bit. Any D, M, N (every load and store is masked).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from llmembed_fast._matmul import mm_f32, tf32
from llmembed_fast._poison import empty

LN2 = math.log(2.0)
# Column partial log-sum-exps of the forward's column term ([row tiles, K, columns] float32) per block of
# rows: at B = 262,144 one block for all rows would take 2 - 4 GB; blocks are merged as they finish.
COL_PART_BUDGET_BYTES = 256 << 20
# Gradient tiles per backward block (all Matryoshka slots together). 1 GiB: at B = N = 65,536, D = 1024 on an
# H200, 4x fewer blocks than 256 MiB took the backward from 66 to 54 ms (fewer accumulation passes over the
# fp32 column gradients) for 1.38 GB peak extra memory instead of 0.65 GB.
H_BUDGET_BYTES = 1 << 30
# "keep" logits mode: a term's forward logits (float32 [K, M, NC]) are kept for its backward when they fit
# this (LLMEMBED_FAST_CONTRASTIVE_KEEP_BYTES, default 8 GiB), saving the backward's recomputation (a GEMM).
KEEP_BUDGET_BYTES = int(os.environ.get("LLMEMBED_FAST_CONTRASTIVE_KEEP_BYTES", str(8 << 30)))
LSE_SPLITS: int | None = None  # force the forward's column split count (tests); None = fill the GPU


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot_step(acc, x_base, y_base, rmask, cmask, d0, hi, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """acc += X[rows, d0:d0+BLOCK_D] @ Y[cols, d0:d0+BLOCK_D]^T, columns >= hi masked."""
    dd = d0 + tl.arange(0, BLOCK_D)
    dm = dd < hi
    xt = tl.load(x_base + dd[None, :], mask=rmask[:, None] & dm[None, :], other=0.0)
    yt = tl.load(y_base + dd[:, None], mask=dm[:, None] & cmask[None, :], other=0.0)
    if UPCAST:
        xt = xt.to(tl.float32)
        yt = yt.to(tl.float32)
    return tl.dot(xt, yt, acc, input_precision=PRECISION)


@triton.jit
def _dot_range(
    acc,
    x_base,
    y_base,
    rmask,
    cmask,
    lo,
    hi,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """acc += X[rows, lo:hi] @ Y[cols, lo:hi]^T (x_base [BM, 1] and y_base [1, BN] row pointers)."""
    for d0 in range(lo, hi, BLOCK_D):
        acc = _dot_step(acc, x_base, y_base, rmask, cmask, d0, hi, UPCAST, PRECISION, BLOCK_D)
    return acc


@triton.jit
def _logit_dots(
    acc,
    s_ptr,
    k,
    stride_sk,
    stride_sm,
    local,
    cols,
    x_base,
    y_base,
    rmask,
    cmask,
    lo,
    hi,
    PRE_S: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The tile's prefix dot products up to dim k: read from the precomputed S[k] (cuBLAS logits mode) or
    accumulated here over the range [lo, hi) onto ``acc`` (the prefix up to dim k - 1)."""
    if PRE_S:  # 64-bit offsets: logits kept for the backward span K * M * NC elements
        acc = tl.load(
            s_ptr + k * stride_sk.to(tl.int64) + local[:, None].to(tl.int64) * stride_sm + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
    else:
        acc = _dot_range(acc, x_base, y_base, rmask, cmask, lo, hi, UPCAST, PRECISION, BLOCK_D)
    return acc


@triton.jit
def _bound(k: tl.constexpr, b0, b1, b2, b3, b4, b5, b6, b7, b8):
    """bounds[k], picked at compile time. Bounds are integer arguments (not loaded from memory) so Triton
    knows their divisibility by 16 and keeps the masked loads along D vectorized."""
    if k == 0:
        r = b0
    elif k == 1:
        r = b1
    elif k == 2:
        r = b2
    elif k == 3:
        r = b3
    elif k == 4:
        r = b4
    elif k == 5:
        r = b5
    elif k == 6:
        r = b6
    elif k == 7:
        r = b7
    else:
        r = b8
    return r


@triton.jit
def _bound_rt(k, b1, b2, b3, b4, b5, b6, b7, b8):
    """bounds[k] for a runtime k in 1..8 (the single-loop Matryoshka path)."""
    r = tl.where(k == 1, b1, b8)
    r = tl.where(k == 2, b2, r)
    r = tl.where(k == 3, b3, r)
    r = tl.where(k == 4, b4, r)
    r = tl.where(k == 5, b5, r)
    r = tl.where(k == 6, b6, r)
    r = tl.where(k == 7, b7, r)
    return r


@triton.jit
def _logits2(
    acc, a_ptr, b_ptr, thr_ptr, k, M, NC, rows, cols, rmask, cmask, is_spec, EXCL: tl.constexpr,
    HAS_THR: tl.constexpr,
):
    """Base-2 logits of dim k for the tile and the mask of the kept entries. The margin and the exclusion
    are compile-time switches: without them the mask is the bounds check alone."""
    a = tl.load(a_ptr + k * M + rows, mask=rmask, other=0.0)
    b = tl.load(b_ptr + k * NC + cols, mask=cmask, other=0.0)
    z2 = acc * a[:, None] * b[None, :]
    valid = rmask[:, None] & cmask[None, :]
    if HAS_THR:
        thr = tl.load(thr_ptr + k * M + rows, mask=rmask, other=0.0)
        valid = valid & (~(z2 > thr[:, None]) | is_spec)  # a NaN logit is kept: it poisons the loss
    if EXCL:
        valid = valid & ~is_spec
    return z2, valid, a, b


@triton.jit
def _col_valid(z2, thr_ptr, k, M, ncol, rows, cols, rmask, is_spec, TRI: tl.constexpr, HAS_THR: tl.constexpr):
    """Kept entries of the column term: column i < ncol belongs to row i of the term (COLS: query i, whose
    positive is the diagonal; TRI: the row's own self-term entry, upper triangle only), its false-negative
    threshold is row i's."""
    ccol = cols < ncol
    keep = rmask[:, None] & ccol[None, :]
    if HAS_THR:
        thr_c = tl.load(thr_ptr + k * M + cols, mask=ccol, other=0.0)
        keep = keep & (~(z2 > thr_c[None, :]) | is_spec)
    if TRI:
        keep = keep & (cols[None, :] > rows[:, None])
    return keep


@triton.jit
def _tri_rows(valid, rows, cols, ncol, TRI: tl.constexpr):
    """TRI: each pair (i, j < ncol) of the symmetric square is taken once, in the row with i < j (its column
    side feeds row j); the columns beyond the square stay row-only."""
    if TRI:
        valid = valid & ((cols[None, :] > rows[:, None]) | (cols[None, :] >= ncol))
    return valid


@triton.jit
def _lse_update(
    acc, k, m_st, l_st, kk, a_ptr, b_ptr, thr_ptr, colpart_ptr, colpart_row, M, NC, rows, cols, rmask,
    cmask, is_spec, ncol, COLS: tl.constexpr, TRI: tl.constexpr, EXCL: tl.constexpr, HAS_THR: tl.constexpr,
):
    """Dim k's step of the forward for one tile: the online max / sum-of-exp2 state [BLOCK_M, KP] of each
    row (returned), and with a column term this tile's log-sum-exp down its columns (stored)."""
    z2, valid, a, b = _logits2(
        acc, a_ptr, b_ptr, thr_ptr, k, M, NC, rows, cols, rmask, cmask, is_spec, EXCL, HAS_THR
    )
    valid = _tri_rows(valid, rows, cols, ncol, TRI)
    if COLS or TRI:  # this tile's log-sum-exp down each of the first ncol columns
        valid_c = _col_valid(z2, thr_ptr, k, M, ncol, rows, cols, rmask, is_spec, TRI, HAS_THR)
        zc = tl.where(valid_c, z2, float("-inf"))
        mc = tl.max(zc, axis=0)
        mc_use = tl.where(tl.abs(mc) == float("inf"), 0.0, mc)
        lc = tl.sum(tl.exp2(zc - mc_use[None, :]), axis=0)
        lsec = mc_use + tl.log2(lc)  # an empty column: 0 + log2(0) = -inf; NaN and +inf pass through
        tl.store(colpart_ptr + (colpart_row + k).to(tl.int64) * ncol + cols, lsec, mask=(cols < ncol) & cmask)
    z2 = tl.where(valid, z2, float("-inf"))
    sel = kk[None, :] == k
    m_old = tl.max(tl.where(sel, m_st, float("-inf")), axis=1)
    l_old = tl.sum(tl.where(sel, l_st, 0.0), axis=1)
    m_new = tl.maximum(m_old, tl.max(z2, axis=1))
    m_use = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)  # +inf: the sum becomes inf, not NaN
    l_new = l_old * tl.exp2(m_old - m_use) + tl.sum(tl.exp2(z2 - m_use[:, None]), axis=1)
    m_st = tl.where(sel, m_new[:, None], m_st)
    l_st = tl.where(sel, l_new[:, None], l_st)
    return m_st, l_st


@triton.jit
def _row_lse_kernel(
    x_ptr,
    y_ptr,
    xidx_ptr,
    a_ptr,
    b_ptr,
    spec_ptr,
    thr_ptr,
    out_ptr,
    colpart_ptr,
    s_ptr,
    stride_sk,
    stride_sm,
    M,
    NC,
    r0,
    Mc,
    cols_per_split,
    stride_x,
    stride_y,
    gather,
    ncol,
    b0,
    b1,
    b2,
    b3,
    b4,
    b5,
    b6,
    b7,
    b8,
    K: tl.constexpr,
    KP: tl.constexpr,
    COLS: tl.constexpr,
    TRI: tl.constexpr,
    EXCL: tl.constexpr,
    HAS_THR: tl.constexpr,
    SINGLE: tl.constexpr,
    PRE_S: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    local = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rows = r0 + local
    rmask = (local < Mc) & (rows < M)
    # tl.where, not rmask & (gather != 0): Triton 3.9's interpreter splats a scalar comparison as int32
    gmask = tl.where(gather != 0, rmask, False)
    xrow = tl.where(gather != 0, tl.load(xidx_ptr + rows, mask=gmask, other=0).to(tl.int64), rows)
    x_base = x_ptr + xrow[:, None] * stride_x
    spec = tl.load(spec_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    kk = tl.arange(0, KP)
    m_st = tl.full([BLOCK_M, KP], float("-inf"), tl.float32)
    l_st = tl.zeros([BLOCK_M, KP], tl.float32)
    c_lo = pid_s * cols_per_split
    c_hi = tl.minimum(c_lo + cols_per_split, NC)
    if TRI:  # column tiles left of the block's diagonal hold only pairs another block takes
        c_lo = tl.maximum(c_lo, (r0 + pid_m * BLOCK_M) // BLOCK_N * BLOCK_N)
    for n0 in range(c_lo, c_hi, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < c_hi
        y_base = y_ptr + cols[None, :] * stride_y
        is_spec = cols[None, :] == spec[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if SINGLE:  # one pipelined loop over D; dim k's update where its range ends (bounds % BLOCK_D == 0)
            k = 0
            nxt = b1
            for d0 in range(0, b8, BLOCK_D):
                acc = _dot_step(acc, x_base, y_base, rmask, cmask, d0, b8, UPCAST, PRECISION, BLOCK_D)
                if d0 + BLOCK_D >= nxt:
                    m_st, l_st = _lse_update(
                        acc, k, m_st, l_st, kk, a_ptr, b_ptr, thr_ptr, colpart_ptr, pid_m * K, M,
                        NC, rows, cols, rmask, cmask, is_spec, ncol, COLS, TRI, EXCL, HAS_THR,
                    )
                    k += 1
                    nxt = _bound_rt(k + 1, b1, b2, b3, b4, b5, b6, b7, b8)
        else:
            for k in tl.static_range(K):
                lo = _bound(k, b0, b1, b2, b3, b4, b5, b6, b7, b8)
                hi = _bound(k + 1, b0, b1, b2, b3, b4, b5, b6, b7, b8)
                acc = _logit_dots(
                    acc, s_ptr, k, stride_sk, stride_sm, local, cols, x_base, y_base, rmask, cmask, lo, hi,
                    PRE_S, UPCAST, PRECISION, BLOCK_D,
                )
                m_st, l_st = _lse_update(
                    acc, k, m_st, l_st, kk, a_ptr, b_ptr, thr_ptr, colpart_ptr, pid_m * K, M, NC,
                    rows, cols, rmask, cmask, is_spec, ncol, COLS, TRI, EXCL, HAS_THR,
                )
    # an empty row: m = -inf, l = 0, lse = -inf; NaN and +inf pass through
    lse = tl.where(l_st == 0, float("-inf"), m_st + tl.log2(l_st))
    ptrs = out_ptr + pid_s.to(tl.int64) * K * M + kk[None, :].to(tl.int64) * M + rows[:, None]
    tl.store(ptrs, lse, mask=rmask[:, None] & (kk[None, :] < K))


@triton.jit
def _grad_g(z2, valid, is_spec, lse_ptr, w_ptr, k, M, rows, rmask, EXCL: tl.constexpr):
    """g = w * (exp2(z2 - lse) on kept entries - [positive]): the gradient w.r.t. the natural logit."""
    lse = tl.load(lse_ptr + k * M + rows, mask=rmask, other=0.0)
    w = tl.load(w_ptr + k * M + rows, mask=rmask, other=0.0)
    p = tl.where(valid, tl.exp2(z2 - lse[:, None]), 0.0)
    if EXCL:
        return w[:, None] * p
    return w[:, None] * (p - tl.where(is_spec, 1.0, 0.0))


@triton.jit
def _grad_g_cols(
    g, z2, is_spec, rmask, rows, cols, k, M, ncol, thr_ptr, clse_ptr, w_ptr, TRI: tl.constexpr,
    HAS_THR: tl.constexpr,
):
    """Adds the column term's gradient in column i < ncol: w_i * (exp2(z2 - clse_i) on kept entries), minus
    w_i on the diagonal (COLS: query i's positive; TRI has no positive there)."""
    ccol = cols < ncol
    lse_c = tl.load(clse_ptr + k * ncol + cols, mask=ccol, other=0.0)
    w_c = tl.load(w_ptr + k * M + cols, mask=ccol, other=0.0)
    valid_c = _col_valid(z2, thr_ptr, k, M, ncol, rows, cols, rmask, is_spec, TRI, HAS_THR)
    pc = tl.where(valid_c, tl.exp2(z2 - lse_c[None, :]), 0.0)
    if TRI:
        return g + w_c[None, :] * pc
    return g + w_c[None, :] * (pc - tl.where(is_spec, 1.0, 0.0))


@triton.jit
def _grad_dim(
    acc, k, a_ptr, b_ptr, thr_ptr, lse_ptr, w_ptr, clse_ptr, rs_col, cs_row, Mc, n_hcols, M, NC, rows, cols,
    rmask, cmask, tile_mask, is_spec, ncol, COLS: tl.constexpr, TRI: tl.constexpr, EXCL: tl.constexpr,
    HAS_THR: tl.constexpr,
):
    """Dim k's step of the backward for one tile: stores the row and column sums of g * z and returns dim
    k's gradient tile g * scales (float32)."""
    z2, valid, a, b = _logits2(
        acc, a_ptr, b_ptr, thr_ptr, k, M, NC, rows, cols, rmask, cmask, is_spec, EXCL, HAS_THR
    )
    valid = _tri_rows(valid, rows, cols, ncol, TRI)
    g = _grad_g(z2, valid, is_spec, lse_ptr, w_ptr, k, M, rows, rmask, EXCL)
    if COLS or TRI:
        g = _grad_g_cols(
            g, z2, is_spec, rmask, rows, cols, k, M, ncol, thr_ptr, clse_ptr, w_ptr, TRI, HAS_THR
        )
    g = tl.where(tile_mask, g, 0.0)
    gz = g * z2 * 0.6931471805599453
    tl.store(rs_col + k * Mc, tl.sum(gz, axis=1), mask=rmask)
    tl.store(cs_row + k * n_hcols, tl.sum(gz, axis=0), mask=cmask)
    return g * (a[:, None] * 0.6931471805599453) * b[None, :]


@triton.jit
def _grad_tile_kernel(
    x_ptr,
    y_ptr,
    xidx_ptr,
    a_ptr,
    b_ptr,
    spec_ptr,
    thr_ptr,
    lse_ptr,
    w_ptr,
    clse_ptr,
    h_ptr,
    rs_ptr,
    cs_ptr,
    s_ptr,
    stride_sk,
    stride_sm,
    M,
    NC,
    r0,
    Mc,
    c0,
    stride_x,
    stride_y,
    stride_hk,
    stride_hm,
    gather,
    ncol,
    b0,
    b1,
    b2,
    b3,
    b4,
    b5,
    b6,
    b7,
    b8,
    K: tl.constexpr,
    COLS: tl.constexpr,
    TRI: tl.constexpr,
    EXCL: tl.constexpr,
    HAS_THR: tl.constexpr,
    SINGLE: tl.constexpr,
    PRE_S: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One grid axis (axis 1 of a CUDA grid stops at 65,535 blocks: 4.2M columns at BLOCK_N = 64); row blocks
    # vary fastest, the order of the (row block, column block) grid this replaces.
    pid = tl.program_id(0)
    n_rb = tl.cdiv(Mc, BLOCK_M)
    pid_m = pid % n_rb
    pid_n = pid // n_rb
    local = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rows = r0 + local
    rmask = (local < Mc) & (rows < M)
    ccols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # within H's columns [c0, NC)
    if TRI:
        cols = c0 + ccols
        n_hcols = NC - c0
    else:  # c0 = 0: one column vector fewer to keep live (it made the plain kernel spill)
        cols = ccols
        n_hcols = NC
    cmask = cols < NC
    # tl.where, not rmask & (gather != 0): Triton 3.9's interpreter splats a scalar comparison as int32
    gmask = tl.where(gather != 0, rmask, False)
    xrow = tl.where(gather != 0, tl.load(xidx_ptr + rows, mask=gmask, other=0).to(tl.int64), rows)
    x_base = x_ptr + xrow[:, None] * stride_x
    y_base = y_ptr + cols[None, :] * stride_y
    spec = tl.load(spec_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    is_spec = cols[None, :] == spec[:, None]
    h_tile = h_ptr + local[:, None] * stride_hm + ccols[None, :]
    tile_mask = rmask[:, None] & cmask[None, :]

    rs_col = rs_ptr + pid_n.to(tl.int64) * K * Mc + local
    cs_row = cs_ptr + pid_m.to(tl.int64) * K * n_hcols + ccols
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if SINGLE:  # one pipelined loop over D; dim k's tile where its range ends (bounds % BLOCK_D == 0)
        k = 0
        nxt = b1
        for d0 in range(0, b8, BLOCK_D):
            acc = _dot_step(acc, x_base, y_base, rmask, cmask, d0, b8, UPCAST, PRECISION, BLOCK_D)
            if d0 + BLOCK_D >= nxt:
                h = _grad_dim(
                    acc, k, a_ptr, b_ptr, thr_ptr, lse_ptr, w_ptr, clse_ptr, rs_col, cs_row, Mc, n_hcols, M,
                    NC, rows, cols, rmask, cmask, tile_mask, is_spec, ncol, COLS, TRI, EXCL, HAS_THR,
                )
                tl.store(h_tile + k * stride_hk, h.to(h_ptr.dtype.element_ty), mask=tile_mask)
                k += 1
                nxt = _bound_rt(k + 1, b1, b2, b3, b4, b5, b6, b7, b8)
        tl.debug_barrier()
        run = tl.load(h_tile + (K - 1) * stride_hk, mask=tile_mask, other=0.0).to(tl.float32)
    else:
        for k in tl.static_range(K):
            lo = _bound(k, b0, b1, b2, b3, b4, b5, b6, b7, b8)
            hi = _bound(k + 1, b0, b1, b2, b3, b4, b5, b6, b7, b8)
            acc = _logit_dots(
                acc, s_ptr, k, stride_sk, stride_sm, local, cols, x_base, y_base, rmask, cmask, lo, hi,
                PRE_S, UPCAST, PRECISION, BLOCK_D,
            )
            h = _grad_dim(
                acc, k, a_ptr, b_ptr, thr_ptr, lse_ptr, w_ptr, clse_ptr, rs_col, cs_row, Mc, n_hcols, M, NC,
                rows, cols, rmask, cmask, tile_mask, is_spec, ncol, COLS, TRI, EXCL, HAS_THR,
            )
            if k < K - 1:  # dim k's own tile; the suffix sums are formed below
                tl.store(h_tile + k * stride_hk, h.to(h_ptr.dtype.element_ty), mask=tile_mask)
        # The last dim's tile is still in registers.
        run = h
        tl.store(h_tile + (K - 1) * stride_hk, run.to(h_ptr.dtype.element_ty), mask=tile_mask)
        if K > 1:
            tl.debug_barrier()
    # H[r] = sum_{k >= r} h_k: the tiles were just written by this program and are read back from L2 (a
    # barrier makes every thread's stores visible to the others). One float32 tile stays live: a running
    # total across the dims spilled 1.2 KB per thread (K = 5, sm_90a).
    if K > 1:
        for i in tl.static_range(K - 1):
            r = K - 2 - i
            run += tl.load(h_tile + r * stride_hk, mask=tile_mask, other=0.0).to(tl.float32)
            tl.store(h_tile + r * stride_hk, run.to(h_ptr.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers. Inputs are already checked by llmembed_fast.ops.contrastive.
# ----------------------------------------------------------------------------------------------------


# Tile-config overrides per kernel ("lse", "grad": dicts of BLOCK_M, BLOCK_N, BLOCK_D, num_warps,
# num_stages), for benchmarks/gpu_suite.py's config sweep; empty = the defaults below.
CONFIG_OVERRIDE: dict[str, dict] = {}


def _config(
    dtype: torch.dtype,
    D: int,
    K: int,
    kernel: str = "lse",
    cols: bool = False,
    tri: bool = False,
    single: bool = False,
    pre_s: bool = False,
):
    """Tile sizes and launch options (a dict) of ``kernel`` ("lse" or "grad") for a term with K dims, with
    the symmetric column term (``cols``) or as a same-tower triangle (``tri``), Matryoshka dims on the
    single-loop path (``single``) or one loop per range. The interpreter wants few, large tiles; a GPU 64 -
    256 wide ones within the register file."""
    if kernel in CONFIG_OVERRIDE and not _interpreting():
        return dict(CONFIG_OVERRIDE[kernel])
    if _interpreting():
        return dict(
            BLOCK_M=32,
            BLOCK_N=32,
            BLOCK_D=max(16, min(128, triton.next_power_of_2(D))),
            num_warps=1,
            num_stages=1,
        )
    # Register budgets below were read from ptxas for sm_90a (benchmarks/kernel_codegen.py, no GPU needed):
    # every shipped config compiles without spills (bf16 and fp32; one dim or five; plain, cols, tri).
    if dtype == torch.float32:
        if K > 1 and kernel == "lse":  # 4 warps spill 276 B/thread at K = 5, a column term 24 more
            bd = 16 if (cols or tri) else 32
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=bd, num_warps=8, num_stages=2)
        if K > 1 and (cols or tri):  # 4 warps spill 168 - 1,088 B/thread
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=4, num_stages=3)
    if kernel == "lse" and K == 1 and not (cols or tri) and pre_s:
        # cuBLAS logits read from memory: 128 x 256 tiles spill 1,232 B/thread there, 128 x 128 none
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)
    if kernel == "lse" and K == 1 and not (cols or tri):
        # H200 sweep (benchmarks/RESULTS.md): 128x256 tiles cut the forward from 34 to 28.5 ms at
        # B = N = 65,536, D = 1024 and from 38 to 25 ms at 32,768 x 4096 (the gradient kernel is best at
        # 128x128). Not with the fused column term: with these tiles (and the 1 GiB budget) the symmetric loss
        # went from 124 to 148 ms.
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_D=64, num_warps=8, num_stages=3)
    if K > 1 and single:  # one pipelined loop: fewer live registers than one loop per range
        if kernel == "lse":
            bm = 64 if (cols or tri) else 128  # 128 x 128 with a column term spills 228 B/thread
            return dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)
        bn = 64 if tri else 128  # the triangle's 64 x 128 gradient tiles spill 344 B/thread
        return dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_D=64, num_warps=8, num_stages=3)
    if K > 1:
        # Matryoshka: one pipelined loop per dim range. 64-row tiles; the forward with 3 stages spills
        # (112 B/thread at K = 5), with 2 it does not. With a column term (cols, tri) 64 x 128 tiles spill
        # 124 - 1,228 B/thread, 64 x 64 none.
        if cols or tri:
            if kernel == "lse":
                return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=2)
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=3)
        if kernel == "lse" and pre_s:  # cuBLAS logits: 64 x 128 tiles spill 264 B/thread, 64 x 64 none
            return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=2 if kernel == "lse" else 3)
    if kernel == "lse" and tri:  # the triangle's masks: 128 x 128 tiles spill 240 B/thread
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)
    if kernel == "grad" and (cols or tri):  # the column term's second exp pass: 128 rows spill 564 B/thread
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)


def launch_config(dtype, D: int, bounds, kernel: str, cols: bool, tri: bool, pre_s: bool):
    """(tile config, single-loop path) of a launch: the single loop when the Matryoshka bounds allow it, with
    its own tiles and the widest BLOCK_D that divides the inner bounds."""
    K = len(bounds) - 1
    cfg = _config(dtype, D, K, kernel, cols=cols, tri=tri, single=True, pre_s=pre_s)
    single, block_d = _single_loop(bounds, cfg["BLOCK_D"], pre_s)
    if not single:
        cfg = _config(dtype, D, K, kernel, cols=cols, tri=tri, pre_s=pre_s)
        block_d = cfg["BLOCK_D"]
    return dict(cfg, BLOCK_D=block_d), single


def _meta(cfg: dict, K: int, x, allow_tf32: bool, cols: bool, tri: bool, exclude, thr2, single, pre_s):
    """The compile-time arguments and launch options both kernels take."""
    return dict(
        K=K,
        COLS=cols and not tri,
        TRI=tri,
        EXCL=bool(exclude),
        HAS_THR=thr2 is not None,
        SINGLE=single,
        PRE_S=pre_s,
        UPCAST=_upcast(x),
        PRECISION=_precision(x, allow_tf32),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )


def _precision(x: torch.Tensor, allow_tf32: bool) -> str:
    """tl.dot input precision: only float32 operands read it (TF32 tensor cores, or full-precision FMA)."""
    if _interpreting():
        return "ieee"
    return "ieee" if (x.dtype == torch.float32 and not allow_tf32) else "tf32"


def _upcast(x: torch.Tensor) -> bool:
    # the interpreter's bf16/fp16 dot is unreliable: compute it in float32 there
    return _interpreting() and x.dtype in (torch.bfloat16, torch.float16)


MAX_DIMS = 8  # Matryoshka dims a kernel takes (bounds are 9 integer arguments)
# Matryoshka terms whose inner bounds are multiples of 16 run one pipelined loop over D with each dim's
# update where its range ends (no pipeline restart per range; 167 - 226 registers instead of 255 on
# sm_90a); False keeps one loop per range (benchmarks time both).
MATRYOSHKA_SINGLE_LOOP = True


def _single_loop(bounds, block_d: int, pre_s: bool) -> tuple[bool, int]:
    """(use the single-loop path, its BLOCK_D): the widest BLOCK_D <= ``block_d`` (at least 16, the dot's
    minimum) dividing every inner Matryoshka bound; (False, block_d) for one dim, the cuBLAS-logits mode,
    or bounds that no such BLOCK_D divides."""
    inner = bounds[1:-1]
    if not inner or pre_s or not MATRYOSHKA_SINGLE_LOOP:
        return False, block_d
    bd = block_d
    while bd >= 16:
        if all(b % bd == 0 for b in inner):
            return True, bd
        bd //= 2
    return False, block_d


def _bound_args(bounds) -> list[int]:
    if len(bounds) - 1 > MAX_DIMS:
        raise ValueError(f"the Triton kernels take at most {MAX_DIMS} Matryoshka dims, got {len(bounds) - 1}")
    return list(bounds) + [bounds[-1]] * (MAX_DIMS + 1 - len(bounds))


def _thresholds(thr2, K: int, M: int, device) -> torch.Tensor:
    """False-negative thresholds [K, M] float32. Without a margin the kernels are compiled with
    HAS_THR=False and never read it: +inf, for safety."""
    if thr2 is None:
        return torch.full((K, M), float("inf"), dtype=torch.float32, device=device)
    return thr2.to(torch.float32).contiguous()


def grad_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """bf16 gradient tiles for bf16 inputs (bf16 GEMMs, float32 accumulation); float32 otherwise (fp16 tiles
    could underflow once scaled by 1/norms)."""
    return torch.bfloat16 if x_dtype == torch.bfloat16 else torch.float32


def logits_mode() -> str:
    """Where the tiles' dot products come from: "triton" (tl.dot inside the kernels, the default), "gemm"
    (cuBLAS computes a block of rows' float32 logits, the kernels read them) or "keep" (as "gemm", and the
    plain term's forward logits are kept for its backward when they fit KEEP_BUDGET_BYTES: three GEMMs per
    step instead of four, for 4 bytes per logit held between forward and backward). "gemm" and "keep" are
    opt-in while they are being measured. Read from ``LLMEMBED_FAST_CONTRASTIVE_LOGITS`` on every call."""
    mode = os.environ.get("LLMEMBED_FAST_CONTRASTIVE_LOGITS", "triton").strip().lower() or "triton"
    if mode not in ("triton", "gemm", "keep"):
        raise ValueError(f"LLMEMBED_FAST_CONTRASTIVE_LOGITS must be 'triton', 'gemm' or 'keep', got {mode!r}")
    return mode


def _gemm_logits() -> bool:
    return logits_mode() in ("gemm", "keep")


def chunk_rows(M: int, NC: int, K: int, h_itemsize: int, kept: bool = False) -> int:
    """Rows per backward block: all K gradient tiles (and, in "gemm"/"keep" mode unless the forward's logits
    were ``kept``, their float32 logits) within H_BUDGET_BYTES, a multiple of 128 rows."""
    per_elem = h_itemsize + (4 if _gemm_logits() and not kept else 0)
    rows = H_BUDGET_BYTES // max(1, NC * K * per_elem)
    rows = rows // 128 * 128 if rows >= 128 else max(1, rows)
    return min(M, rows)


def _lse2_merge(part: torch.Tensor) -> torch.Tensor:
    """log2(sum(exp2(part))) over dim 0, -inf where every part is -inf."""
    if part.shape[0] == 1:
        return part[0]
    m = part.amax(0)
    m_use = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m_use + torch.log2(torch.exp2(part - m_use).sum(0))


def _logits_block(x, y, x_index, r0: int, r1: int, bounds, allow_tf32: bool, out=None) -> torch.Tensor:
    """Prefix dot products of rows [r0, r1) with every column, per dim: float32 [K, r1 - r0, NC] (written into
    ``out`` when given, e.g. a view of the kept logits)."""
    rows = x[x_index[r0:r1]] if x_index is not None else x[r0:r1]
    K = len(bounds) - 1
    S = torch.empty(K, r1 - r0, y.shape[0], dtype=torch.float32, device=x.device) if out is None else out
    if not x.is_cuda:  # the interpreter: exact float32 products of bf16/fp16 operands
        rows, y = rows.float(), y.float()
    for k in range(K):
        lo, hi = bounds[k], bounds[k + 1]
        with tf32(allow_tf32):
            part = mm_f32(rows[:, lo:hi], y[:, lo:hi].T, torch.float32)
        if k == 0:
            S[0] = part
        else:
            torch.add(S[k - 1], part, out=S[k])
    return S


def row_lse(
    x,
    y,
    x_index,
    a2,
    b,
    special,
    exclude: bool,
    thr2,
    bounds,
    allow_tf32: bool = True,
    col_terms: int = 0,
    tri: bool = False,
    keep: dict | None = None,
):
    """Base-2 log-sum-exp per (dim, row) of a term: (float32 [K, M] (-inf where no entry is kept), column
    LSE [K, col_terms] or None). ``col_terms`` = n > 0 also reduces the first n columns down the rows (the
    symmetric term when column i is query i's positive and ``special`` is the diagonal). ``tri``: a
    symmetric self-term (see ``reference.contrastive_chunked.row_lse``), upper triangle only. ``keep``: a
    dict that receives "S", the term's float32 logits [K, M, NC], in "keep" mode when they fit
    KEEP_BUDGET_BYTES (pass them to ``grad_tiles`` as ``kept``)."""
    K = len(bounds) - 1
    M, NC = a2.shape[1], y.shape[0]
    if tri:
        col_terms = M
    gemm = _gemm_logits()
    kept = None
    if keep is not None and not tri and logits_mode() == "keep" and K * M * NC * 4 <= KEEP_BUDGET_BYTES:
        kept = keep["S"] = torch.empty(K, M, NC, dtype=torch.float32, device=x.device)
    cfg, single = launch_config(x.dtype, x.shape[1], bounds, "lse", col_terms > 0, tri, gemm)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    n_cb = triton.cdiv(NC, BN)
    step = M
    if gemm:  # row blocks whose float32 logits fit the budget
        step = min(step, H_BUDGET_BYTES // max(1, NC * K * 4))
    if col_terms:  # and whose column partials [row tiles, K, col_terms] fit theirs
        step = min(step, COL_PART_BUDGET_BYTES // max(1, K * col_terms * 4) * BM)
    step = max(BM, step // BM * BM)  # a multiple of the row tile
    blocks = [(r0, min(M, r0 + step)) for r0 in range(0, M, step)]
    n_rb_max = triton.cdiv(max(r1 - r0 for r0, r1 in blocks), BM)
    if LSE_SPLITS is not None:
        splits = max(1, min(n_cb, LSE_SPLITS))
    elif _interpreting():
        splits = 1
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = max(1, min(n_cb, triton.cdiv(2 * sms, n_rb_max)))
    cols_per_split = triton.cdiv(n_cb, splits) * BN
    splits = triton.cdiv(NC, cols_per_split)
    part = empty(splits, K, M, dtype=torch.float32, device=x.device)
    col_lse = None
    a2 = a2.to(torch.float32).contiguous()
    b = b.to(torch.float32).contiguous()
    thr = _thresholds(thr2, K, M, x.device)
    meta = _meta(cfg, K, x, allow_tf32, col_terms > 0, tri, exclude, thr2, single, gemm)
    for r0, r1 in blocks:
        S = (_logits_block(x, y, x_index, r0, r1, bounds, allow_tf32,
                           out=None if kept is None else kept[:, r0:r1]) if gemm else None)
        n_rb = triton.cdiv(r1 - r0, BM)
        if tri:  # tiles left of a block's diagonal are never visited: their column partials stay empty
            colpart = torch.full((n_rb, K, M), float("-inf"), dtype=torch.float32, device=x.device)
        else:
            colpart = empty(n_rb, K, col_terms, dtype=torch.float32, device=x.device) if col_terms else part
        _row_lse_kernel[(n_rb, splits)](
            x,
            y,
            x_index if x_index is not None else special,
            a2,
            b,
            special,
            thr,
            part,
            colpart,
            S if gemm else a2,
            S.stride(0) if gemm else 0,
            S.stride(1) if gemm else 0,
            M,
            NC,
            r0,
            r1 - r0,
            cols_per_split,
            x.stride(0),
            y.stride(0),
            int(x_index is not None),
            col_terms,
            *_bound_args(bounds),
            KP=triton.next_power_of_2(K),
            **meta,
        )
        del S
        if col_terms:
            merged = _lse2_merge(colpart)
            col_lse = merged if col_lse is None else torch.logaddexp2(col_lse, merged)
            del colpart
    if tri:
        return torch.logaddexp2(_lse2_merge(part), col_lse), None
    return _lse2_merge(part), col_lse


def grad_tiles(
    x,
    y,
    x_index,
    a2,
    b,
    special,
    exclude: bool,
    thr2,
    bounds,
    lse2,
    wrow,
    r0: int,
    r1: int,
    h_dtype: torch.dtype,
    allow_tf32: bool = True,
    col_lse2=None,
    tri: bool = False,
    kept=None,
):
    """Gradient tiles of rows [r0, r1): (H [K, r1-r0, NC - c0] of ``h_dtype``, row sums [K, r1-r0], column
    sums [K, NC - c0], float32), c0 = r0 with ``tri`` (else 0). Same contract as
    ``reference.contrastive_chunked.grad_tiles``. ``kept``: the term's logits kept by ``row_lse`` (read
    instead of recomputed)."""
    K = len(bounds) - 1
    M, NC = a2.shape[1], y.shape[0]
    Mc = r1 - r0
    c0 = r0 if tri else 0
    gemm = kept is not None or _gemm_logits()
    cfg, single = launch_config(x.dtype, x.shape[1], bounds, "grad", col_lse2 is not None, tri, gemm)
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    n_rb, n_cb = triton.cdiv(Mc, BM), triton.cdiv(NC - c0, BN)
    if kept is not None:
        S = kept[:, r0:r1]
    else:
        S = _logits_block(x, y, x_index, r0, r1, bounds, allow_tf32) if gemm else None
    H = empty(K, Mc, NC - c0, dtype=h_dtype, device=x.device)
    rs_part = empty(n_cb, K, Mc, dtype=torch.float32, device=x.device)
    cs_part = empty(n_rb, K, NC - c0, dtype=torch.float32, device=x.device)
    a2 = a2.to(torch.float32).contiguous()
    b = b.to(torch.float32).contiguous()
    thr = _thresholds(thr2, K, M, x.device)
    lse2 = lse2.to(torch.float32).contiguous()
    if tri:  # the column side of the pair (i, j) belongs to row j of the same term
        col_lse2 = lse2
    ncol = 0 if col_lse2 is None else col_lse2.shape[1]
    clse = col_lse2.to(torch.float32).contiguous() if col_lse2 is not None else a2
    _grad_tile_kernel[(n_rb * n_cb,)](
        x,
        y,
        x_index if x_index is not None else special,
        a2,
        b,
        special,
        thr,
        lse2,
        wrow.to(torch.float32).contiguous(),
        clse,
        H,
        rs_part,
        cs_part,
        S if gemm else a2,
        S.stride(0) if gemm else 0,
        S.stride(1) if gemm else 0,
        M,
        NC,
        r0,
        Mc,
        c0,
        x.stride(0),
        y.stride(0),
        H.stride(0),
        H.stride(1),
        int(x_index is not None),
        ncol,
        *_bound_args(bounds),
        **_meta(cfg, K, x, allow_tf32, ncol > 0, tri, exclude, thr2, single, gemm),
    )
    return H, rs_part.sum(0), cs_part.sum(0)
