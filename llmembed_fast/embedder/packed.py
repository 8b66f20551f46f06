"""Padding-free (packed) forward: a batch's sequences concatenated into one row, pooled with pool_segments.

Restarting ``position_ids`` alone do not isolate the sequences under sdpa, flex or eager attention in the
transformers versions this package supports (only the flash-attention varlen path reads them as sequence
boundaries), so the packed row gets its own block-diagonal (and, for decoders, causal) additive 4-D mask.
That mask costs T x T elements, so packed batches should be bounded in tokens (``max_tokens_per_batch``),
and with sdpa it costs attention over the whole row (T^2) rather than per sequence: on GPUs without
flash-attention varlen the padded path with length-sorted batches is usually as fast, which is why
``packed="auto"`` chooses packing only for flash-attention. A custom mask replaces the model's own mask
logic, so models with sliding-window layers see full (causal) attention inside each sequence.
"""

from __future__ import annotations

import torch


def block_diagonal_mask(
    cu_seqlens: torch.Tensor, *, causal: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive attention mask [1, 1, T, T]: 0 where query i may attend key j (same sequence, and j <= i when
    ``causal``), the dtype's most negative value elsewhere."""
    cu = cu_seqlens.to(device)
    T = int(cu[-1])
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu[1:] - cu[:-1])
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool, device=device).tril_()
    mask = torch.zeros(T, T, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def uses_varlen_flash(model) -> bool:
    """True when the model runs a flash-attention implementation that reads packed position_ids."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return impl.startswith("flash_attention") or impl.startswith("kernels-community/flash")
