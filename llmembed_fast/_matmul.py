"""Matrix products shared by the contrastive op and its kernels' launchers."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def tf32(enabled: bool):
    """torch.backends.cuda.matmul.allow_tf32 = enabled inside the block (a no-op without CUDA)."""
    if not torch.cuda.is_available():
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


_MM_OUT_DTYPE_OK: dict[str, bool] = {}


def mm_f32(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with an ``out_dtype`` result (fp32 accumulation of bf16 operands, rounded once on CUDA; a torch
    without ``mm(out_dtype=)``, and CPU, compute in the operands' dtype and convert)."""
    key = a.device.type
    if _MM_OUT_DTYPE_OK.get(key, True) and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[key] = False
    return torch.mm(a, b).to(out_dtype)
