"""Splitting a batch (a tensor, or a dict of tensors such as a tokenizer's output) along dim 0.

Every tensor of a dict with at least one dimension is a per-example field and must share dim 0 (the
batch size); nested dicts are split the same way, recursively; other values (ints, strings, 0-d tensors)
are passed to every chunk unchanged.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

Batch = torch.Tensor | Mapping

# the top-level keys whose dim 1 is the token axis (tokenizers', sentence-transformers' and
# LLMEmbedder.tokenize's); only these are trimmed with ``trim_padding``
SEQUENCE_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids", "pool_mask",
                           "special_tokens_mask", "inputs_embeds", "offset_mapping"})


def _sizes(batch: Mapping, prefix: str, out: dict) -> dict:
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            out[f"{prefix}{k}"] = v.shape[0]
        elif isinstance(v, Mapping):
            _sizes(v, f"{prefix}{k}.", out)
    return out


def batch_size(batch, name: str = "batch") -> int:
    """The number of examples in ``batch``; raises TypeError/ValueError naming ``name`` when malformed."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() < 1:
            raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-d tensor")
        return batch.shape[0]
    if not isinstance(batch, Mapping):
        raise TypeError(f"{name} must be a torch.Tensor or a dict of tensors, got {type(batch).__name__}")
    sizes = _sizes(batch, "", {})
    if not sizes:
        raise ValueError(f"{name} holds no tensor with a batch dimension (keys: {list(batch)})")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{name}'s tensors disagree on the batch size (dim 0): {sizes}")
    return next(iter(sizes.values()))


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(0, c), (c, 2c), ..., (k*c, n)]: the last chunk holds the remainder."""
    return [(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]


def _mask_of(batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def chunk_widths(batch, ranges: list[tuple[int, int]]) -> list[int | None]:
    """For each chunk, the sequence width once its all-padding trailing columns are dropped (None: keep all
    columns). One host transfer for the whole batch, not one per chunk."""
    mask = _mask_of(batch)
    if mask is None:
        return [None] * len(ranges)
    L = mask.shape[1]
    used = mask.ne(0)
    last = torch.where(used.any(1), L - 1 - used.flip(1).to(torch.int8).argmax(1), -1).tolist()
    widths = []
    for lo, hi in ranges:
        w = max(last[lo:hi], default=-1) + 1
        widths.append(w if 0 < w < L else None)
    return widths


def _rows(batch: Mapping, lo: int, hi: int) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            v = v[lo:hi]
        elif isinstance(v, Mapping):
            v = _rows(v, lo, hi)
        out[k] = v
    return out


def slice_batch(batch, lo: int, hi: int, *, trim_padding: bool = False, width: int | None = None,
                sequence_keys: Iterable[str] = ()):
    """Rows ``lo:hi`` of ``batch`` (views, no copy); nested dicts are sliced recursively.

    With ``trim_padding``, a dict batch with a 2-D ``attention_mask`` [B, L] also drops the trailing
    columns that are padding in every row of the chunk from its sequence tensors: the top-level keys in
    :data:`SEQUENCE_KEYS` or ``sequence_keys`` whose dim 1 has length L (right padding; a left-padded chunk
    keeps all columns, so token positions never shift). Models that attend only to unmasked tokens (HF
    models with an attention mask) give the same outputs for the kept tokens. ``width``: the chunk's width
    from :func:`chunk_widths`, to skip the per-chunk host sync (with ``trim_padding``).
    """
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    out = _rows(batch, lo, hi)
    if not trim_padding:
        return out
    if width is None:
        width = chunk_widths(batch, [(lo, hi)])[0]
    if width is None:
        return out
    L = batch["attention_mask"].shape[1]
    keys = SEQUENCE_KEYS.union(sequence_keys)
    for k, v in out.items():
        if k in keys and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == L:
            out[k] = v[:, :width]
    return out
