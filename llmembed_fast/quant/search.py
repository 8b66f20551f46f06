"""Exact top-k search over quantized codes: Hamming distance on binary codes, inner product on int8 codes."""

from __future__ import annotations

import torch

from llmembed_fast import _dispatch, _ext
from llmembed_fast.quant._args import (
    as_ranges,
    as_tensor,
    check_2d,
    check_codes,
    check_finite,
    check_float,
    check_k,
    to_output,
    use_extension,
)
from llmembed_fast.quant.codes import dequant_params


def hamming_topk(query_codes, doc_codes, k: int):
    """Exact k nearest documents by Hamming distance.

    query_codes [Q, B], doc_codes [N, B]: packed bits, both ``ubinary`` (uint8) or both ``binary`` (int8).
    Returns ``(distances int32 [Q, k], indices int64 [Q, k])``, ascending distance, equal distances by lower
    index. Runs on the CPU kernels (or the CUDA ones for CUDA tensors in a CUDA build).
    """
    q, q_np = as_tensor(query_codes, "query_codes")
    d, _ = as_tensor(doc_codes, "doc_codes")
    check_2d(q, "query_codes")
    check_2d(d, "doc_codes")
    check_codes(q, "query_codes")
    check_codes(d, "doc_codes")
    if q.dtype != d.dtype:
        raise TypeError(
            f"query_codes ({q.dtype}) and doc_codes ({d.dtype}) must be the same precision "
            "(both ubinary uint8 or both binary int8)"
        )
    if q.shape[1] != d.shape[1]:
        raise ValueError(
            f"query_codes have {q.shape[1]} bytes per code, doc_codes {d.shape[1]}: dimension mismatch"
        )
    if q.device != d.device:
        raise ValueError(f"query_codes are on {q.device}, doc_codes on {d.device}")
    k = check_k(k, d.shape[0])
    if not use_extension("hamming_topk", q.device):
        dist, idx = _hamming_topk_torch(q, d, k)
    else:
        dist, idx = _ext.ops().hamming_topk(q, d, k)
    return to_output(dist, q_np), to_output(idx, q_np)


