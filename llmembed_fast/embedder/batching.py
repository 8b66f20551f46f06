"""Token-budget batches sorted by length, and their padded (or packed) tensors.

Sorting by length puts sequences of similar length together, so padding wastes little; a batch holds as
many sequences as fit ``max_tokens`` padded tokens (and at most ``batch_size`` sequences). The caller
scatters each batch's outputs back to the input positions it is given, so the input order is restored.
"""

from __future__ import annotations

import numpy as np
import torch


def plan_batches(
    lengths,
    *,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    pad_to_multiple_of: int = 1,
    min_tokens: int = 0,
    max_waste: float = 0.15,
) -> list[np.ndarray]:
    """Split sequence indices into batches, longest first.

    A batch's cost is ``count * width`` padded tokens (width = its longest sequence, rounded up to
    ``pad_to_multiple_of``) and stays within ``max_tokens`` (a longer single sequence is a batch of its own);
    ``batch_size`` caps the count. Once a batch holds ``min_tokens`` padded tokens it is also closed before
    a sequence shorter than ``(1 - max_waste) * width``, so that a few long sequences do not pad many short
    ones. Returns arrays of input indices.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return []
    order = np.argsort(-lengths, kind="stable")
    m = max(1, int(pad_to_multiple_of))
    padded = np.maximum(1, -(-lengths[order] // m) * m)
    cap = int(batch_size) if batch_size else len(order)
    budget = int(max_tokens) if max_tokens else None
    batches, start, n = [], 0, len(order)
    while start < n:
        width = int(padded[start])
        limit = cap if budget is None else max(1, min(cap, budget // width))
        end = min(n, start + limit)
        if max_waste is not None and end - start > 1:
            # first position past the batch's minimum size whose length falls below the waste threshold
            need = start + max(1, -(-int(min_tokens) // width))
            short = np.flatnonzero(padded[start:end] < (1.0 - max_waste) * width)
            short = short[start + short >= need]
            if short.size:
                end = start + int(short[0])
        batches.append(order[start:end])
        start = end
    return batches


def isolate_longer(plan: list[np.ndarray], lengths, limit: int) -> list[np.ndarray]:
    """``plan`` with every sequence longer than ``limit`` in a batch of its own (models whose rotary
    frequencies follow the batch's longest sequence past ``limit``: the others then keep their own)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = []
    for idx in plan:
        long = lengths[idx] > limit
        out.extend(idx[i : i + 1] for i in np.flatnonzero(long))
        if not long.all():
            out.append(idx[~long])
    return out


def pad_batch(
    seqs: list[list[int]],
    pool_starts: list[int],
    *,
    pad_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int = 1,
    device=None,
) -> dict[str, torch.Tensor]:
    """Padded tensors for one batch: input_ids, attention_mask, position_ids (0.. per sequence, so left and
    right padding give the same positions) and pool_mask (1 on the pooled region ``[pool_start, len)``)."""
    B = len(seqs)
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=B)
    m = max(1, int(pad_to_multiple_of))
    L = max(1, -(-int(lens.max(initial=1)) // m) * m)
    ids = np.full((B, L), pad_id, dtype=np.int64)
    pos = np.arange(L, dtype=np.int64)[None, :].repeat(B, 0)
    left = padding_side == "left"
    offset = (L - lens) if left else np.zeros(B, dtype=np.int64)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, offset[b] : offset[b] + len(s)] = s
    rel = pos - offset[:, None]  # position inside the sequence (negative on left padding)
    attn = (rel >= 0) & (rel < lens[:, None])
    pool = attn & (rel >= np.asarray(pool_starts, dtype=np.int64)[:, None])
    position_ids = np.where(attn, rel, 0)
    out = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(attn.astype(np.int64)),
        "position_ids": torch.from_numpy(position_ids),
        "pool_mask": torch.from_numpy(pool),
    }
    if device is not None:
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def pack_batch(seqs: list[list[int]], pool_starts: list[int], *, device=None) -> dict[str, torch.Tensor]:
    """One packed row for a batch: input_ids [1, T], position_ids [1, T] restarting at 0 per sequence,
    cu_seqlens [S + 1] (int64), and the pooled segments' starts/ends [S] in the packed row."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    cu = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=cu[1:])
    ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(cu[-1]))
    pos = np.arange(int(cu[-1]), dtype=np.int64) - np.repeat(cu[:-1], lens)
    out = {
        "input_ids": torch.from_numpy(ids)[None],
        "position_ids": torch.from_numpy(pos)[None],
        "cu_seqlens": torch.from_numpy(cu),
        "starts": torch.from_numpy(cu[:-1] + np.asarray(pool_starts)),
        "ends": torch.from_numpy(cu[1:].copy()),
    }
    if device is not None:
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out
