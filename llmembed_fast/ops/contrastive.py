"""Fused contrastive (InfoNCE) loss with the options embedding models train with; O((B+N)*D) memory.

``contrastive_loss`` checks its arguments, picks a backend (Triton kernels on CUDA, the chunked torch
backend ``llmembed_fast.reference.contrastive_chunked`` on CPU) and runs ``_ContrastiveFunction``.

How it is computed. The loss is a sum of *terms*, each rows x columns of similarities:

    A  q  x d   positive = labels[i]        (always)
    B  q  x q   row i itself left out       (same_tower)
    C  d[labels] x d   the positive left out (same_tower)
    D  d[labels] x q   positive = i          (symmetric: the document->query direction)

A, B and C share one partition function per query; D has its own. With default labels in one process, D
rides on A's tiles (a column log-sum-exp), and B and C are symmetric: each pair is computed once, in the upper
triangle, and feeds both rows it belongs to (B needs only one process). Forward: per term, a flash-style pass
(``row_lse``) keeps an online max / log-sum-exp per row and Matryoshka dim and stores only that, never a
similarity matrix. Normalization and 1/temperature are per-row and per-column scales applied to the
float32 dot products, so no normalized copies are made. Backward: per term and per block of rows, the
tiles are recomputed and turned into the gradient of the logits (``grad_tiles``, one buffer bounded by
the backend's chunk size), then two GEMMs give the rows' and the columns' gradients; the gradient is
chained through the normalization with per-row/column sums, and summed over terms by autograd.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from llmembed_fast import _dispatch
from llmembed_fast._matmul import addmm_acc as _mm_acc
from llmembed_fast._matmul import mm_f32 as _mm_f32
from llmembed_fast._matmul import tf32 as _tf32
from llmembed_fast.ops._autograd import no_double_backward, op_context, saveable
from llmembed_fast.reference.contrastive_chunked import tri_block_rows

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Same-tower terms in one process are symmetric: compute each pair once (about half their work). False
# computes the full squares (benchmarks time both; tests check both against the reference).
SELF_TERM_TRIANGLES = True


class _Cfg(NamedTuple):
    bounds: tuple[int, ...]  # (0, d1, ..., dK)
    weights: tuple[float, ...]  # one per dim
    normalize: bool
    symmetric: bool
    same_tower: bool
    margin: float | None
    allow_tf32: bool
    eps: float
    fused_symmetric: bool = False  # labels = arange(B), one process: the symmetric term rides on term A
    tri_q: bool = False  # one process: the q-q same-tower term is symmetric, computed as a triangle
    tri_d: bool = False  # ... and with labels = arange(B), the d-d term too


class _Term(NamedTuple):
    x: str  # row source: "q" or "d" (local inputs)
    gather: bool  # rows are d[labels]
    y: str  # column source: "qc" or "dc" (global candidates / queries)
    exclude: bool  # special column is left out (True) or is the positive (False)
    special: str  # "labels" (global positive column) or "self" (global index of the query)
    group: int  # 0: query->document partition function, 1: document->query
    tri: bool = False  # symmetric self-term: upper triangle only (backends' ``tri``)


# ---------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------


def _check_embeddings(q, d) -> None:
    for name, x in (("q", q), ("d", d)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if q.dtype != d.dtype:
        raise TypeError(f"q and d must have the same dtype, got {q.dtype} and {d.dtype}")
    if q.device != d.device:
        raise ValueError(f"q is on {q.device} but d is on {d.device}")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"q and d must have the same embedding size D, got {q.shape[1]} and {d.shape[1]}")
    if q.shape[1] == 0:
        raise ValueError("q and d must have D >= 1 columns")
    if q.shape[0] == 0:
        raise ValueError("q must have at least one row (B >= 1)")
    if d.shape[0] < q.shape[0]:
        raise ValueError(
            f"d must have at least as many rows as q (N >= B), got N={d.shape[0]} < B={q.shape[0]}"
        )


def _check_labels(labels, B: int, device) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of ints or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must hold integers, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != B:
        raise ValueError(f"labels must have shape [B] = [{B}], got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but q is on {device}")
    return labels.long().contiguous()  # the kernels index labels as a dense vector


def _check_temperature(temperature, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (0-dim tensor on ``device``, the caller's tensor to check for > 0 or None)."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.dtype.is_floating_point:
            raise TypeError(f"temperature must be a float tensor, got {temperature.dtype}")
        if temperature.numel() != 1:
            raise ValueError(f"temperature must hold one value, got shape {tuple(temperature.shape)}")
        return temperature.reshape(()).to(device=device, dtype=dtype), temperature
    if not _is_real(temperature):
        raise TypeError(f"temperature must be a float or a tensor, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    t = torch.tensor(float(temperature), dtype=dtype)
    if not (float(t) > 0 and bool(torch.isfinite(1 / t))):  # 1 / t in the compute dtype
        raise ValueError(f"temperature={temperature!r} underflows in {dtype}: 1 / temperature is not finite")
    return t.to(device), None


def _is_real(v) -> bool:
    """A real number (python or numpy scalar; numpy's bool is neither), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_dims(dims, weights, D: int | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(dims, weights) checked; ``D`` None (a loss module's construction) skips the bound against D."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights needs matryoshka_dims")
        return (D,), (1.0,)
    if isinstance(dims, torch.Tensor):
        if dims.dtype.is_floating_point or dims.dtype == torch.bool or dims.is_complex() or dims.dim() > 1:
            raise TypeError(f"matryoshka_dims must be an int or a 1-D tensor of ints, got {dims.dtype} "
                            f"of shape {tuple(dims.shape)}")
        dims = dims.tolist()  # 0-d: an int, 1-d: a list
    if isinstance(dims, np.ndarray):
        if dims.dtype.kind not in "iu" or dims.ndim > 1:
            raise TypeError(f"matryoshka_dims must be an int or a 1-D array of ints, got {dims.dtype} "
                            f"of shape {dims.shape}")
        dims = dims.tolist()
    if _is_int(dims):
        dims = (int(dims),)
    if not isinstance(dims, Sequence) or isinstance(dims, str):
        raise TypeError(f"matryoshka_dims must be a sequence of ints, got {type(dims).__name__}")
    dims = tuple(dims)
    if not dims:
        raise ValueError("matryoshka_dims must not be empty")
    for v in dims:
        if not _is_int(v):
            raise TypeError(f"matryoshka_dims must hold ints, got {v!r}")
    dims = tuple(int(v) for v in dims)
    for v in dims:
        if v < 1 or (D is not None and v > D):
            raise ValueError(f"matryoshka_dims values must be in [1, D={D}], got {v}")
    if any(b <= a for a, b in zip(dims, dims[1:], strict=False)):
        raise ValueError(f"matryoshka_dims must be strictly increasing, got {list(dims)}")
    if weights is None:
        return dims, (1.0,) * len(dims)
    if isinstance(weights, (torch.Tensor, np.ndarray)):
        weights = weights.tolist()
    if not isinstance(weights, Sequence) or isinstance(weights, str):
        raise TypeError(f"matryoshka_weights must be a sequence of numbers, got {type(weights).__name__}")
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights must have one weight per dim ({len(dims)}), got {len(weights)}")
    for w in weights:
        if not _is_real(w):
            raise TypeError(f"matryoshka_weights must hold numbers, got {w!r}")
        if not math.isfinite(w):
            raise ValueError(f"matryoshka_weights must hold finite numbers, got {w!r}")
        if w < 0:  # a negative weight maximizes that prefix's loss: retrieval there trained to get worse
            raise ValueError(f"matryoshka_weights must be >= 0, got {w!r}")
    return dims, tuple(float(w) for w in weights)


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_options(
    *, normalize, symmetric, same_tower, allow_tf32, false_negative_margin, reduction, eps=1e-12
) -> dict:
    """The loss's scalar options checked (TypeError / ValueError naming the argument), as a dict of the
    normalized values; shared with ``ContrastiveLoss``, which checks them at construction."""
    for value, name in ((normalize, "normalize"), (symmetric, "symmetric"), (same_tower, "same_tower"),
                        (allow_tf32, "allow_tf32")):
        _check_flag(value, name)
    if false_negative_margin is not None:
        if not _is_real(false_negative_margin):
            raise TypeError(
                f"false_negative_margin must be None or a number, got {type(false_negative_margin).__name__}"
            )
        if not math.isfinite(false_negative_margin):
            raise ValueError(f"false_negative_margin must be finite, got {false_negative_margin!r}")
        false_negative_margin = float(false_negative_margin)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not _is_real(eps):
        raise TypeError(f"eps must be a positive number, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return dict(normalize=normalize, symmetric=symmetric, same_tower=same_tower, allow_tf32=allow_tf32,
                false_negative_margin=false_negative_margin, reduction=reduction, eps=float(eps))


