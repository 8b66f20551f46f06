"""Matrix products shared by the contrastive op and its kernels' launchers."""

from __future__ import annotations

import collections
import contextlib

import torch

# How many products took each path ("addmm out_dtype", "addmm pieces", "mm out_dtype", "mm then convert"):
# benchmarks record it, so a timing says whether the one-call cuBLAS path ran on that torch.
PATHS: collections.Counter[str] = collections.Counter()


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


def _try_once(ok: dict, key: tuple, call):
    """``call()``'s result, or None when ``key`` failed before or fails now. A torch without ``out_dtype=``
    (TypeError / NotImplementedError) or one that refuses the dtypes (RuntimeError: a check on dtypes and
    layout, not on values) marks ``key`` so later calls go straight to the fallback; OOM propagates."""
    if not ok.get(key, True):
        return None
    try:
        return call()
    except torch.OutOfMemoryError:
        raise
    except (TypeError, NotImplementedError, RuntimeError):
        ok[key] = False
        return None


# (device type, dtypes[, out contiguous]) -> whether the out_dtype call works there
_MM_OUT_DTYPE_OK: dict[tuple, bool] = {}
_ADDMM_OUT_DTYPE_OK: dict[tuple, bool] = {}


def mm_f32(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with an ``out_dtype`` result (fp32 accumulation of bf16 operands, rounded once on CUDA; a torch
    without ``mm(out_dtype=)``, and CPU, compute in the operands' dtype and convert)."""
    if a.is_cuda:
        out = _try_once(_MM_OUT_DTYPE_OK, (a.device.type, a.dtype, out_dtype),
                        lambda: torch.mm(a, b, out_dtype=out_dtype))
        if out is not None:
            PATHS["mm out_dtype"] += 1
            return out
    PATHS["mm then convert"] += 1
    return torch.mm(a, b).to(out_dtype)


def addmm_acc(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, piece_elements: int = 1 << 24) -> None:
    """out += a @ b in place, ``out`` in the accumulation dtype (float32/64; a strided view is fine),
    operands of any float dtype. Same dtypes: ``addmm_``. bf16/fp16 operands into float32 on CUDA: one
    cuBLAS call with beta = 1 (``addmm(out_dtype=)``: no float32 temporary, no separate add pass; older
    torch refuses a float32 ``self`` with bf16 operands); otherwise the product is formed in row pieces of
    at most ``piece_elements`` float32 values and added."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
        return
    key = (a.device.type, a.dtype, out.dtype, out.is_contiguous())
    one_call = lambda: torch.addmm(out, a, b, out_dtype=out.dtype, out=out)  # noqa: E731
    if a.is_cuda and _try_once(_ADDMM_OUT_DTYPE_OK, key, one_call) is not None:
        PATHS["addmm out_dtype"] += 1
        return
    PATHS["addmm pieces"] += 1
    piece = max(1, piece_elements // max(1, out.shape[1]))
    for j0 in range(0, out.shape[0], piece):
        out[j0 : j0 + piece] += mm_f32(a[j0 : j0 + piece], b, out.dtype)
