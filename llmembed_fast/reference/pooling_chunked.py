"""CPU backend of the embedding head: the launcher interface of ``triton_kernels.pooling`` in plain torch.

Memory-bounded: no [B, L, H] temporaries beyond the output itself. Float32/float64 hidden states are
pooled with one batched matmul per call; float16/bfloat16 ones are upcast in token chunks of at most
``CHUNK_ELEMENTS`` elements so the sums accumulate in float32.
"""

from __future__ import annotations

import torch

from llmembed_fast._poison import empty
from llmembed_fast.reference.pooling import pooling_weights

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 per temporary chunk


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(rows_elems: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, rows_elems))


def _row_info(mask: torch.Tensor) -> torch.Tensor:
    """(count, first, last) pooled positions per row, int32 [B, 3]; first = L, last = -1 when empty."""
    L = mask.shape[1]
    m = mask != 0
    pos = torch.arange(L, device=mask.device)
    first = torch.where(m, pos, L).amin(1) if L else torch.full((mask.shape[0],), L, device=mask.device)
    last = torch.where(m, pos, -1).amax(1) if L else torch.full((mask.shape[0],), -1, device=mask.device)
    return torch.stack([m.sum(1), first, last], 1).to(torch.int32)


def _masked_max(h: torch.Tensor, m: torch.Tensor, acc: torch.dtype):
    """h [B, L, D], m bool [B, L] -> (max [B, D] in acc dtype, first argmax along L as int64 [B, D])."""
    B, L, D = h.shape
    best = torch.full((B, D), float("-inf"), dtype=acc, device=h.device)
    arg = torch.full((B, D), -1, dtype=torch.int64, device=h.device)
    step = _chunk_rows(B * D)
    for l0 in range(0, L, step):
        x = h[:, l0 : l0 + step].to(acc).masked_fill(~m[:, l0 : l0 + step, None], float("-inf"))
        cmax, carg = x.max(dim=1)  # first occurrence within the chunk (a NaN counts as the maximum)
        better = (cmax > best) | (cmax.isnan() & ~best.isnan())  # NaN propagates, as in torch.amax
        best = torch.where(better, cmax, best)
        arg = torch.where(better, carg + l0, arg)
    return best, arg


def pool_forward(hidden: torch.Tensor, mask: torch.Tensor, mode: str, D: int):
    """Same contract as ``triton_kernels.pooling.pool_forward`` (pooled in float32, float64 for float64)."""
    B, L, _ = hidden.shape
    acc = _acc_dtype(hidden.dtype)
    h = hidden[..., :D]
    info = _row_info(mask)
    nonempty = (info[:, 0] > 0)[:, None]
    argmax = None
    if mode in ("first", "last"):
        idx = info[:, 1 if mode == "first" else 2].long().clamp(0, max(L - 1, 0))
        pooled = h[torch.arange(B, device=h.device), idx].to(acc) if L else h.new_zeros(B, D, dtype=acc)
        pooled = torch.where(nonempty, pooled, torch.zeros_like(pooled))
    elif mode == "max":
        best, arg = _masked_max(h, mask != 0, acc)
        arg = torch.where(arg < 0, info[:, 1:2].long(), arg)  # every pooled value -inf: the first pooled one
        pooled = torch.where(nonempty, best, torch.zeros_like(best))
        argmax = torch.where(nonempty, arg, -1).to(torch.int32)
    else:
        w = pooling_weights(mask, mode, acc)
        pooled = _weighted_sum(w, h, acc)
        # A weight of 0 times a finite value adds nothing, but times NaN/inf (left padding of a half-precision
        # model can hold those) it poisons the row: such rows are summed again over their pooled tokens only.
        bad = ~pooled.isfinite().all(1)
        if bool(bad.any()):
            rows = bad.nonzero().squeeze(1)
            pooled[rows] = _weighted_sum(w[rows], h, acc, rows=rows, keep=mask[rows] != 0)
    return pooled.contiguous(), info, argmax


