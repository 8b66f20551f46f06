"""Materialized reference of the contrastive (InfoNCE) loss: the test oracle.

Plain torch, written for clarity: it builds every B x N similarity matrix, so it needs O(B*N) memory.
Call it on float64 inputs for an exact oracle; autograd gives the gradients (q, d and a temperature
tensor). Same definition and arguments as :func:`llmembed_fast.contrastive_loss`, without ``group``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sim(a: torch.Tensor, b: torch.Tensor, normalize: bool) -> torch.Tensor:
    """a [n, D] x b [m, D] -> [n, m]. Each entry is the same elementwise product and sum over D, so identical
    rows give bit-identical similarities (a matmul may round two columns differently, and a tie with the
    positive would then fall on either side of the false-negative threshold). Row chunks bound memory."""
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    rows = max(1, (1 << 24) // max(1, b.shape[0] * b.shape[1]))
    parts = [(a[i : i + rows, None, :] * b[None, :, :]).sum(-1) for i in range(0, a.shape[0], rows)]
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[0])


def contrastive_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    labels=None,
    temperature=0.05,
    normalize: bool = True,
    symmetric: bool = False,
    same_tower: bool = False,
    false_negative_margin=None,
    matryoshka_dims=None,
    matryoshka_weights=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """q [B, D] queries, d [N, D] candidates (N >= B); labels [B] (default arange(B)) = row of d holding each
    query's positive. Returns the loss (a scalar, or [B] with ``reduction="none"``) in q's dtype.

    For query i with positive p = labels[i], per Matryoshka dim (prefix, re-normalized when ``normalize``):
      loss_i = -s(q_i, d_p)/t + log( sum_j exp(s(q_i, d_j)/t)
                      [same_tower: + sum_{j != i} exp(s(q_i, q_j)/t) + sum_{j != p} exp(s(d_p, d_j)/t)] )
    with every negative term whose similarity exceeds s(q_i, d_p) by more than ``false_negative_margin``
    left out.
    ``symmetric`` averages it with the document->query term -s(q_i, d_p)/t + log sum_j exp(s(q_j, d_p)/t)
    (negatives masked the same way). Matryoshka: sum over dims of weight * loss at that dim.
    """
    B, D = q.shape
    dev = q.device
    labels = torch.arange(B, device=dev) if labels is None else labels.to(dev).long()
    dims = [D] if matryoshka_dims is None else list(matryoshka_dims)
    weights = [1.0] * len(dims) if matryoshka_weights is None else [float(w) for w in matryoshka_weights]
    t = temperature
    rows = torch.arange(B, device=dev)
    total = q.new_zeros(B)
    for dim, w in zip(dims, weights, strict=False):
        qk, dk = q[:, :dim], d[:, :dim]
        dp = dk[labels]
        s_qd = _sim(qk, dk, normalize)  # [B, N]
        s_pos = s_qd[rows, labels]  # [B]

        def keep(s, positive_mask, s_pos=s_pos):
            """Negatives above the positive by more than the margin are dropped; the positive stays."""
            if false_negative_margin is None:
                return torch.ones_like(s, dtype=torch.bool)
            return ~(s > s_pos[:, None] + false_negative_margin) | positive_mask  # NaN kept: it poisons

        pos_qd = torch.zeros_like(s_qd, dtype=torch.bool)
        pos_qd[rows, labels] = True
        parts = [(s_qd / t).masked_fill(~keep(s_qd, pos_qd), float("-inf"))]
        if same_tower:
            s_qq = _sim(qk, qk, normalize)  # [B, B], self excluded
            self_q = torch.eye(B, dtype=torch.bool, device=dev)
            parts.append((s_qq / t).masked_fill(self_q | ~keep(s_qq, self_q), float("-inf")))
            s_dd = _sim(dp, dk, normalize)  # [B, N], the positive itself excluded
            parts.append((s_dd / t).masked_fill(pos_qd | ~keep(s_dd, pos_qd), float("-inf")))
        q2d = torch.logsumexp(torch.cat(parts, dim=1), dim=1) - s_pos / t
        if symmetric:
            s_dq = _sim(dp, qk, normalize)  # [B, B]: row i = positive of query i vs all queries
            self_q = torch.eye(B, dtype=torch.bool, device=dev)
            d2q = (
                torch.logsumexp((s_dq / t).masked_fill(~keep(s_dq, self_q), float("-inf")), dim=1) - s_pos / t
            )
            per_dim = 0.5 * (q2d + d2q)
        else:
            per_dim = q2d
        total = total + w * per_dim
    if reduction == "none":
        return total
    return total.sum() if reduction == "sum" else total.mean()
