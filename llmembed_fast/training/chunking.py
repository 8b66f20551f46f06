"""Splitting a batch (a tensor, or a dict of tensors such as a tokenizer's output) along dim 0.

Every tensor of a dict with at least one dimension is a per-example field and must share dim 0 (the
batch size); nested dicts are split the same way, recursively; other values (ints, strings, 0-d tensors)
are passed to every chunk unchanged. Batch metadata (:data:`META_KEYS`: sentence-transformers'
``prompt_length``, an int, a one-element tensor or one value per row) is passed unchanged when it holds
one element and split with the rows otherwise.

Flattened (padding-free) batches, as ``transformers.DataCollatorWithFlattening`` and sentence-transformers'
flash-attention path build them, are recognized by ``cu_seq_lens_q`` (cumulative sequence lengths [n + 1]):
their examples are the n sequences, and a chunk is a token range (see :func:`slice_batch`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

Batch = torch.Tensor | Mapping

# the top-level keys whose dim 1 is the token axis (tokenizers', sentence-transformers' and
# LLMEmbedder.tokenize's); only these are trimmed with ``trim_padding``
SEQUENCE_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids", "pool_mask",
                           "special_tokens_mask", "inputs_embeds", "offset_mapping"})

# batch metadata: one value for the whole batch (a one-element tensor is not a batch of one) or one per row
META_KEYS = frozenset({"prompt_length"})


def _per_row(k, v) -> bool:
    """Whether value ``v`` under key ``k`` is a per-example tensor (split along dim 0)."""
    return isinstance(v, torch.Tensor) and v.dim() >= 1 and not (k in META_KEYS and v.numel() == 1)


def _sizes(batch: Mapping, prefix: str, out: dict) -> dict:
    for k, v in batch.items():
        if _per_row(k, v):
            out[f"{prefix}{k}"] = v.shape[0]
        elif isinstance(v, Mapping):
            _sizes(v, f"{prefix}{k}.", out)
    return out


FLAT_KEY = "cu_seq_lens_q"


def is_flattened(batch) -> bool:
    """Whether ``batch`` is a flattened (padding-free) dict batch: sequences concatenated along the token
    axis, delimited by ``cu_seq_lens_q``."""
    return isinstance(batch, Mapping) and isinstance(batch.get(FLAT_KEY), torch.Tensor)


def _flat_size(batch: Mapping, name: str) -> int:
    cu = batch[FLAT_KEY]
    if cu.dim() != 1 or cu.numel() < 1 or cu.dtype.is_floating_point:
        raise ValueError(f"{name}['{FLAT_KEY}'] must be a 1-D integer tensor [n + 1] of cumulative sequence "
                         f"lengths, got {cu.dtype} of shape {tuple(cu.shape)}")
    return cu.numel() - 1


def batch_size(batch, name: str = "batch") -> int:
    """The number of examples in ``batch``; raises TypeError/ValueError naming ``name`` when malformed."""
    if is_flattened(batch):
        return _flat_size(batch, name)
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


def row_stats(batch) -> tuple[list[int] | None, list[int] | None]:
    """(ends, counts) per row, in one host transfer: ``ends`` one past the row's last attended column (0 for
    an all-padding row), the width it needs once trailing padding is dropped; ``counts`` its attended
    tokens. A flattened batch gives (None, its sequence lengths); a batch without a 2-D ``attention_mask``
    (a tensor, say) (None, None)."""
    if is_flattened(batch):
        cu = batch[FLAT_KEY]
        return None, (cu[1:] - cu[:-1]).tolist()
    mask = _mask_of(batch)
    if mask is None:
        return None, None
    L = mask.shape[1]
    used = mask.ne(0)
    ends = torch.where(used.any(1), L - used.flip(1).to(torch.int8).argmax(1), 0)
    ends, counts = torch.stack([ends, used.sum(1)]).tolist()
    return ends, counts


def row_ends(batch) -> list[int] | None:
    """Per row, one past its last attended column (see :func:`row_stats`); None without a 2-D
    ``attention_mask``."""
    return row_stats(batch)[0]


def token_ranges(counts: list[int], max_tokens: int, max_rows: int) -> list[tuple[int, int]]:
    """Chunks of consecutive rows, each as many as fit ``max_tokens`` tokens (by ``counts``) and
    ``max_rows`` rows; a row longer than the budget is a chunk of its own. The same greedy packing as
    sentence-transformers' ``mini_batch_num_tokens``."""
    ranges, lo, n = [], 0, len(counts)
    while lo < n:
        hi, total = lo + 1, counts[lo]
        while hi < n and hi - lo < max_rows and total + counts[hi] <= max_tokens:
            total += counts[hi]
            hi += 1
        ranges.append((lo, hi))
        lo = hi
    return ranges