def _weighted_sum(w: torch.Tensor, h: torch.Tensor, acc: torch.dtype, rows=None, keep=None) -> torch.Tensor:
    """sum_l w[r, l] h[rows[r], l, :] in ``acc`` (``rows`` None: every row in order); with ``keep``
    [R, L] bool, over those tokens only (the others zeroed, so a NaN there adds nothing). One batched matmul
    when nothing needs converting, selecting or masking; else token chunks of bounded size (no [R, L, D]
    temporary)."""
    if rows is None and keep is None and h.dtype == acc:
        return torch.bmm(w.unsqueeze(1), h).squeeze(1)
    R, L = w.shape
    D = h.shape[2]
    pooled = torch.zeros(R, D, dtype=acc, device=h.device)
    step = _chunk_rows(R * D)
    for l0 in range(0, L, step):
        x = (h[:, l0 : l0 + step] if rows is None else h[rows, l0 : l0 + step]).to(acc)
        if keep is not None:
            x = x.masked_fill(~keep[:, l0 : l0 + step, None], 0)
        pooled += torch.bmm(w[:, None, l0 : l0 + step], x).squeeze(1)
        del x  # before the next chunk is made: one chunk alive at a time
    return pooled


def pool_backward(
    grad_pooled: torch.Tensor,
    mask: torch.Tensor,
    info: torch.Tensor,
    argmax,
    mode: str,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Same contract as ``triton_kernels.pooling.pool_backward``."""
    B, L, H = shape
    D = grad_pooled.shape[1]
    gh = empty(B, L, H, dtype=dtype, device=grad_pooled.device)
    if H > D:
        gh[..., D:] = 0
    if L == 0:  # no token: nothing to scatter to (the pooled rows were zeros)
        return gh
    if mode == "max":
        gh[..., :D] = 0
        valid = argmax >= 0
        src = torch.where(valid, grad_pooled, torch.zeros_like(grad_pooled)).to(dtype)
        gh[..., :D].scatter_(1, argmax.clamp_min(0).long().unsqueeze(1), src.unsqueeze(1))
        return gh
    w = pooling_weights(mask, mode, grad_pooled.dtype)
    step = _chunk_rows(B * D)
    for l0 in range(0, L, step):
        gh[:, l0 : l0 + step, :D] = w[:, l0 : l0 + step, None] * grad_pooled[:, None, :]
    return gh


def _pairs(starts: torch.Tensor, ends: torch.Tensor):
    """All (segment, token, rank-in-segment) triples, as int64 vectors."""
    lengths = (ends - starts).clamp_min(0)
    seg = torch.repeat_interleave(torch.arange(len(starts), device=starts.device), lengths)
    offsets = torch.cumsum(lengths, 0) - lengths
    rank = torch.arange(seg.numel(), device=starts.device) - offsets[seg]
    return seg, starts[seg] + rank, rank + 1, lengths


def _segment_weights(rank: torch.Tensor, n: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    n = n.to(dtype).clamp_min(1)
    if mode == "mean":
        return 1.0 / n
    if mode == "mean_sqrt_len":
        return n.rsqrt()
    if mode == "weighted_mean":
        return rank.to(dtype) / (n * (n + 1) / 2)
    if mode == "first":
        return (rank == 1).to(dtype)
    return (rank.to(dtype) == n).to(dtype)  # last


def segments_forward(hidden2d: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, mode: str, D: int):
    """Same contract as ``triton_kernels.pooling.segments_forward``."""
    S = starts.shape[0]
    acc = _acc_dtype(hidden2d.dtype)
    h = hidden2d[:, :D]
    if mode in ("first", "last"):  # one token read per segment (a 0 weight times another's NaN/inf is NaN)
        if h.shape[0] == 0:
            return torch.zeros(S, D, dtype=acc, device=h.device), None
        idx = (starts if mode == "first" else ends - 1).long().clamp(0, h.shape[0] - 1)
        pooled = h[idx].to(acc)
        return torch.where((ends > starts)[:, None], pooled, torch.zeros_like(pooled)), None
    seg, tok, rank, lengths = _pairs(starts, ends)
    pooled = torch.zeros(S, D, dtype=acc, device=h.device)
    step = _chunk_rows(D)
    if mode == "max":
        pooled.fill_(float("-inf"))
        for p0 in range(0, seg.numel(), step):
            s, t = seg[p0 : p0 + step], tok[p0 : p0 + step]
            pooled.scatter_reduce_(0, s[:, None].expand(-1, D), h[t].to(acc), "amax")
        argmax = torch.full((S, D), torch.iinfo(torch.int64).max, dtype=torch.int64, device=h.device)
        for p0 in range(0, seg.numel(), step):
            s, t = seg[p0 : p0 + step], tok[p0 : p0 + step]
            ht, ps = h[t].to(acc), pooled[s]
            hit = (ht == ps) | (ht.isnan() & ps.isnan())  # amax propagates NaN: its first position wins
            cand = torch.where(hit, t[:, None], torch.iinfo(torch.int64).max)
            argmax.scatter_reduce_(0, s[:, None].expand(-1, D), cand, "amin")
        empty = (lengths == 0)[:, None]
        pooled = torch.where(empty, torch.zeros_like(pooled), pooled)
        return pooled, torch.where(empty, -1, argmax).to(torch.int32)
    for p0 in range(0, seg.numel(), step):
        s, t = seg[p0 : p0 + step], tok[p0 : p0 + step]
        w = _segment_weights(rank[p0 : p0 + step], lengths[s], mode, acc)
        pooled.index_add_(0, s, h[t].to(acc) * w[:, None])
    return pooled, None


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
    """Same contract as ``triton_kernels.pooling.segments_backward``."""
    T, H = shape
    S, D = grad_pooled.shape
    gh = torch.zeros(T, H, dtype=grad_pooled.dtype, device=grad_pooled.device)
    if T == 0:  # no token: every segment was empty
        return gh.to(dtype)
    if mode == "max":
        valid = argmax >= 0
        src = torch.where(valid, grad_pooled, torch.zeros_like(grad_pooled))
        gh[:, :D].scatter_add_(0, argmax.clamp_min(0).long(), src)
        return gh.to(dtype)
    seg, tok, rank, lengths = _pairs(starts, ends)
    step = _chunk_rows(D)
    for p0 in range(0, seg.numel(), step):
        s, t = seg[p0 : p0 + step], tok[p0 : p0 + step]
        w = _segment_weights(rank[p0 : p0 + step], lengths[s], mode, grad_pooled.dtype)
        gh[:, :D].index_add_(0, t, grad_pooled[s] * w[:, None])
    return gh.to(dtype)


def l2_prefix_forward(x: torch.Tensor, d: int, out_dtype: torch.dtype, eps: float):
    """Same contract as ``triton_kernels.pooling.l2_prefix_forward``."""
    acc = _acc_dtype(x.dtype)
    xs = x[:, :d].to(acc)
    norms = torch.linalg.vector_norm(xs, dim=1)
    y = xs / norms.clamp_min(eps)[:, None]
    # no same-dtype .to(): under torch.compile, torch 2.11 lost the gradient of an autograd.Function output
    # that a no-op .to() returned (lf.l2_normalize / lf.matryoshka, traced on this path, got zero gradients)
    return (y if y.dtype == out_dtype else y.to(out_dtype)), norms


def l2_prefix_backward(
    x: torch.Tensor,
    grad_y: torch.Tensor,
    norms: torch.Tensor,
    d: int,
    grad_x: torch.Tensor,
    eps: float,
    accumulate: bool,
) -> None:
    """Same contract as ``triton_kernels.pooling.l2_prefix_backward``."""
    acc = _acc_dtype(x.dtype)
    xs = x[:, :d].to(acc)
    g = grad_y.to(acc)
    n = norms.to(acc)
    inv = 1.0 / n.clamp_min(eps)
    proj = torch.where(n > eps, (xs * g).sum(1) * inv * inv, torch.zeros_like(n))
    gx = (g - xs * proj[:, None]) * inv[:, None]
    if accumulate:
        grad_x[:, :d] += gx.to(grad_x.dtype)
    else:
        grad_x[:, :d] = gx.to(grad_x.dtype)