def _hamming_topk_torch(q: torch.Tensor, d: torch.Tensor, k: int, budget: int = 1 << 22):
    """Plain-torch path (devices without the compiled op, or no extension): bit counts through a byte
    table, over blocks of queries and documents of at most ``budget`` byte pairs (~13 bytes of working
    memory each)."""
    Q, B = q.shape
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32, device=q.device)
    qu, du = q.view(torch.uint8), d.view(torch.uint8)
    qstep = max(1, min(Q, budget // max(1, 1024 * B)))  # room for >= 1024 documents per query block
    chunk = max(1, budget // max(1, qstep * B))
    out = []
    for q0 in range(0, Q, qstep):
        qb = qu[q0 : q0 + qstep]
        best_key = None
        for j0 in range(0, du.shape[0], chunk):
            part = du[j0 : j0 + chunk]
            dist = table[(qb[:, None, :] ^ part[None, :, :]).long()].sum(-1)
            key = dist.long() * (1 << 40) + torch.arange(j0, j0 + part.shape[0], device=q.device)
            cand = key if best_key is None else torch.cat([best_key, key], 1)
            best_key = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
        out.append(best_key)
    best_key = torch.cat(out) if out else torch.empty(0, k, dtype=torch.int64, device=q.device)
    return (best_key >> 40).to(torch.int32), best_key & ((1 << 40) - 1)


def fold_query(queries: torch.Tensor, ranges) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights float64 [Q, D], bias float64 [Q], exponent int32 [Q]):
    query . dequantize(u) = (bias + weights . u) * 2**exponent.

    Each query is first scaled by a power of two (exact) to a largest |value| in [0.5, 1), so huge queries
    cannot overflow the weights or their dot products; the ranking of the documents is unchanged."""
    offset, step = dequant_params(ranges)
    q64 = queries.to(torch.float64)
    offset, step = offset.to(q64.device), step.to(q64.device)
    amax = q64.abs().amax(1) if q64.shape[1] else q64.new_zeros(q64.shape[0])
    exp = torch.where(amax > 0, torch.frexp(amax).exponent, 0)
    q64 = _times_pow2(q64, -exp)
    bias = q64 @ offset
    if not bool(torch.isfinite(torch.cat([offset, step, bias])).all()):  # one host sync for the three
        if not bool(torch.isfinite(step).all() and torch.isfinite(offset).all()):
            raise ValueError("ranges are too wide: (max - min) / 255 overflows float64")
        raise ValueError("ranges hold values too large: the queries' scores overflow float64")
    return q64 * step, bias, exp


def _times_pow2(x: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """x [Q, n] * 2**exp [Q], exactly, in two factors (2**1029 alone would overflow float64)."""
    half = exp // 2
    x = torch.ldexp(x, half[:, None].to(x.dtype))
    return torch.ldexp(x, (exp - half)[:, None].to(x.dtype))


def unfold_scores(scores: torch.Tensor, exp: torch.Tensor) -> torch.Tensor:
    """Scores [Q, k] of the scaled queries (``fold_query``) back at the queries' own scale."""
    return _times_pow2(scores, exp)


def int8_topk(queries, doc_codes, ranges, k: int):
    """Exact k best documents by the inner product of the float queries with the dequantized codes.

    queries [Q, D] float, doc_codes [N, D] int8 or uint8 (from ``quantize`` with these ``ranges [2, D]``).
    Returns ``(scores float32 [Q, k], indices int64 [Q, k])``, descending score (computed in float64),
    equal scores by lower index (ranked on ``weights . u`` of ``fold_query``, before its per-query bias is
    added: distinct scores that round equal once it is added keep their exact order). The scan is an
    integer SIMD dot with a proven error bound per row; rows that could reach the top k are rescored exactly.
    """
    q, q_np = as_tensor(queries, "queries")
    c, _ = as_tensor(doc_codes, "doc_codes")
    check_2d(q, "queries")
    check_2d(c, "doc_codes")
    check_float(q, "queries")
    check_codes(c, "doc_codes")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dimensions, doc_codes {c.shape[1]}: dimension mismatch")
    r = as_ranges(ranges, c.shape[1])
    q = q.detach()
    check_finite(q, "queries")
    check_finite(r, "ranges")
    if c.shape[1] > 65536:
        raise ValueError(f"doc_codes: at most 65536 dimensions are supported, got {c.shape[1]}")
    k = check_k(k, c.shape[0])
    dev = c.device
    w, bias, exp = fold_query(q.to(dev), r.to(dev))
    if use_extension("int8_topk", dev):
        s, idx = _ext.ops().int8_topk(w.contiguous(), c, k)
    else:
        s, idx = _int8_topk_torch(w, c, k)
    return to_output(unfold_scores(s + bias[:, None], exp).to(torch.float32), q_np), to_output(idx, q_np)


def _as_unsigned(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes read as unsigned (code + 128, as ``fold_query`` expects); other dtypes as they are."""
    return (codes.view(torch.uint8) ^ 0x80) if codes.dtype == torch.int8 else codes


def _exact_split(w: torch.Tensor, d: int) -> torch.Tensor:
    """w [Q, D] float64 as two pieces [2Q, D] whose dot products with codes in [0, 255] are exact in float64
    for any D <= ``d`` (each piece holds ``bits`` significant bits on a per-query grid, so every partial sum
    is an integer multiple of the grid below 2**52 and no summation order can round it). Their sum keeps
    2 * bits bits below each query's largest |weight| (>= 56 bits at D = 65536): beyond float64's own."""
    bits = 52 - 8 - max(1, d - 1).bit_length()
    amax = w.abs().amax(1) if w.shape[1] else w.new_zeros(w.shape[0])
    exp = torch.where(amax > 0, torch.frexp(amax).exponent, 0)  # |w| < 2**exp
    hi = _times_pow2(torch.round(_times_pow2(w, bits - exp)), exp - bits)
    lo = w - hi  # exact: |lo| <= 2**(exp - bits - 1)
    shift = exp - bits - 1
    lo = _times_pow2(torch.round(_times_pow2(lo, bits - shift)), shift - bits)
    return torch.cat([hi, lo])


def _int8_topk_torch(w: torch.Tensor, c: torch.Tensor, k: int, budget: int = 1 << 23):
    """Plain-torch path (GPUs, or no extension): float64 scores, documents in chunks of at most ``budget``
    elements of working memory, ties by lower index. The scores come from matmuls that are exact (see
    ``_exact_split``), so a document's score does not depend on where a BLAS kernel put its row: equal
    codes score equal and rank by index, as on the extension."""
    u = _as_unsigned(c)
    Q, D = w.shape
    w2 = _exact_split(w, D)
    chunk = max(1, budget // (2 * Q + D + k))
    best_s = best_i = None
    for j0 in range(0, u.shape[0], chunk):
        s2 = w2 @ u[j0 : j0 + chunk].to(torch.float64).T
        s = s2[:Q] + s2[Q:]
        i = torch.arange(j0, j0 + s.shape[1], device=w.device).expand_as(s)
        if best_s is not None:
            s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
        # stable descending sort keeps lower indices first among equal scores
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = s.gather(1, order), i.gather(1, order)
    return best_s, best_i


def score_rows(w: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Exact float64 scores ``w[q] . row[cand[q, j]]`` [Q, c]: w [Q, D] float64, rows [N, D] int8 codes
    (read as unsigned, code + 128, as ``fold_query`` expects) / uint8 codes / float32 vectors. The
    extension's fixed summation order, or float64 matmuls in query chunks without it."""
    if use_extension("score_rows", w.device):
        return _ext.ops().score_rows(w.contiguous(), rows, cand.contiguous())
    u = _as_unsigned(rows)
    out = torch.empty(cand.shape, dtype=torch.float64, device=w.device)
    step = max(1, (1 << 23) // max(1, cand.shape[1] * rows.shape[1]))  # <= 64 MiB of gathered rows
    for q0 in range(0, cand.shape[0], step):
        g = u[cand[q0 : q0 + step]].to(torch.float64)  # [q, c, D]
        out[q0 : q0 + step] = torch.einsum("qcd,qd->qc", g, w[q0 : q0 + step])
    return out


# Under torch.compile the searches run eagerly behind a graph break: host-side checks, no gradient, and
# the exact query folding (frexp) that inductor's CPU code generation does not compile.
hamming_topk = _dispatch.compile_disabled(hamming_topk)
int8_topk = _dispatch.compile_disabled(int8_topk)
