"""Matrix products shared by the contrastive op and its kernels' launchers."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 cuBLAS matmuls on (or off) inside the block; a no-op without CUDA. Uses the API the caller uses:
    ``allow_tf32``, or ``fp32_precision`` once that is set (torch >= 2.9 refuses to read the legacy flag
    then; transformers' ``TrainingArguments(tf32=...)`` sets it)."""
    if not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        prev = matmul.allow_tf32
    except RuntimeError:  # the new fp32_precision API is in use
        prev = None
    if prev is None:
        prev_precision = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = prev_precision
        return
    prev_precision = matmul.fp32_precision  # the legacy setter leaves "ieee"/"tf32" here, not "none"
    matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32 = prev
        matmul.fp32_precision = prev_precision


_MM_OUT_DTYPE_OK: dict[str, bool] = {}


def mm_f32(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with an ``out_dtype`` result (fp32 accumulation of bf16 operands, rounded once on CUDA; a torch
    without ``mm(out_dtype=)``, and CPU, compute in the operands' dtype and convert)."""
    key = a.device.type
    if _MM_OUT_DTYPE_OK.get(key, True) and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, NotImplementedError):  # this torch has no out_dtype: remember it
            _MM_OUT_DTYPE_OK[key] = False
        except RuntimeError:  # e.g. a dtype pair it refuses: fall back for this call only
            pass
    return torch.mm(a, b).to(out_dtype)


_ADDMM_OUT_DTYPE_OK: dict[str, bool] = {}


def addmm_acc(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, piece_elements: int = 1 << 24) -> None:
    """out += a @ b in place, ``out`` in the accumulation dtype (float32/64; a strided view is fine),
    operands of any float dtype. Same dtypes: ``addmm_``. bf16/fp16 operands into float32 on CUDA: one
    cuBLAS call with beta = 1 (``addmm(out_dtype=)``: no float32 temporary, no separate add pass);
    otherwise the product is formed in row pieces of at most ``piece_elements`` float32 values and added."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
        return
    key = a.device.type
    if a.is_cuda and _ADDMM_OUT_DTYPE_OK.get(key, True):
        try:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
            return
        except torch.OutOfMemoryError:
            raise
        except (TypeError, NotImplementedError):  # this torch has no out_dtype: remember it
            _ADDMM_OUT_DTYPE_OK[key] = False
        except RuntimeError:  # e.g. a dtype pair it refuses: fall back for this call only
            pass
    piece = max(1, piece_elements // max(1, out.shape[1]))
    for j0 in range(0, out.shape[0], piece):
        out[j0 : j0 + piece] += mm_f32(a[j0 : j0 + piece], b, out.dtype)
