"""Argument handling shared by the quantization API: numpy/torch in, the same kind out."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from llmembed_fast import _warn

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CODE_DTYPES = (torch.uint8, torch.int8)


def as_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    """``x`` as a torch tensor (native-order, non-negatively strided numpy arrays are shared, others copied)
    and whether it came from numpy (or a list)."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, (list, tuple)):
        return as_tensor(np.asarray(x), name)[0], True
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name} must be a numeric array, got dtype {x.dtype}")
        if x.dtype.kind == "f" and x.dtype.itemsize not in (2, 4, 8):  # long double: torch has no such dtype
            raise TypeError(f"{name} must be float16/32/64, got dtype {x.dtype} (convert it first)")
        if not x.dtype.isnative:  # big-endian data (e.g. a .npy written on another machine)
            x = x.astype(x.dtype.newbyteorder("="))
        if any(st < 0 for st in x.strides):  # x[::-1] of one row counts as contiguous in numpy, not in torch
            x = x.copy()
        x = np.ascontiguousarray(x)  # a view when already contiguous (memmaps stay memmaps)
        with warnings.catch_warnings():  # read-only arrays (np.load(mmap_mode="r")): never written here
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(x), True
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def as_ranges(ranges, d: int) -> torch.Tensor:
    """int8 ``ranges`` (list, numpy array or tensor of shape [2, d], floating point or integer) as a detached
    floating-point tensor (integers as float64, exact below 2**53; sentence-transformers casts them too)."""
    r, _ = as_tensor(ranges, "ranges")
    if tuple(r.shape) != (2, d):
        raise ValueError(f"ranges must have shape (2, {d}) = [min, max] per dimension, got {tuple(r.shape)}")
    if r.dtype == torch.bool or r.dtype.is_complex:
        raise TypeError(f"ranges must be floating point or integer, got {r.dtype}")
    if not r.dtype.is_floating_point:
        r = r.to(torch.float64)
    return r.detach()


def check_range_values(r) -> None:
    """ValueError unless the ranges [2, D] (numpy array or tensor) are finite with min <= max in every
    dimension (others give garbage codes: NaN ones all 0, inverted ones scrambled)."""
    r = torch.as_tensor(r)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("ranges must be finite (calibration data with NaN or inf gives such ranges)")
    bad = (r[0] > r[1]).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"ranges: min > max in {bad.numel()} dimension(s), the first is {int(bad[0])}")


def to_output(t: torch.Tensor, numpy: bool):
    return t.numpy() if numpy else t


def check_2d(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_finite(t: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` when ``t`` holds NaN or inf (one pass over ``t``)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite: it holds NaN or inf")


def check_codes(t: torch.Tensor, name: str) -> None:
    if t.dtype not in CODE_DTYPES:
        raise TypeError(f"{name} must hold uint8 or int8 codes, got {t.dtype}")


def check_k(k, n: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if n == 0:
        raise ValueError("the corpus is empty: there is nothing to search")
    if not 1 <= k <= n:
        raise ValueError(f"{name} must be in [1, {n}] (the corpus size), got {k}")
    return k


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether torch.ops.llmembed_fast.<op> has a kernel for ``device`` (CUDA kernels exist only in CUDA
    builds)."""
    from llmembed_fast import _ext

    if _ext.extension() is None:
        return False
    if device.type == "cpu":
        return True
    key = {"cuda": "CUDA"}.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"llmembed_fast::{op}", key)


_FALLBACK_WARNED = False


def use_extension(op: str, device: torch.device) -> bool:
    """Whether to run ``torch.ops.llmembed_fast.<op>`` for ``device`` (else the plain-torch path). On the
    CPU without the extension: False, with a warning (same codes and rankings, slower, more memory;
    float64 rescoring may differ from the extension's fixed summation order in the last bits)."""
    if has_kernel(op, device):
        return True
    if device.type == "cpu" and not _FALLBACK_WARNED:
        from llmembed_fast import _ext

        # once per process, by a flag: the warnings registry's show-once does not hold here (as_tensor's
        # catch_warnings resets it on every numpy input, so every call warned again)
        globals()["_FALLBACK_WARNED"] = True
        _warn.warn(
            f"llmembed_fast._C is not loaded ({_ext.load_error()}): llmembed_fast.quant runs its plain-torch "
            f"paths on the CPU (slower). Build the extension: {_ext.BUILD_COMMAND}",
            RuntimeWarning,
        )
    return False

