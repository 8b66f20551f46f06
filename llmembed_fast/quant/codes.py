"""Embedding quantization: calibrate, quantize (bit-exact with sentence-transformers'
``quantize_embeddings``), dequantize and unpack_bits.

Inputs may be torch tensors (CPU or CUDA) or numpy arrays; outputs are of the same kind.
"""

from __future__ import annotations

import numpy as np
import torch

from llmembed_fast import _dispatch, _ext
from llmembed_fast.quant._args import (
    as_ranges,
    as_tensor,
    check_2d,
    check_codes,
    check_float,
    check_range_values,
    to_output,
    use_extension,
)

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def calibrate(embeddings):
    """Per-dimension ``[min, max]`` of ``embeddings [N, D]`` -> ranges ``[2, D]``, float32 (float64 for
    float64 input, which ``quantize`` rounds to float32 as sentence-transformers does: the same codes).

    ``quantize(x, p, ranges=calibrate(x))`` equals ``quantize(x, p)``. NaN propagates, as in numpy (and
    ``quantize`` refuses such ranges). Not differentiable.
    """
    x, was_np = as_tensor(embeddings, "embeddings")
    check_2d(x, "embeddings")
    check_float(x, "embeddings")
    if x.shape[0] == 0:
        raise ValueError("embeddings is empty: calibration needs at least one row")
    lo, hi = torch.aminmax(x.detach(), dim=0)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return to_output(torch.stack([lo, hi]).to(dt), was_np)


def _numpy_dtype(t: torch.Tensor) -> np.dtype:
    # numpy has no bfloat16: bfloat16 data is quantized in float32 arithmetic (exact widening).
    return (
        np.dtype(np.float32) if t.dtype == torch.bfloat16 else np.dtype(str(t.dtype).removeprefix("torch."))
    )


def _ranges_numpy(ranges, d: int) -> np.ndarray:
    """Given ``ranges`` checked (finite, min <= max: others made garbage codes) as a numpy array."""
    r = as_ranges(ranges, d).cpu()
    r = (r.float() if r.dtype == torch.bfloat16 else r).numpy()
    check_range_values(r)
    return r