def chunk_widths(batch, ranges: list[tuple[int, int]], ends: list[int] | None = None) -> list[int | None]:
    """For each chunk, the sequence width once its all-padding trailing columns are dropped (None: keep all
    columns). One host transfer for the whole batch, not one per chunk; none with ``ends`` (from
    :func:`row_ends`) given."""
    if ends is None:
        ends = row_ends(batch)
    if ends is None:
        return [None] * len(ranges)
    L = _mask_of(batch).shape[1]
    widths = []
    for lo, hi in ranges:
        w = max(ends[lo:hi], default=0)
        widths.append(w if 0 < w < L else None)
    return widths


def longest_first(ends: list[int]) -> list[int] | None:
    """The row order that sorts ``ends`` (from :func:`row_ends`) longest first, ties in their original order,
    or None when the rows are in that order already (a left-padded or unpadded batch: all ends equal).
    Longest first: the widest chunk runs first, so a batch whose chunks do not fit fails at once."""
    order = sorted(range(len(ends)), key=lambda i: -ends[i])
    return None if all(i == j for i, j in enumerate(order)) else order


def take_rows(batch, index: torch.Tensor):
    """``batch`` with its rows in the order of ``index`` (int64 [n], a permutation of the rows): every
    per-example tensor gathered along dim 0 (a copy), nested dicts recursively, other values unchanged.
    Not for flattened batches."""
    if isinstance(batch, torch.Tensor):
        return batch.index_select(0, index.to(batch.device))
    return _map_rows(batch, lambda v: v.index_select(0, index.to(v.device)))


def _map_rows(batch: Mapping, fn) -> dict:
    """``batch`` with ``fn`` applied to every per-example tensor, nested dicts recursively."""
    out = {}
    for k, v in batch.items():
        if _per_row(k, v):
            v = fn(v)
        elif isinstance(v, Mapping):
            v = _map_rows(v, fn)
        out[k] = v
    return out


def _flat_rows(batch: Mapping, lo: int, hi: int) -> dict:
    """Sequences ``lo:hi`` of a flattened batch: the token range they span of every token-axis tensor
    (last dim = the total token count: ``input_ids`` [1, T], ``position_ids``, ...), ``cu_seq_lens_q/k``
    rebased to 0, ``max_length_q/k`` recomputed, ``seq_idx`` renumbered; other values unchanged."""
    cu = batch[FLAT_KEY]
    bounds = cu[[lo, hi, -1]].tolist()  # one host sync
    t0, t1, total = (int(v) for v in bounds)
    new_cu = cu[lo:hi + 1] - cu[lo]
    out = {}
    for k, v in batch.items():
        if k in (FLAT_KEY, "cu_seq_lens_k"):
            v = new_cu
        elif k in ("max_length_q", "max_length_k"):
            v = int((new_cu[1:] - new_cu[:-1]).max().item()) if hi > lo else 0
        elif k == "seq_idx" and isinstance(v, torch.Tensor):
            v = v[..., t0:t1] - lo
        elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == total:
            v = v[..., t0:t1]
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

    A flattened batch (``cu_seq_lens_q``) gives sequences ``lo:hi`` as their token range (no padding to
    trim): token-axis tensors (last dim = the total token count) are cut to it, ``cu_seq_lens_q/k`` start
    again at 0, ``max_length_q/k`` and ``seq_idx`` are recomputed, other values pass unchanged.
    """
    if is_flattened(batch):
        return _flat_rows(batch, lo, hi)
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    out = _map_rows(batch, lambda v: v[lo:hi])
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
