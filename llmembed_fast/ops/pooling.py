"""The embedding head: masked pooling -> Matryoshka slicing -> L2 normalization, forward and backward.

Public functions check their arguments, pick a backend (``llmembed_fast._dispatch``) and run an
autograd Function whose forward and backward call the backend's launchers: the Triton kernels in
``llmembed_fast.triton_kernels.pooling`` or their plain-torch counterparts in
``llmembed_fast.reference.pooling_chunked``. Hidden states are read once; only the first ``max(dims)``
columns and only the pooled tokens are read.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch

from llmembed_fast import _dispatch
from llmembed_fast.ops._autograd import no_double_backward, op_context, saveable

POOLING_MODES = ("mean", "weighted_mean", "max", "first", "last", "mean_sqrt_len")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------


def _check_tensor(x, name: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _check_mode(mode) -> str:
    if mode not in POOLING_MODES:
        raise ValueError(f"mode must be one of {POOLING_MODES}, got {mode!r}")
    return mode


def normalize_dims(dims, width: int, name: str = "dims") -> tuple[tuple[int, ...], bool]:
    """Return (dims as a tuple, whether the caller asked for a sequence). ``None`` means the full width."""
    if dims is None:
        return (width,), False
    if isinstance(dims, np.ndarray) and dims.dtype.kind in "iu" and dims.ndim <= 1:
        dims = dims.tolist()  # 0-d: an int, 1-d: a list
    elif isinstance(dims, numbers.Integral) and not isinstance(dims, bool):
        dims = int(dims)
    if isinstance(dims, bool) or not isinstance(dims, (int, Sequence, torch.Tensor)) or isinstance(dims, str):
        raise TypeError(f"{name} must be None, an int or a sequence of ints, got {type(dims).__name__}")
    if isinstance(dims, torch.Tensor):
        if dims.dim() > 1 or dims.is_floating_point() or dims.is_complex():
            raise TypeError(f"{name} as a tensor must be a 0-d or 1-d integer tensor, got {dims.dtype} "
                            f"{list(dims.shape)}")
        dims = dims.tolist()  # 0-d: an int, 1-d: a list
    as_seq = not isinstance(dims, int)
    values = list(dims) if as_seq else [dims]
    if as_seq and not values:
        raise ValueError(f"{name} must not be empty")
    for i, d in enumerate(values):
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got {d!r}")
        values[i] = d = int(d)
        if d < 1 or d > width:
            raise ValueError(f"{name} values must be in [1, {width}] (the hidden size), got {d}")
    return tuple(values), as_seq


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_mask(mask, hidden: torch.Tensor) -> torch.Tensor:
    B, L = hidden.shape[:2]
    if mask is None:
        return torch.ones(B, L, dtype=torch.bool, device=hidden.device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != (B, L):
        raise ValueError(f"mask must have shape [B, L] = {[B, L]} to match hidden, got {list(mask.shape)}")
    if mask.device != hidden.device:
        raise ValueError(f"mask is on {mask.device} but hidden is on {hidden.device}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")
    if mask.is_floating_point():
        # A soft mask would be silently treated as binary; refuse it (one host sync, float masks only).
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(
                "mask must hold only 0 and 1 (a float mask with other values is not a pooling mask)"
            )
    return mask


def _check_out_dtype(out_dtype) -> torch.dtype:
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype!r}")
    return out_dtype


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive number, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


def _backend(x: torch.Tensor, *others: torch.Tensor) -> ModuleType:
    # float64 data (not a float64 mask) takes the torch path: the kernels accumulate in float32.
    _dispatch.forced_backend()  # a bad LLMEMBED_FAST_BACKEND is an error for every dtype
    if x.dtype == torch.float64 or _dispatch.select_backend(x, *others) == "torch":
        from llmembed_fast.reference import pooling_chunked

        return pooling_chunked
    from llmembed_fast.triton_kernels import pooling as triton_pooling

    return triton_pooling


# ---------------------------------------------------------------------------------------------------
# finalize: Matryoshka prefixes, each normalized, from a pooled [B, D] matrix (shared by all ops)
# ---------------------------------------------------------------------------------------------------


def _finalize_forward(be, pooled, dims, normalize, eps, out_dtype):
    """pooled [N, >=max(dims)] (unit column stride) -> (outputs, norms [K, N] or None)."""
    if not normalize:  # outputs never alias a view or each other (callers may edit them in place)
        outs = []
        for d in dims:
            reuse = d == pooled.shape[1] and pooled.dtype == out_dtype and pooled._base is None
            outs.append(pooled if reuse and not any(o is pooled for o in outs)
                        else pooled[:, :d].to(out_dtype, copy=True))
        return outs, None
    outs, norms = [], []
    for d in dims:
        y, n = be.l2_prefix_forward(pooled, d, out_dtype, eps)
        outs.append(y)
        norms.append(n)
    return outs, torch.stack(norms)


def _finalize_backward(be, grads, pooled, norms, dims, normalize, eps, like=None):
    """Gradient w.r.t. pooled (float32, float64 for float64) from the outputs' gradients (None = zero).
    ``pooled`` is only read when normalizing; otherwise ``like = (shape, dtype, device)`` describes it."""
    shape, dtype, device = like if pooled is None else (pooled.shape, pooled.dtype, pooled.device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gp = torch.zeros(shape, dtype=acc, device=device)
    for k, (g, d) in enumerate(zip(grads, dims, strict=False)):
        if g is None:
            continue
        if normalize:
            be.l2_prefix_backward(pooled, g.contiguous(), norms[k], d, gp, eps, accumulate=True)
        else:
            gp[:, :d] += g
    return gp


class _PoolFunction(torch.autograd.Function):
    @staticmethod
    @op_context
    def forward(ctx, hidden, mask, mode, dims, normalize, eps, out_dtype, be):
        D = max(dims)
        pooled, info, argmax = be.pool_forward(hidden, mask, mode, D)
        outs, norms = _finalize_forward(be, pooled, dims, normalize, eps, out_dtype)
        # pooled is needed only by the normalization's backward (unsaved, an output may be edited in place)
        ctx.save_for_backward(mask, info, argmax, pooled if normalize else None, norms)
        ctx.like = (pooled.shape, pooled.dtype, pooled.device)
        ctx.cfg = (mode, dims, normalize, eps, be, tuple(hidden.shape), hidden.dtype)
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @op_context
    def backward(ctx, *grads):
        no_double_backward("lf.pool")
        mode, dims, normalize, eps, be, shape, dtype = ctx.cfg
        if not ctx.needs_input_grad[0] or all(g is None for g in grads):
            return (None,) * 8
        mask, info, argmax, pooled, norms = ctx.saved_tensors
        gp = _finalize_backward(be, grads, pooled, norms, dims, normalize, eps, ctx.like)
        gh = be.pool_backward(gp, mask, info, argmax, mode, shape, dtype)
        return (gh,) + (None,) * 7


class _PoolSegmentsFunction(torch.autograd.Function):
    @staticmethod
    @op_context
    def forward(ctx, hidden2d, starts, ends, overlapping, mode, dims, normalize, eps, out_dtype, be):
        pooled, argmax = be.segments_forward(hidden2d, starts, ends, mode, max(dims))
        outs, norms = _finalize_forward(be, pooled, dims, normalize, eps, out_dtype)
        ctx.save_for_backward(starts, ends, argmax, pooled if normalize else None, norms)
        ctx.like = (pooled.shape, pooled.dtype, pooled.device)
        ctx.cfg = (overlapping, mode, dims, normalize, eps, be, tuple(hidden2d.shape), hidden2d.dtype)
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @op_context
    def backward(ctx, *grads):
        no_double_backward("lf.pool_segments")
        overlapping, mode, dims, normalize, eps, be, shape, dtype = ctx.cfg
        if not ctx.needs_input_grad[0] or all(g is None for g in grads):
            return (None,) * 10
        starts, ends, argmax, pooled, norms = ctx.saved_tensors
        gp = _finalize_backward(be, grads, pooled, norms, dims, normalize, eps, ctx.like)
        gh = be.segments_backward(gp, starts, ends, argmax, mode, shape, dtype, overlapping)
        return (gh,) + (None,) * 9


class _PrefixNormalizeFunction(torch.autograd.Function):
    """x [N, D] -> one normalized prefix x[:, :d] / ||x[:, :d]|| per d in dims."""

    @staticmethod
    @op_context
    def forward(ctx, x, dims, eps, out_dtype, be):
        outs, norms = _finalize_forward(be, x, dims, True, eps, out_dtype)
        ctx.save_for_backward(x, norms)
        ctx.cfg = (dims, eps, be)
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @op_context
    def backward(ctx, *grads):
        no_double_backward("lf.l2_normalize / lf.matryoshka")
        dims, eps, be = ctx.cfg
        if not ctx.needs_input_grad[0] or all(g is None for g in grads):
            return (None,) * 5
        x, norms = ctx.saved_tensors
        gx = _finalize_backward(be, grads, x, norms, dims, True, eps)
        return (gx.to(x.dtype),) + (None,) * 4


def _as_result(outs: tuple, as_seq: bool):
    return tuple(outs) if as_seq else outs[0]


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------


def pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    mode: str = "mean",
    *,
    dims=None,
    normalize: bool = False,
    out_dtype: torch.dtype = torch.float32,
    eps: float = 1e-12,
):
    """Masked pooling of token states, then Matryoshka slicing and L2 normalization, fused.

    Args:
        hidden: [B, L, H] float32/float16/bfloat16 (float64 runs on the torch path); any strides.
        mask: [B, L] bool/int/float (0/1): the tokens to pool. Left or right padding and holes (e.g. an
            excluded instruction prefix) all work. None pools every token. Bool and integer masks pool
            every non-zero token (not a weight: 2 counts as 1; unchecked, so no host sync); a float mask
            with values other than 0 and 1 is refused (a soft mask is not a pooling mask).
        mode: "mean", "weighted_mean" (weights 1, 2, 3, ... by rank among the row's pooled tokens),
            "max", "first", "last" (first/last pooled token), "mean_sqrt_len" (sum / sqrt(count)).
        dims: None (all H), an int, or a sequence of ints (Matryoshka: one output per dim).
        normalize: L2-normalize each output (x / max(||x||, eps)).
        out_dtype: dtype of the outputs (float32 by default; accumulation is always float32).

    Returns:
        [B, d] tensor, or a tuple of them when ``dims`` is a sequence. A row with no pooled token is zeros.
    """
    _check_tensor(hidden, "hidden", 3)
    mode = _check_mode(mode)
    dims_t, as_seq = normalize_dims(dims, hidden.shape[2])
    mask = _check_mask(mask, hidden)
    out_dtype = _check_out_dtype(out_dtype)
    eps = _check_eps(eps)
    be = _backend(hidden, mask)
    normalize = _check_flag(normalize, "normalize")
    hidden, mask = saveable(hidden, mask)
    outs = _PoolFunction.apply(hidden, mask, mode, dims_t, normalize, eps, out_dtype, be)
    return _as_result(outs, as_seq)


def _segment_bounds(starts, ends, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    def as_index(v, name):
        if isinstance(v, torch.Tensor):
            if v.dtype.is_floating_point or v.dtype == torch.bool or v.is_complex():
                raise TypeError(f"{name} must hold integers, got {v.dtype}")
            t = v
        else:
            try:
                vals = list(v)
                t = torch.as_tensor(vals) if vals else torch.empty(0, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise TypeError(f"{name} must be a sequence or tensor of ints") from exc
            if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
                raise TypeError(f"{name} must hold integers, got {t.dtype} values")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        return t.to(device=device, dtype=torch.int64).contiguous()

    s, e = as_index(starts, "starts"), as_index(ends, "ends")
    if s.shape != e.shape:
        raise ValueError(f"starts and ends must have the same length, got {s.shape[0]} and {e.shape[0]}")
    if s.numel() == 0:
        return s, e, False
    order = torch.argsort(s)
    prev_end = torch.cummax(e[order], 0).values
    flags = torch.stack(
        [
            ((s < 0) | (e < s) | (e > T)).any(),
            (s[order][1:] < prev_end[:-1]).any()
            if s.numel() > 1
            else torch.zeros((), dtype=bool, device=device),
        ]
    )
    bad, overlapping = flags.tolist()  # one host sync: bounds must be known valid before any kernel runs
    if bad:
        raise ValueError(f"segments must satisfy 0 <= starts[i] <= ends[i] <= T = {T}")
    return s, e, bool(overlapping)


def pool_segments(
    hidden2d: torch.Tensor,
    starts,
    ends,
    mode: str = "mean",
    *,
    dims=None,
    normalize: bool = False,
    out_dtype: torch.dtype = torch.float32,
    eps: float = 1e-12,
):
    """Pool segments of a packed token matrix: one output row per segment [starts[i], ends[i]).

    For packed/varlen batches (``starts = cu_seqlens[:-1]``, ``ends = cu_seqlens[1:]``) and late chunking
    (segments may overlap). ``hidden2d`` is [T, H]; starts/ends are int sequences or tensors of length S.
    Modes, dims, normalize and out_dtype as in :func:`pool`. Returns [S, d] (or a tuple over dims); an
    empty segment gives zeros. Checks the bounds on the host (one sync when they live on a GPU).
    """
    _check_tensor(hidden2d, "hidden2d", 2)
    mode = _check_mode(mode)
    dims_t, as_seq = normalize_dims(dims, hidden2d.shape[1])
    out_dtype = _check_out_dtype(out_dtype)
    eps = _check_eps(eps)
    s, e, overlapping = _segment_bounds(starts, ends, hidden2d.shape[0], hidden2d.device)
    be = _backend(hidden2d)
    hidden2d, s, e = saveable(hidden2d, s, e)
    outs = _PoolSegmentsFunction.apply(
        hidden2d, s, e, overlapping, mode, dims_t, _check_flag(normalize, "normalize"), eps, out_dtype, be
    )
    return _as_result(outs, as_seq)


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


@_dispatch.compile_disabled
def _prefix_normalize_eager(x2, dims, eps, dtype, be):
    return _PrefixNormalizeFunction.apply(x2, dims, eps, dtype, be)


def _prefix_normalize(x2: torch.Tensor, dims: tuple[int, ...], eps: float, dtype: torch.dtype):
    """Each prefix of the rows x2 [n, D] normalized: a tuple over ``dims``. Under torch.compile the torch
    path is traced (plain tensor ops), the Triton launch runs eagerly behind a graph break."""
    from llmembed_fast.reference import pooling_chunked

    be = _backend(x2)
    run = _PrefixNormalizeFunction.apply if be is pooling_chunked else _prefix_normalize_eager
    return run(x2, dims, eps, dtype, be)


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim (same as ``F.normalize(x, dim=-1)``), same shape and dtype.

    Computed in float32 (float64 for float64). Zero vectors map to zeros."""
    eps = _check_eps(eps)
    x2 = _as_rows(x, "x")
    (y,) = _prefix_normalize(x2, (x2.shape[1],), eps, x.dtype)
    return y.reshape(x.shape)


def matryoshka(x: torch.Tensor, dims, normalize: bool = True, eps: float = 1e-12):
    """Matryoshka prefixes of embeddings x [..., D]: x[..., :d] for each d, re-normalized when ``normalize``.

    ``dims`` is an int (returns one tensor) or a sequence (returns a tuple), each in [1, D]."""
    eps = _check_eps(eps)
    normalize = _check_flag(normalize, "normalize")
    x2 = _as_rows(x, "x")
    if dims is None:
        raise TypeError("dims must be an int or a sequence of ints, got None")
    dims_t, as_seq = normalize_dims(dims, x2.shape[1])
    lead = tuple(x.shape[:-1])
    if not normalize:
        outs = tuple(x[..., :d] for d in dims_t)
    else:
        outs = _prefix_normalize(x2, dims_t, eps, x.dtype)
        outs = tuple(y.reshape(*lead, d) for y, d in zip(outs, dims_t, strict=False))
    return _as_result(outs, as_seq)


# Under torch.compile the pooling ops run eagerly behind a graph break: their memory-bounding loops run over
# the sequence length and batch size in Python, so a traced copy would be specialized to every new L and B
# (a model compiled around them recompiled per padded length until dynamo's recompile limit).
pool = _dispatch.compile_disabled(pool)
pool_segments = _dispatch.compile_disabled(pool_segments)