def _backend(q: torch.Tensor, n_dims: int = 1):
    """The chunked torch backend for float64, on CPU, or beyond the kernels' Matryoshka-dim limit (8)."""
    _dispatch.forced_backend()  # a bad LLMEMBED_FAST_BACKEND is an error for every dtype
    if q.dtype == torch.float64 or n_dims > 8 or _dispatch.select_backend(q) == "torch":
        from llmembed_fast.reference import contrastive_chunked

        return contrastive_chunked
    from llmembed_fast.triton_kernels import contrastive as triton_contrastive

    return triton_contrastive


# ---------------------------------------------------------------------------------------------------
# helpers shared by forward and backward
# ---------------------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_ROW_CHUNK_ELEMENTS = 1 << 22  # bound on the float32 temporaries of the O(n * D) prologue / epilogue


def _row_chunks(n: int, D: int):
    step = max(1, _ROW_CHUNK_ELEMENTS // max(1, D))
    return [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _prefix_dots(a: torch.Tensor, b: torch.Tensor, bounds, acc: torch.dtype, b_index=None) -> torch.Tensor:
    """sum(a[i, :dk] * b[j, :dk]), j = b_index[i] (or i), for each dim k: [K, n] in ``acc``, in row chunks."""
    out = torch.empty(len(bounds) - 1, a.shape[0], dtype=acc, device=a.device)
    for r0, r1 in _row_chunks(a.shape[0], a.shape[1]):
        pa = a[r0:r1].to(acc)
        pb = (b[r0:r1] if b_index is None else b[b_index[r0:r1]]).to(acc)
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            out[k, r0:r1] = (pa[:, lo:hi] * pb[:, lo:hi]).sum(1)
    return out.cumsum(0)


def _tie_slack(q, d, labels, cfg: _Cfg, pos_sim: torch.Tensor) -> torch.Tensor:
    """Similarity units [K, b] added to the false-negative threshold, so that a tie with the positive (an
    exact duplicate of it) stays as the definition says. u is the accumulation's unit roundoff:
    - 2 sqrt(d_k) u: a sum of d_k products taken in another order than the positive's, in units of the
      vectors' norms (1 for cosines, ||q_i|| ||d_p|| per prefix for raw dots);
    - 8 u (|s(q_i, d_p)| + |margin|): the scalings, which round differently on the two sides (tiles fold the
      norms, 1/t and log2 e into two factors; the threshold scales the positive's dot, adds the margin, then
      scales by log2 e); relative to the similarity at the threshold. They dominate for short prefixes
      (with d_k = 1 the dot order term alone dropped ties)."""
    acc = pos_sim.dtype
    u = 2.0**-53 if acc == torch.float64 else 2.0**-24
    dk = torch.tensor(cfg.bounds[1:], dtype=acc, device=pos_sim.device)[:, None]
    scaling = 8.0 * u * (pos_sim.abs() + abs(cfg.margin))
    order = 2.0 * u * dk.sqrt()
    if cfg.normalize:
        return order + scaling
    qn = _prefix_dots(q, q, cfg.bounds, acc).sqrt()
    dp = d[labels]
    dn = _prefix_dots(dp, dp, cfg.bounds, acc).sqrt()
    return order * qn * dn + scaling


def _inv_norms(x: torch.Tensor, bounds, normalize: bool, eps: float):
    """(1 / max(||x[:, :dk]||, eps) [K, n], ||x[:, :dk]|| > eps [K, n]); ones when not normalizing."""
    K, acc = len(bounds) - 1, _acc(x.dtype)
    if not normalize:
        ones = torch.ones(K, x.shape[0], dtype=acc, device=x.device)
        return ones, None
    n = _prefix_dots(x, x, bounds, acc).sqrt()
    return 1.0 / n.clamp_min(eps), n > eps


def _sub_scaled_rows(g: torch.Tensor, coef: torch.Tensor, x: torch.Tensor, bounds) -> None:
    """g[:, range r] -= coef[r][:, None] * x[:, range r] (the normalization's radial term), in row chunks."""
    for r0, r1 in _row_chunks(x.shape[0], x.shape[1]):
        xr = x[r0:r1].to(g.dtype)
        for r, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            g[r0:r1, lo:hi] -= coef[r, r0:r1, None] * xr[:, lo:hi]


def _suffix_sum(c: torch.Tensor) -> torch.Tensor:
    """[K, n] -> out[r] = sum_{k >= r} c[k] (range r of the columns collects every dim k >= r)."""
    return c.flip(0).cumsum(0).flip(0)


# ---------------------------------------------------------------------------------------------------
# the autograd Function
# ---------------------------------------------------------------------------------------------------


def _terms(cfg: _Cfg) -> list[_Term]:
    terms = [_Term("q", False, "dc", False, "labels", 0)]
    if cfg.same_tower:
        terms.append(_Term("q", False, "qc", True, "self", 0, cfg.tri_q))
        terms.append(_Term("d", True, "dc", True, "labels", 0, cfg.tri_d))
    if cfg.symmetric and not cfg.fused_symmetric:
        terms.append(_Term("d", True, "qc", False, "self", 1))
    return terms


class _ContrastiveFunction(torch.autograd.Function):
    """(q [b, D], d [n, D], qc [Bg, D] | None, dc [Ng, D], tau 0-dim) -> per-query loss [b] (float32/64).

    qc/dc are the columns: all ranks' queries/candidates (the same tensors as q/d in one process)."""

    @staticmethod
    @op_context
    def forward(ctx, q, d, qc, dc, tau, labels, labels_g, q_off, cfg, be):
        acc = _acc(q.dtype)
        b = q.shape[0]
        bounds = cfg.bounds
        inv_t = 1.0 / tau.detach().to(acc)
        alpha_q, act_q = _inv_norms(q, bounds, cfg.normalize, cfg.eps)
        alpha_d, act_d = _inv_norms(d, bounds, cfg.normalize, cfg.eps)
        beta_dc, act_dc = (alpha_d, act_d) if dc is d else _inv_norms(dc, bounds, cfg.normalize, cfg.eps)
        if qc is None:
            beta_qc, act_qc = None, None
        else:
            beta_qc, act_qc = (alpha_q, act_q) if qc is q else _inv_norms(qc, bounds, cfg.normalize, cfg.eps)
        alpha_dp = alpha_d[:, labels]
        dots = _prefix_dots(q, d, bounds, acc, b_index=labels)
        pos_sim = dots * alpha_q * alpha_dp  # [K, b] the positives' similarities
        pos = pos_sim * inv_t  # natural logits
        thr2 = None
        if cfg.margin is not None:
            thr2 = (pos + (cfg.margin + _tie_slack(q, d, labels, cfg, pos_sim)) * inv_t) * LOG2E
        scales = {"q": alpha_q * (inv_t * LOG2E), "d": alpha_dp * (inv_t * LOG2E)}
        cols = {"qc": beta_qc, "dc": beta_dc}
        special = {"labels": labels_g, "self": q_off + torch.arange(b, device=q.device)}
        src = {"q": q, "d": d, "qc": qc, "dc": dc}

        group_lse: list[torch.Tensor | None] = [None, None]
        keep: dict = {}  # the plain term's logits, when the backend keeps them for the backward
        for i, t in enumerate(_terms(cfg)):
            fused = cfg.fused_symmetric and i == 0  # column i of q x d is the positive of query i
            lse2, col_lse2 = be.row_lse(
                src[t.x],
                src[t.y],
                labels if t.gather else None,
                scales[t.x],
                cols[t.y],
                special[t.special],
                t.exclude,
                thr2,
                bounds,
                allow_tf32=cfg.allow_tf32,
                col_terms=b if fused else 0,
                tri=t.tri,
                keep=keep if i == 0 and any(ctx.needs_input_grad[:5]) else None,
            )
            if fused:
                group_lse[1] = col_lse2
            prev = group_lse[t.group]
            group_lse[t.group] = lse2 if prev is None else torch.logaddexp2(prev, lse2)
        w = torch.tensor(cfg.weights, dtype=acc, device=q.device)[:, None]
        f = 0.5 if cfg.symmetric else 1.0
        per_dim = group_lse[0] * LN2 - pos
        if cfg.symmetric:
            per_dim = per_dim + (group_lse[1] * LN2 - pos)
        loss = (f * w * per_dim).sum(0)

        ctx.save_for_backward(q, d, qc, dc, tau, labels, labels_g)
        ctx.stash = dict(
            alpha={"q": alpha_q, "d": alpha_dp},
            act={"q": act_q, "d": None if act_d is None else act_d[:, labels]},
            beta=cols,
            act_cols={"qc": act_qc, "dc": act_dc},
            scales=scales,
            thr2=thr2,
            group_lse=group_lse,
            inv_t=inv_t,
            q_off=q_off,
            kept=keep.get("S"),
        )
        ctx.cfg, ctx.be = cfg, be
        ctx.aliased = {"qc": qc is q, "dc": dc is d}  # one process: columns are the inputs themselves
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    @op_context
    def backward(ctx, g_loss):
        no_double_backward("lf.contrastive_loss")
        nones = (None,) * 10
        if g_loss is None:
            return nones
        q, d, qc, dc, tau, labels, labels_g = ctx.saved_tensors
        cfg, be, st = ctx.cfg, ctx.be, ctx.stash
        need = dict(zip(("q", "d", "qc", "dc", "tau"), ctx.needs_input_grad[:5], strict=False))
        acc = _acc(q.dtype)
        bounds = cfg.bounds
        K = len(bounds) - 1
        b = q.shape[0]
        src = {"q": q, "d": d, "qc": qc, "dc": dc}
        special = {"labels": labels_g, "self": st["q_off"] + torch.arange(b, device=q.device)}
        w = torch.tensor(cfg.weights, dtype=acc, device=q.device)[:, None]
        wrow = (0.5 if cfg.symmetric else 1.0) * w * g_loss.to(acc)[None, :]  # [K, b]
        grads = {
            k: torch.zeros(src[k].shape, dtype=acc, device=q.device) if need[k] else None for k in ("q", "d")
        }
        for col, row in (("qc", "q"), ("dc", "d")):
            if ctx.aliased[col]:  # accumulate rows' and columns' gradients in one buffer
                grads[col] = grads[row]
            else:
                grads[col] = torch.zeros(src[col].shape, dtype=acc, device=q.device) if need[col] else None
        colsum = {"qc": None, "dc": None}
        tau_acc = torch.zeros((), dtype=acc, device=q.device)
        gemm_ops: dict[str, torch.Tensor] = {}

        def gemm_operand(name: str, hdt: torch.dtype) -> torch.Tensor:
            key = f"{name}:{hdt}"
            if key not in gemm_ops:
                gemm_ops[key] = src[name] if src[name].dtype == hdt else src[name].to(hdt)
            return gemm_ops[key]

        with _tf32(cfg.allow_tf32):
            for i, t in enumerate(_terms(cfg)):
                col_lse2 = st["group_lse"][1] if (cfg.fused_symmetric and i == 0) else None
                need_rows, need_cols = need[t.x], need[t.y]
                if not (need_rows or need_cols or need["tau"]):
                    continue
                x, y = src[t.x], src[t.y]
                x_index = labels if t.gather else None
                hdt = be.grad_dtype(x.dtype)
                Y = gemm_operand(t.y, hdt)
                M, NC = b, y.shape[0]
                alpha, act = st["alpha"][t.x], st["act"][t.x]
                kept = st["kept"] if i == 0 else None
                step = be.chunk_rows(M, NC, K, torch.finfo(hdt).bits // 8, kept=kept is not None)
                if t.tri:  # each block computes columns [r0, NC): small blocks follow the triangle
                    step = tri_block_rows(M, step)
                for r0 in range(0, M, step):
                    r1 = min(M, r0 + step)
                    H, rs, cs = be.grad_tiles(
                        x,
                        y,
                        x_index,
                        st["scales"][t.x],
                        st["beta"][t.y],
                        special[t.special],
                        t.exclude,
                        st["thr2"],
                        bounds,
                        st["group_lse"][t.group],
                        wrow,
                        r0,
                        r1,
                        hdt,
                        allow_tf32=cfg.allow_tf32,
                        col_lse2=col_lse2,
                        tri=t.tri,
                        kept=kept,
                    )
                    c0 = r0 if t.tri else 0  # a triangle term's tiles start at the block's diagonal
                    rows = labels[r0:r1] if t.gather else slice(r0, r1)
                    Xc = x[rows]
                    if need_rows:
                        full = bounds[-1] == x.shape[1]  # else columns past the last dim: zero gradient
                        if K == 1 and full:  # one GEMM writes the block's row gradients
                            dX = _mm_f32(H[0], Y[c0:], acc)
                        else:  # the ranges are disjoint: each GEMM writes its own columns once
                            dX = (torch.empty if full else torch.zeros)(r1 - r0, x.shape[1], dtype=acc,
                                                                        device=q.device)
                            for r in range(K):
                                lo, hi = bounds[r], bounds[r + 1]
                                dX[:, lo:hi] = _mm_f32(H[r], Y[c0:, lo:hi], acc)
                        if cfg.normalize:
                            coef = alpha[:, r0:r1] ** 2 * rs
                            if act is not None:
                                coef = coef * act[:, r0:r1]
                            _sub_scaled_rows(dX, _suffix_sum(coef), Xc, bounds)
                        if t.gather:
                            grads[t.x].index_add_(0, labels[r0:r1], dX)
                        else:
                            grads[t.x][r0:r1] += dX
                    if need_cols:
                        Xg = Xc if Xc.dtype == hdt else Xc.to(hdt)
                        for r in range(K):
                            lo, hi = bounds[r], bounds[r + 1]
                            _mm_acc(grads[t.y][c0:, lo:hi], H[r].T, Xg[:, lo:hi])
                        if colsum[t.y] is None:
                            colsum[t.y] = torch.zeros(K, y.shape[0], dtype=cs.dtype, device=cs.device)
                        colsum[t.y][:, c0:] += cs
                    tau_acc = tau_acc + rs.sum()
                    del H
                if i == 0:
                    st["kept"] = kept = None  # freed now, not when the graph goes
        if cfg.normalize:
            for name in ("qc", "dc"):
                if grads[name] is None or colsum[name] is None:
                    continue
                coef = st["beta"][name] ** 2 * colsum[name]
                if st["act_cols"][name] is not None:
                    coef = coef * st["act_cols"][name]
                _sub_scaled_rows(grads[name], _suffix_sum(coef), src[name], bounds)
        out = [grads[k].to(src[k].dtype) if grads[k] is not None else None for k in ("q", "d", "qc", "dc")]
        for i, col in ((2, "qc"), (3, "dc")):
            if ctx.aliased[col]:
                out[i] = None  # already summed into the input's gradient
        g_tau = (-st["inv_t"] * tau_acc).to(tau.dtype) if need["tau"] else None
        return (*out, g_tau) + (None,) * 5


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------


def contrastive_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    temperature=0.05,
    normalize: bool = True,
    symmetric: bool = False,
    same_tower: bool = False,
    false_negative_margin: float | None = None,
    matryoshka_dims=None,
    matryoshka_weights=None,
    reduction: str = "mean",
    group=None,
    allow_tf32: bool = True,
    eps: float = 1e-12,
):
    """InfoNCE over in-batch (and hard) negatives, fused: memory O((B + N) * D), never O(B * N).

    Args:
        q: [B, D] queries (float32/float16/bfloat16; float64 runs on the torch backend).
        d: [N, D] candidates, N >= B, same dtype and device: the positives and every negative, e.g. the B
            positives followed by hard negatives (as sentence-transformers' MultipleNegativesRankingLoss).
        labels: [B] ints, the row of ``d`` holding query i's positive (default ``arange(B)``).
        temperature: float or tensor (gets a gradient when it requires one). ``scale=20`` == 0.05.
        normalize: cosine similarity (normalization fused, gradient included); else dot products.
        symmetric: average with the document->query term of each positive (over the queries), as
            MultipleNegativesSymmetricRankingLoss / CLIP.
        same_tower: add exp(s(q_i, q_j)/t) for j != i and exp(s(d_p, d_j)/t) for j != p to query i's
            partition function (GTE / Qwen3-Embedding).
        false_negative_margin: leave out every negative term (q-d, and q-q, d-d with ``same_tower``; q-d
            of the symmetric term) whose similarity exceeds the positive's s(q_i, d_p) by more than this.
            Ties stay (an exact duplicate of the positive is kept): a similarity within a few roundings of
            the threshold (u (2 sqrt(d) + 8 (|s(q_i, d_p)| + margin)) for a prefix of d dims and cosines,
            u = 2^-24, or 2^-53 for float64) counts as a tie; with ``normalize=False`` the sqrt(d) part is
            in units of ||q_i|| ||d_p||, so a margin smaller than that tolerance acts as 0. With TF32 dot
            products (float32 inputs, ``allow_tf32``) the tiles round far more coarsely and ties may fall
            either way.
        matryoshka_dims: increasing ints <= D: the loss is the weighted sum over these prefixes (each
            re-normalized), computed in one pass. ``matryoshka_weights`` default to 1.
        reduction: "mean" (over queries), "sum", or "none" (per-query losses [B]).
        group: a torch.distributed process group: every rank passes its own q, d; the candidates (and, for
            symmetric/same_tower, the queries) of all ranks take part, ``labels`` index the local d.
            The returned loss (mean/sum) is the global one on every rank; gradients w.r.t. each rank's q
            and d equal the global loss's. The temperature's gradient is this rank's share (they sum to
            the global one). DDP averages gradients over ranks, so multiply the loss by the world size to
            get the single-process gradients there.
        allow_tf32: float32 inputs use TF32 tensor cores on GPU (about 1e-3 relative error in the
            similarities); False computes in full float32. bf16/fp16 always use tensor cores with float32
            accumulation.
        eps: the normalization's clamp, x / max(||x||, eps) as ``F.normalize``.

    Returns:
        A scalar (float32; float64 for float64 inputs), or [B] for ``reduction="none"``.
    """
    # With a group, a rank whose inputs fail these checks must not leave the others waiting in the
    # collectives below: its error is shared (batch_layout) and every rank raises.
    if group is not None:
        from llmembed_fast import distributed as lfd

        lfd._check_group(group)
    failure = None
    try:
        _check_embeddings(q, d)
        B, D = q.shape
        labels_t = _check_labels(labels, B, q.device)
        acc = _acc(q.dtype)
        tau, tau_user = _check_temperature(temperature, q.device, acc)
        dims, weights = _check_dims(matryoshka_dims, matryoshka_weights, D)
        opts = check_options(normalize=normalize, symmetric=symmetric, same_tower=same_tower,
                             allow_tf32=allow_tf32, false_negative_margin=false_negative_margin,
                             reduction=reduction, eps=eps)
        false_negative_margin, eps = opts["false_negative_margin"], opts["eps"]

        # one host sync for the value checks
        flags = [torch.zeros((), dtype=torch.bool, device=q.device)] * 2
        if labels_t is not None:
            flags[0] = ((labels_t < 0) | (labels_t >= d.shape[0])).any()
        if tau_user is not None:
            ok = (torch.isfinite(tau_user.detach()) & (tau_user.detach() > 0)).all().to(q.device)
            flags[1] = ~(ok & torch.isfinite(1 / tau.detach()))  # a tiny one underflows in the compute dtype
        bad_labels, bad_tau = torch.stack(flags).tolist()
        if bad_labels:
            raise ValueError(f"labels must be in [0, N) = [0, {d.shape[0]})")
        if bad_tau:
            raise ValueError("temperature must be positive and finite, and 1 / temperature finite in the "
                             "compute dtype")
        if labels_t is None:
            labels_t = torch.arange(B, device=q.device)
    except (TypeError, ValueError) as exc:
        if group is None:
            raise
        failure = exc
    layout = None
    if group is not None:
        ok = failure is None
        try:
            layout = lfd.batch_layout(
                B if ok else 0, d.shape[0] if ok else 0, group=group,
                device=q.device if isinstance(q, torch.Tensor) else None,
                width=D if ok else 0, dtype=q.dtype if ok else None, ok=ok,
            )
        except ValueError:
            if failure is not None:
                raise failure from None
            raise

    cfg = _Cfg(
        bounds=(0, *dims),
        weights=weights,
        normalize=normalize,
        symmetric=symmetric,
        same_tower=same_tower,
        margin=false_negative_margin,
        allow_tf32=allow_tf32,
        eps=float(eps),
        fused_symmetric=symmetric and labels is None and group is None,
        tri_q=same_tower and group is None and SELF_TERM_TRIANGLES,
        tri_d=same_tower and labels is None and group is None and SELF_TERM_TRIANGLES,
    )
    be = _backend(q, len(dims))
    q, d, tau, labels_t = saveable(q, d, tau, labels_t)
    q = q if q.stride(-1) == 1 else q.contiguous()
    d = d if d.stride(-1) == 1 else d.contiguous()
    need_qc = symmetric or same_tower

    if group is None:
        rows_loss = _ContrastiveFunction.apply(
            q, d, q if need_qc else None, d, tau, labels_t, labels_t, 0, cfg, be
        )
        total_rows = B
    else:
        dc = lfd.all_gather_with_grad(d, group=group, sizes=layout.d_sizes)
        qc = lfd.all_gather_with_grad(q, group=group, sizes=layout.q_sizes) if need_qc else None
        rows_loss = _ContrastiveFunction.apply(
            q, d, qc, dc, tau, labels_t, labels_t + layout.d_offset, layout.q_offset, cfg, be
        )
        total_rows = layout.q_total
    if reduction == "none":
        return rows_loss
    loss = rows_loss.sum()
    if reduction == "mean":
        loss = loss / total_rows
    if group is not None:
        loss = lfd.global_value(loss, group=group)
    return loss


# Under torch.compile the loss runs eagerly behind a graph break: its memory-bounding loops over the rows run
# in Python, so a traced copy would be specialized to (and recompiled for) every new batch size.
contrastive_loss = _dispatch.compile_disabled(contrastive_loss)
