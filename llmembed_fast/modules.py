"""nn.Module wrappers of the functional ops."""

from __future__ import annotations

import torch
from torch import nn

from llmembed_fast.ops.pooling import _check_flag, _check_mode, _check_out_dtype, normalize_dims, pool


class EmbeddingHead(nn.Module):
    """Fused pooling -> Matryoshka slicing -> L2 normalization over token states.

    ``forward(hidden [B, L, H], mask [B, L] | None)`` returns [B, d] (or a tuple over ``dims``).
    See :func:`llmembed_fast.pool` for the modes.
    """

    def __init__(
        self, mode: str = "mean", dims=None, normalize: bool = True, out_dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.mode = _check_mode(mode)
        if dims is not None:  # types and signs now (the bound against H when the hidden states come)
            dims_t, as_seq = normalize_dims(dims, 2**62)
            dims = dims_t if as_seq else dims_t[0]
        self.dims = dims
        self.normalize = _check_flag(normalize, "normalize")
        self.out_dtype = _check_out_dtype(out_dtype)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None):
        return pool(
            hidden, mask, self.mode, dims=self.dims, normalize=self.normalize, out_dtype=self.out_dtype
        )

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, dims={self.dims}, normalize={self.normalize}, out_dtype={self.out_dtype}"
