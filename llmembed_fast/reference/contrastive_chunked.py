"""CPU backend of the contrastive loss: the launcher interface of ``triton_kernels.contrastive`` in torch.

Memory-bounded: similarities are built ``CHUNK_ELEMENTS`` at a time (a block of rows against all
columns), never the whole matrix; the backward recomputes each block. Computes in float32 (float64 for
float64 inputs); lower-precision inputs are upcast once, O((M + N) * D).

Terms. Both launchers work on one "term" of the loss: rows ``x`` (optionally gathered through
``x_index``) against columns ``y``, with per-row and per-column scales folded in:

    z2[k, i, j] = (x_i[:dk] . y_j[:dk]) * a2[k, i] * b[k, j]        (base-2 logits of Matryoshka dim k)

``special[i]`` is one column per row: the positive (kept even when it would be masked) or, with
``exclude``, a column left out (the row itself, for same-tower terms). With ``thr2`` ([K, M]) every
other column with z2 > thr2[k, i] is left out (false-negative masking). ``bounds`` = (0, d1, ..., dK).

``tri`` (same-tower terms in one process with labels = arange(M)): row i of the term is column i
(z2[k, i, j] = z2[k, j, i] for j < M) and ``special`` is the diagonal, left out. Each pair i < j < M is
computed once, in row i; its value also enters row j's log-sum-exp and gradient ("the column side").
Columns j >= M (hard negatives) stay row-only. Rows [r0, r1) then need only the columns from r0 on.
"""