def scalar_params(ranges: np.ndarray, x_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(starts, steps) exactly as sentence-transformers (>= 6.2) computes them: the ranges in float32,
    steps = (max - min) / 255 in float32, a zero step counts as 1; both in the dtype numpy promotes the
    embeddings and float32 to (float64 for float64 embeddings, else float32). ValueError when the ranges
    leave float32's range or max - min overflows it (every code would be the same, silently)."""
    with np.errstate(over="ignore", invalid="ignore"):
        r = ranges.astype(np.float32)
        steps = (r[1, :] - r[0, :]) / np.float32(255)
    if not np.isfinite(r).all():
        raise ValueError("ranges hold values beyond float32's range: the steps are computed in float32")
    if not np.isfinite(steps).all():
        raise ValueError("ranges are too wide: max - min overflows float32")
    steps = np.where(steps == 0, np.float32(1), steps)
    ct = np.result_type(x_dtype, np.float32)
    return r[0, :].astype(ct), steps.astype(ct)


def _quantize_scalar_torch(x: torch.Tensor, starts: torch.Tensor, steps: torch.Tensor, signed: bool):
    """Plain-torch path (devices without the compiled op): same arithmetic, one op at a time."""
    ct = starts.dtype
    v = ((x.to(ct) - starts) / steps).floor().clamp(0, 255)
    nan = v.isnan()
    code = torch.nan_to_num(v, nan=0.0).to(torch.uint8)
    if not signed:
        return code
    # NaN gives int8 0, as sentence-transformers' (NaN - 128).astype(int8) does, not code 0 - 128
    return (code ^ 0x80).masked_fill_(nan, 0).view(torch.int8)


def quantize(embeddings, precision: str, ranges=None, calibration_embeddings=None):
    """Quantize ``embeddings [N, D]`` to ``precision``: "int8" | "uint8" [N, D], "binary" (int8) |
    "ubinary" (uint8) [N, ceil(D / 8)], or "float32".

    int8/uint8 use per-dimension ranges: ``ranges [2, D]`` if given, else min/max of
    ``calibration_embeddings``, else of ``embeddings`` itself (at least two rows: one row's ranges are
    empty, a ValueError as in sentence-transformers). Bit-exact with
    ``sentence_transformers.util.quantization.quantize_embeddings`` 6.2+ (bfloat16 input is computed as
    float32); before 6.2 it computed the steps in the ranges' dtype, which differs for float16 and float64
    ranges.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    x, was_np = as_tensor(embeddings, "embeddings")
    check_2d(x, "embeddings")
    check_float(x, "embeddings")
    if precision == "float32":  # always a copy, as numpy's astype (a view could write into a read-only mmap)
        return to_output(x.detach().to(torch.float32, copy=True), was_np)
    x = x.detach()  # model outputs may require grad: codes are not differentiable
    if precision.endswith("binary"):
        if use_extension("pack_bits", x.device):
            packed = _ext.ops().pack_bits(x)
        else:  # other devices: plain torch
            packed = _pack_bits_torch(x)
        out = (packed ^ 0x80).view(torch.int8) if precision == "binary" else packed
        return to_output(out, was_np)

    # int8 / uint8
    d = x.shape[1]
    if ranges is None:
        if calibration_embeddings is not None:
            c, _ = as_tensor(calibration_embeddings, "calibration_embeddings")
            check_2d(c, "calibration_embeddings")
            check_float(c, "calibration_embeddings")
            if c.shape[1] != d:
                raise ValueError(f"calibration_embeddings has {c.shape[1]} dimensions, embeddings {d}")
            if c.shape[0] == 0:
                raise ValueError("calibration_embeddings is empty")
            src = c.detach()
        else:
            if x.shape[0] == 0:
                return to_output(
                    torch.empty(
                        0, d, dtype=torch.int8 if precision == "int8" else torch.uint8, device=x.device
                    ),
                    was_np,
                )
            if x.shape[0] == 1:
                raise ValueError(
                    f"embeddings: {precision} ranges cannot be calibrated on a single row (max == min in "
                    "every dimension); pass ranges= or calibration_embeddings= (e.g. quant.calibrate of a "
                    "representative sample)"
                )
            src = x
        lo, hi = torch.aminmax(src, dim=0)
        r = torch.stack([lo, hi])
        r = (r.float() if r.dtype == torch.bfloat16 else r).cpu().numpy()
        if not np.isfinite(r).all():  # NaN or inf in the data: the steps would be NaN, every code garbage
            name = "embeddings" if calibration_embeddings is None else "calibration_embeddings"
            bad = int((~np.isfinite(r)).any(axis=0).sum())
            raise ValueError(
                f"{name} hold NaN or inf in {bad} dimension(s): the {precision} ranges calibrated on them "
                "are not finite; pass finite calibration_embeddings= or ranges="
            )
    else:
        r = _ranges_numpy(ranges, d)
    starts, steps = scalar_params(r, _numpy_dtype(x))
    st = torch.from_numpy(starts).to(x.device)
    sp = torch.from_numpy(steps).to(x.device)
    xin = x.float() if (x.dtype == torch.bfloat16 and x.device.type != "cpu") else x
    signed = precision == "int8"
    if use_extension("quantize_scalar", x.device):
        out = _ext.ops().quantize_scalar(xin, st, sp, signed)
    else:
        out = _quantize_scalar_torch(xin, st, sp, signed)
    return to_output(out, was_np)


def _pack_bits_torch(x: torch.Tensor) -> torch.Tensor:
    n, d = x.shape
    bits = (x > 0).to(torch.uint8)
    pad = (-d) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=x.device)
    return (bits.view(n, (d + pad) // 8, 8) * weights).sum(-1, dtype=torch.uint8)


def dequant_params(ranges) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset, step) in float64 such that value = offset + u * step for uint8 code u (int8: u = code + 128).

    Reconstructs the middle of each quantization bucket. A dimension with max == min has the step that
    ``quantize`` gives it, 1 (as sentence-transformers does): its codes count whole units above min, and a
    value quantized there comes back within 0.5 of itself (not all as min: a ranking over such codes would
    ignore them)."""
    r = ranges if isinstance(ranges, torch.Tensor) else torch.from_numpy(np.asarray(ranges))
    r = r.detach().to(torch.float64)
    step = (r[1] - r[0]) / 255
    step = torch.where(step == 0, torch.ones_like(step), step)
    return r[0] + 0.5 * step, step


def dequantize(codes, ranges):
    """int8/uint8 ``codes [N, D]`` + ``ranges [2, D]`` -> float32 ``[N, D]``, the middle of each code's
    bucket: min + (u + 0.5) * (max - min) / 255 with u the uint8 code (int8 code + 128)."""
    c, was_np = as_tensor(codes, "codes")
    check_2d(c, "codes")
    check_codes(c, "codes")
    r = as_ranges(ranges, c.shape[1])
    offset, step = dequant_params(r.to(c.device))
    u = (c.view(torch.uint8) ^ 0x80) if c.dtype == torch.int8 else c
    return to_output((offset + u.to(torch.float64) * step).to(torch.float32), was_np)


def unpack_bits(codes, dim: int | None = None):
    """Binary ``codes [N, B]`` (ubinary uint8 or binary int8) -> uint8 bits ``[N, dim]`` (0/1), first
    dimension from the most significant bit, as ``numpy.unpackbits(codes, axis=-1, count=dim)``."""
    c, was_np = as_tensor(codes, "codes")
    check_2d(c, "codes")
    check_codes(c, "codes")
    nb = c.shape[1]
    if dim is None:
        dim = nb * 8
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise TypeError(f"dim must be an int in [{nb * 8 - 7}, {nb * 8}] for {nb}-byte codes, got {dim!r}")
    if not (nb * 8 - 7 <= dim <= nb * 8):
        raise ValueError(f"dim must be an int in [{nb * 8 - 7}, {nb * 8}] for {nb}-byte codes, got {dim!r}")
    u = (c.view(torch.uint8) ^ 0x80) if c.dtype == torch.int8 else c
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=c.device)
    bits = (u.unsqueeze(-1) >> shifts) & 1
    return to_output(bits.reshape(c.shape[0], nb * 8)[:, :dim].contiguous(), was_np)


# Under torch.compile these run eagerly behind a graph break: they check their inputs on the host and work
# through numpy, nothing in them is differentiable, and the codes must stay bit-exact with
# sentence-transformers (inductor computes float16 steps without their intermediate rounding: codes off by 1).
calibrate = _dispatch.compile_disabled(calibrate)
quantize = _dispatch.compile_disabled(quantize)
dequantize = _dispatch.compile_disabled(dequantize)
unpack_bits = _dispatch.compile_disabled(unpack_bits)
