"""Reference embedding head, written for clarity (the oracle the fast paths are tested against).

Computes in float64 when given float64, else float32. Materializes freely; not for production use.
Every function returns a list with one tensor per Matryoshka dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dims_list(dims, H: int) -> list[int]:
    if dims is None:
        return [H]
    if isinstance(dims, int):
        return [dims]
    return list(dims)


def pooling_weights(mask: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-token weights [B, L] of the linear modes: pooled = sum_l w[b, l] * hidden[b, l].

    mean: 1/n; weighted_mean: rank/(n(n+1)/2) with rank 1, 2, ... among the row's pooled tokens;
    mean_sqrt_len: 1/sqrt(n); first/last: 1 at the first/last pooled token. Rows with n = 0 get zeros.
    """
    m = (mask != 0).to(dtype)
    n = m.sum(1, keepdim=True)
    safe = n.clamp_min(1)
    if mode == "mean":
        return m / safe
    if mode == "mean_sqrt_len":
        return m / safe.sqrt()
    if mode == "weighted_mean":
        return m * m.cumsum(1) / (safe * (safe + 1) / 2)
    if mode in ("first", "last"):
        L = mask.shape[1]
        if L == 0:
            return m
        pos = torch.arange(L, device=mask.device)
        keyed = torch.where(mask != 0, pos, L if mode == "first" else -1)
        idx = keyed.amin(1) if mode == "first" else keyed.amax(1)
        onehot = (pos[None, :] == idx[:, None]).to(dtype)
        return onehot * (n > 0).to(dtype)
    raise ValueError(f"no token weights for mode {mode!r}")


def _pool_rows(h: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """h [B, L, H] in compute dtype -> pooled [B, H]."""
    if mode == "max":
        m = mask != 0
        if h.shape[1] == 0:
            return h.new_zeros(h.shape[0], h.shape[2])
        x = h.masked_fill(~m[..., None], float("-inf"))
        best, idx = x.max(dim=1)  # first position of the maximum
        # a column whose pooled values are all -inf: its first pooled token (max's first -inf may be padding)
        pos = torch.arange(h.shape[1], device=h.device)
        first = torch.where(m, pos, h.shape[1]).amin(1).clamp(max=h.shape[1] - 1)
        idx = torch.where(best == float("-inf"), first[:, None], idx)
        pooled = h.gather(1, idx[:, None, :]).squeeze(1)
        return torch.where(m.any(1, keepdim=True), pooled, torch.zeros_like(pooled))
    w = pooling_weights(mask, mode, h.dtype)
    # tokens of weight 0 are not read: zeroed, so a NaN/inf there cannot reach the sum through 0 * x (padding,
    # and for first/last every pooled token but the one they take)
    return (w[..., None] * h.masked_fill((w == 0)[..., None], 0)).sum(1)


def _finish(pooled: torch.Tensor, dims, normalize: bool, eps: float) -> list[torch.Tensor]:
    outs = []
    for d in _dims_list(dims, pooled.shape[1]):
        y = pooled[:, :d]
        outs.append(F.normalize(y, dim=-1, eps=eps) if normalize else y)
    return outs


def pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    mode: str = "mean",
    dims=None,
    normalize: bool = False,
    eps: float = 1e-12,
) -> list[torch.Tensor]:
    """hidden [B, L, H], mask [B, L] (nonzero = pooled) -> list of [B, d] per Matryoshka dim."""
    h = hidden.to(_compute_dtype(hidden))
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return _finish(_pool_rows(h, mask, mode), dims, normalize, eps)


def pool_segments(
    hidden2d: torch.Tensor,
    starts: Sequence[int] | torch.Tensor,
    ends: Sequence[int] | torch.Tensor,
    mode: str = "mean",
    dims=None,
    normalize: bool = False,
    eps: float = 1e-12,
) -> list[torch.Tensor]:
    """hidden2d [T, H]; segment s pools tokens [starts[s], ends[s]) -> list of [S, d]."""
    h = hidden2d.to(_compute_dtype(hidden2d))
    rows = []
    for s, e in zip(torch.as_tensor(starts).tolist(), torch.as_tensor(ends).tolist(), strict=False):
        seg = h[s:e].unsqueeze(0)
        mask = torch.ones(1, e - s, dtype=torch.bool, device=h.device)
        rows.append(
            _pool_rows(seg, mask, mode)
            if e > s
            else torch.zeros(1, h.shape[1], dtype=h.dtype, device=h.device)
        )
    pooled = torch.cat(rows) if rows else h.new_zeros(0, h.shape[1])
    return _finish(pooled, dims, normalize, eps)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim, in the compute dtype."""
    return F.normalize(x.to(_compute_dtype(x)), dim=-1, eps=eps)


def matryoshka(x: torch.Tensor, dims, normalize: bool = True, eps: float = 1e-12) -> list[torch.Tensor]:
    """Prefixes x[:, :d] of x [N, D], each L2-normalized when ``normalize``."""
    return _finish(x.to(_compute_dtype(x)), dims, normalize, eps)