from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 21  # similarities per forward block (8 MiB of float32 per temporary)
GRAD_CHUNK_ELEMENTS = 1 << 23  # per backward block: larger, so the columns' gradient is rewritten less often
LN2 = math.log(2.0)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(M: int, NC: int, K: int, h_itemsize: int, kept: bool = False) -> int:
    """Rows per backward block: the K gradient tiles of [rows, NC] stay within GRAD_CHUNK_ELEMENTS.
    (``kept``, like ``row_lse``'s ``keep`` and ``grad_tiles``' ``kept``: the Triton backend's kept logits;
    this backend keeps none.)"""
    return max(1, min(M, GRAD_CHUNK_ELEMENTS // max(1, NC * K)))


def tri_block_rows(M: int, rows: int) -> int:
    """Rows per block of a ``tri`` term: at most ``rows`` and at most an eighth of M (in multiples of 128
    once that is 128 or more), so the blocks' column ranges [r0, NC) follow the triangle to within M / 16."""
    cap = -(-M // 8)
    if cap >= 128:
        cap = -(-cap // 128) * 128
    return max(1, min(rows, cap))


def grad_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """dtype of the gradient tiles ``grad_tiles`` writes and the GEMMs that consume them."""
    return acc_dtype(x_dtype)


def _block_logits(x, y_acc, x_index, a2, b, special, exclude, thr2, bounds, r0, r1, y_scaled=None, n_cols=0):
    """Yields (k, z2, zc, raw) for each Matryoshka dim in order: z2 = the base-2 logits [r1-r0, NC] of rows
    [r0, r1), -inf where an entry is left out; zc, raw = None, or with ``n_cols`` > 0 the first n_cols columns
    masked for the column (symmetric) term instead, and the unmasked logits. The caller may modify them in
    place. ``y_scaled`` = y[:, :d1] * b[0] (one dim only) saves two passes over the block."""
    dt = y_acc.dtype
    idx = x_index[r0:r1] if x_index is not None else slice(r0, r1)
    xr = x[idx].to(dt)
    ar = torch.arange(r1 - r0, device=x.device)
    spec = special[r0:r1]
    K = len(bounds) - 1
    acc = None
    for k in range(K):
        lo, hi = bounds[k], bounds[k + 1]
        if K == 1 and y_scaled is not None:  # one dim: the scales are folded into the GEMM's operands
            z2 = (xr[:, lo:hi] * a2[0, r0:r1, None].to(dt)) @ y_scaled.T
        else:
            part = xr[:, lo:hi] @ y_acc[:, lo:hi].T
            acc = part if acc is None else acc.add_(part)
            z2 = acc if k == K - 1 else acc.clone()
            z2.mul_(a2[k, r0:r1, None].to(dt)).mul_(b[k, None, :].to(dt))
        zc = _column_view(z2, thr2, k, r0, r1, n_cols) if n_cols else None
        raw = z2.clone() if n_cols else None
        if thr2 is not None:
            keep = z2[ar, spec].clone()
            z2.masked_fill_(z2 > thr2[k, r0:r1, None].to(dt), float("-inf"))
            z2[ar, spec] = keep  # the positive always stays
        if exclude:
            z2[ar, spec] = float("-inf")
        yield k, z2, zc, raw


def _column_view(z2, thr2, k, r0, r1, n_cols):
    """The column term's logits of rows [r0, r1): column i < n_cols belongs to query i (its positive is the
    diagonal, its false-negative threshold query i's). A masked copy [r1-r0, n_cols]."""
    zc = z2[:, :n_cols].clone()
    if thr2 is not None:
        diag = torch.arange(r0, min(r1, n_cols), device=z2.device)
        keep = zc[diag - r0, diag].clone()
        zc.masked_fill_(zc > thr2[k, None, :n_cols].to(zc.dtype), float("-inf"))
        zc[diag - r0, diag] = keep
    return zc


def _lse2_rows(z: torch.Tensor, dim: int) -> torch.Tensor:
    """log2(sum(exp2(z))) along ``dim`` (-inf where all are -inf); consumes z."""
    m = z.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m.squeeze(dim) + torch.log2(z.sub_(m).exp2_().sum(dim=dim))


def _fold_columns(y_acc, b, bounds):
    """y[:, :d1] * b[0][:, None] when there is one dim (a copy, O(N * D)); None otherwise."""
    if len(bounds) != 2:
        return None
    return y_acc[:, : bounds[1]] * b[0, :, None].to(y_acc.dtype)


def _tri_block(x, y_acc, x_index, a2, b, thr2, bounds, r0, r1):
    """``tri`` terms: yields (k, z_row [r1-r0, NC-r0], z_col [r1-r0, M-r0], raw) for rows [r0, r1) against
    columns [r0, NC): z_row keeps j > i (and j >= M) under row i's threshold, z_col keeps j > i (j < M) under
    row j's threshold, raw is unmasked. Left-out entries are -inf."""
    M = a2.shape[1]
    dt = y_acc.dtype
    idx = x_index[r0:r1] if x_index is not None else slice(r0, r1)
    xr = x[idx].to(dt)
    yc = y_acc[r0:]
    i = torch.arange(r0, r1, device=x.device)[:, None]
    j = torch.arange(r0, y_acc.shape[0], device=x.device)[None, :]
    drop_row = (j <= i) & (j < M)  # the lower triangle and the diagonal (the row itself)
    drop_col = drop_row[:, : M - r0]
    acc = None
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        part = xr[:, lo:hi] @ yc[:, lo:hi].T
        acc = part if acc is None else acc.add_(part)
        raw = acc * a2[k, r0:r1, None].to(dt)
        raw.mul_(b[k, None, r0:].to(dt))
        if thr2 is None:
            z_row = raw.masked_fill(drop_row, float("-inf"))
            z_col = raw[:, : M - r0].masked_fill(drop_col, float("-inf"))
        else:
            z_row = raw.masked_fill(drop_row | (raw > thr2[k, r0:r1, None].to(dt)), float("-inf"))
            rc = raw[:, : M - r0]
            z_col = rc.masked_fill(drop_col | (rc > thr2[k, None, r0:M].to(dt)), float("-inf"))
        yield k, z_row, z_col, raw


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
    """(Base-2 log-sum-exp of each row's kept logits per dim [K, M] (-inf for a row with none kept), the
    column term's log-sum-exp down the first ``col_terms`` columns [K, col_terms] or None).

    The column term is the symmetric (document->query) direction when labels = arange(M) in one process:
    column i's entries are s(q_j, d_i) over the queries j, i.e. the rows of this term. ``tri``: see the
    module docstring (the rows' full log-sum-exp, from the upper triangle; no column term)."""
    M = a2.shape[1]
    if tri:
        return _row_lse_tri(x, y, x_index, a2, b, thr2, bounds), None
    dt = acc_dtype(x.dtype)
    y_acc = y.to(dt)
    K = len(bounds) - 1
    out = torch.empty(K, M, dtype=dt, device=x.device)
    cols = torch.full((K, col_terms), float("-inf"), dtype=dt, device=x.device) if col_terms else None
    y_scaled = _fold_columns(y_acc, b, bounds)
    step = max(1, CHUNK_ELEMENTS // max(1, y.shape[0]))
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        for k, z2, zc, _ in _block_logits(
            x, y_acc, x_index, a2, b, special, exclude, thr2, bounds, r0, r1, y_scaled, col_terms
        ):
            out[k, r0:r1] = _lse2_rows(z2, 1)
            if zc is not None:
                cols[k] = torch.logaddexp2(cols[k], _lse2_rows(zc, 0))
    return out, cols


def _row_lse_tri(x, y, x_index, a2, b, thr2, bounds):
    M, K = a2.shape[1], len(bounds) - 1
    dt = acc_dtype(x.dtype)
    y_acc = y.to(dt)
    rows = torch.full((K, M), float("-inf"), dtype=dt, device=x.device)
    cols = torch.full((K, M), float("-inf"), dtype=dt, device=x.device)
    step = tri_block_rows(M, max(1, CHUNK_ELEMENTS // max(1, y.shape[0])))
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        for k, z_row, z_col, _ in _tri_block(x, y_acc, x_index, a2, b, thr2, bounds, r0, r1):
            rows[k, r0:r1] = _lse2_rows(z_row, 1)
            cols[k, r0:] = torch.logaddexp2(cols[k, r0:], _lse2_rows(z_col, 0))
    return torch.logaddexp2(rows, cols)


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
    """Gradient tiles of rows [r0, r1) against every column (``tri``: the columns from c0 = r0 on, see the
    module docstring; every column index below is then relative to c0).

    With g[k, i, j] = wrow[k, i] * (p - [j == special_i and not exclude]) the gradient of the loss w.r.t.
    the natural logit z = z2 * ln2, where p = exp2(z2 - lse2[k, i]) on kept entries (0 elsewhere):
      H[r]  = sum_{k >= r} g[k] * a2[k, i] * b[k, j] * ln2      [K, r1-r0, NC] of ``h_dtype``
      rs[k] = sum_j g[k] * z                                      [K, r1-r0]
      cs[k] = sum_i g[k] * z                                      [K, NC]
    (rs and cs in float32, float64 for float64 inputs). H[r] multiplies the column range r of y (for the
    rows' gradient) and of x (for the columns'); rs/cs chain the gradient through the normalization.
    With ``col_lse2`` [K, n] the column term of ``row_lse(col_terms=n)`` is added to g: in column i < n,
    wrow[k, i] * (exp2(z2 - col_lse2[k, i]) on its kept entries - [row == i]). With ``tri`` the column side
    of pair (i, j) adds wrow[k, j] * exp2(z2 - lse2[k, j]) (no positive: the diagonal is left out).
    """
    if tri:
        return _grad_tiles_tri(x, y, x_index, a2, b, thr2, bounds, lse2, wrow, r0, r1, h_dtype)
    dt = acc_dtype(x.dtype)
    y_acc = y.to(dt)
    K = len(bounds) - 1
    NC = y.shape[0]
    H = torch.empty(K, r1 - r0, NC, dtype=h_dtype, device=x.device)
    rs = torch.empty(K, r1 - r0, dtype=dt, device=x.device)
    cs = torch.empty(K, NC, dtype=dt, device=x.device)
    ar = torch.arange(r1 - r0, device=x.device)
    spec = special[r0:r1]
    n = 0 if col_lse2 is None else col_lse2.shape[1]
    y_scaled = _fold_columns(y_acc, b, bounds)
    for k, z2, zc, raw in _block_logits(
        x, y_acc, x_index, a2, b, special, exclude, thr2, bounds, r0, r1, y_scaled, n
    ):
        w = wrow[k, r0:r1].to(dt)
        g = torch.sub(z2, lse2[k, r0:r1, None].to(dt)).exp2_().mul_(w[:, None])  # 0 where left out
        if not exclude:
            g[ar, spec] -= w
        if n:
            wc = wrow[k, :n].to(dt)
            gc = zc.sub_(col_lse2[k, None, :].to(dt)).exp2_().mul_(wc[None, :])
            diag = torch.arange(r0, min(r1, n), device=x.device)
            gc[diag - r0, diag] -= wc[diag]
            g[:, :n] += gc
            z2 = raw  # the column term keeps entries the rows' masks dropped
        elif exclude or thr2 is not None:
            z2.clamp_(min=-1e30)  # left-out entries have g = 0; keep g * z finite there
        gz = z2.mul_(g)
        rs[k] = gz.sum(dim=1).mul_(LN2)
        cs[k] = gz.sum(dim=0).mul_(LN2)
        torch.mul(g, (a2[k, r0:r1, None].to(dt) * LN2), out=H[k])
        H[k].mul_(b[k, None, :].to(dt))
    for r in range(K - 2, -1, -1):  # suffix sums: range r gets every dim k >= r
        H[r] += H[r + 1]
    return H, rs, cs


def _grad_tiles_tri(x, y, x_index, a2, b, thr2, bounds, lse2, wrow, r0, r1, h_dtype):
    dt = acc_dtype(x.dtype)
    y_acc = y.to(dt)
    K, M = len(bounds) - 1, a2.shape[1]
    H = torch.empty(K, r1 - r0, y.shape[0] - r0, dtype=h_dtype, device=x.device)
    rs = torch.empty(K, r1 - r0, dtype=dt, device=x.device)
    cs = torch.empty(K, y.shape[0] - r0, dtype=dt, device=x.device)
    for k, z_row, z_col, raw in _tri_block(x, y_acc, x_index, a2, b, thr2, bounds, r0, r1):
        g = z_row.sub_(lse2[k, r0:r1, None].to(dt)).exp2_().mul_(wrow[k, r0:r1, None].to(dt))
        gc = z_col.sub_(lse2[k, None, r0:M].to(dt)).exp2_().mul_(wrow[k, None, r0:M].to(dt))
        g[:, : M - r0] += gc
        gz = raw.mul_(g)
        rs[k] = gz.sum(dim=1).mul_(LN2)
        cs[k] = gz.sum(dim=0).mul_(LN2)
        torch.mul(g, (a2[k, r0:r1, None].to(dt) * LN2), out=H[k])
        H[k].mul_(b[k, None, r0:].to(dt))
    for r in range(K - 2, -1, -1):
        H[r] += H[r + 1]
    return H, rs, cs
