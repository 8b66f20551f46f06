"""The fused embedding head (pool -> Matryoshka slice -> L2 normalize) against the float64 reference,
on both backends (Triton through the interpreter), forward and backward."""

import itertools
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llmembed_fast as lf
from llmembed_fast import reference as R

MODES = lf.POOLING_MODES
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Gradients w.r.t. hidden come back in hidden's dtype: their rounding bounds the achievable error.
GRAD_RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
OUT_TOL = 2e-5  # outputs are float32 accumulations of exactly the same inputs as the reference
DIMS_CASES = [(None, False), (64, True), ((17, 64, 123), True), ((5, 40), False)]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_mask(B: int, L: int, padding: str, gen: torch.Generator) -> torch.Tensor:
    """[B, L] bool: lengths drawn in [1, L] (row 0 always full, one row empty when B > 2), laid out as
    right padding, left padding, or with holes (an excluded prefix plus random gaps)."""
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    lengths[0] = L
    if B > 2:
        lengths[B - 1] = 0
    pos = torch.arange(L)
    if padding == "right":
        return pos[None, :] < lengths[:, None]
    if padding == "left":
        return pos[None, :] >= (L - lengths)[:, None]
    mask = (pos[None, :] < lengths[:, None]) & (torch.rand(B, L, generator=gen) > 0.3)
    mask[:, :3] = False  # an instruction prefix that must not be pooled
    return mask


def _ref_grad(hidden, mask, mode, dims, normalize, grads):
    h64 = hidden.detach().double().requires_grad_(True)
    outs = R.pool(h64, mask, mode, dims=dims, normalize=normalize)
    torch.autograd.backward(outs, [g.double() for g in grads])
    return [o.detach() for o in outs], h64.grad


def _as_list(x):
    return list(x) if isinstance(x, tuple) else [x]


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, floor: float = 1e-30):
    """Max abs error relative to the reference's max magnitude, or ``floor`` if larger (NaN fails)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got = got.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    scale = want.abs().max().clamp_min(floor)
    err = ((got - want).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", MODES)
def test_pool_matches_reference(backend, mode, dtype):
    B, L, H = 3, 37, 123
    for padding, (dims, normalize) in itertools.product(("right", "left", "holes"), DIMS_CASES):
        gen = torch.Generator().manual_seed(_seed(backend, mode, dtype, padding, dims, normalize))
        hidden = torch.randn(B, L, H, generator=gen).to(dtype).requires_grad_(True)
        mask = make_mask(B, L, padding, gen)
        outs = _as_list(lf.pool(hidden, mask, mode, dims=dims, normalize=normalize))
        grads = [torch.randn(o.shape, generator=gen) for o in outs]
        torch.autograd.backward(outs, grads)
        ref_outs, ref_grad = _ref_grad(hidden, mask, mode, dims, normalize, grads)
        ctx = f"{mode} {padding} dims={dims} normalize={normalize}"
        assert len(outs) == len(ref_outs)
        for o, r in zip(outs, ref_outs, strict=False):
            assert o.dtype == torch.float32
            assert_close_rel(o, r, OUT_TOL, f"output {ctx}")
        assert hidden.grad.dtype == dtype
        assert_close_rel(hidden.grad, ref_grad, GRAD_RTOL[dtype], f"grad {ctx}")
        # the empty last row pools to zeros, also after normalization, and gets no gradient
        for o in outs:
            assert (o[B - 1] == 0).all()
        assert (hidden.grad[B - 1] == 0).all()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 8), (4, 130, 300), (5, 64, 2049), (2, 4100, 24)])
def test_pool_odd_shapes_and_seeds(backend, seed, shape):
    B, L, H = shape
    gen = torch.Generator().manual_seed(seed * 1000 + H)
    hidden = torch.randn(B, L, H, generator=gen, requires_grad=True)
    mask = torch.rand(B, L, generator=gen) > 0.5
    mask[0, 0] = True
    mode = MODES[seed % len(MODES)] if H < 2000 else "mean"
    dims = sorted({max(1, H // 3), H})
    outs = lf.pool(hidden, mask, mode, dims=dims, normalize=True)
    grads = [torch.randn(o.shape, generator=gen) for o in outs]
    torch.autograd.backward(outs, grads)
    ref_outs, ref_grad = _ref_grad(hidden, mask, mode, dims, True, grads)
    for o, r in zip(outs, ref_outs, strict=False):
        assert_close_rel(o, r, OUT_TOL, f"{mode} {shape}")
    # floor: with H = 1 a normalized output is sign(x) and its exact gradient is 0 (rounding noise remains)
    assert_close_rel(hidden.grad, ref_grad, GRAD_RTOL[torch.float32], f"grad {mode} {shape}", floor=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_left_and_right_padding_agree(backend, mode):
    """The same tokens laid out with left or right padding pool to the same vector (weighted_mean too)."""
    gen = torch.Generator().manual_seed(7)
    B, L, H = 4, 19, 33
    lengths = torch.tensor([19, 7, 1, 12])
    pos = torch.arange(L)
    right = pos[None] < lengths[:, None]
    left = pos[None] >= (L - lengths)[:, None]
    hidden_r = torch.randn(B, L, H, generator=gen)
    hidden_l = torch.zeros_like(hidden_r)
    for b in range(B):
        n = int(lengths[b])
        hidden_l[b, L - n :] = hidden_r[b, :n]
    out_r = lf.pool(hidden_r, right, mode, normalize=True)
    out_l = lf.pool(hidden_l, left, mode, normalize=True)
    torch.testing.assert_close(out_r, out_l, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.int32, torch.float32, torch.bfloat16])
def test_mask_dtypes_and_noncontiguous_inputs(backend, mask_dtype):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(3, 150, 29, generator=gen)  # [B, H', L]: transposed to get a non-contiguous hidden
    hidden = base.transpose(1, 2)[:, :, :100]  # [3, 29, 100], strides (150*29, 1, 29)
    assert not hidden.is_contiguous()
    mask_full = torch.rand(29, 3, generator=gen) > 0.4
    mask = mask_full.t().to(mask_dtype)  # non-contiguous mask
    assert not mask.is_contiguous()
    h = hidden.clone().requires_grad_(True)
    hidden_nc = h.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    for mode in ("mean", "max", "last"):
        got = lf.pool(hidden_nc, mask, mode, dims=(50, 100), normalize=True)
        ref = R.pool(hidden.double(), mask_full.t(), mode, dims=(50, 100), normalize=True)
        for g, r in zip(got, ref, strict=False):
            assert_close_rel(g, r, OUT_TOL, f"{mode} {mask_dtype}")
        sum(o.sum() for o in got).backward()
        assert hidden_nc.grad.shape == hidden.shape and torch.isfinite(hidden_nc.grad).all()
        hidden_nc.grad = None


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_out_dtype(backend, out_dtype):
    hidden = torch.randn(2, 9, 40)
    out = lf.pool(hidden, None, "mean", dims=(8, 40), normalize=True, out_dtype=out_dtype)
    ref = R.pool(hidden.double(), None, "mean", dims=(8, 40), normalize=True)
    for o, r in zip(out, ref, strict=False):
        assert o.dtype == out_dtype
        torch.testing.assert_close(o.double(), r, rtol=1e-2, atol=1e-2)


def test_zero_length_and_empty_batch(backend):
    out = lf.pool(torch.randn(2, 0, 8), torch.zeros(2, 0, dtype=torch.bool), "mean", normalize=True)
    assert out.shape == (2, 8) and (out == 0).all()
    out = lf.pool(torch.randn(0, 5, 8), torch.ones(0, 5, dtype=torch.bool), "max", dims=[4, 8])
    assert [o.shape for o in out] == [(0, 4), (0, 8)]


@pytest.mark.parametrize("mode", MODES)
def test_zero_length_backward_is_zero(backend, mode):
    """No token at all (L = 0, or T = 0 packed): the pooled rows are zeros and so are the gradients (the
    CPU path's max / first / last backward indexed an empty token axis)."""
    h = torch.randn(2, 0, 8, requires_grad=True)
    lf.pool(h, None, mode).sum().backward()
    assert h.grad.shape == (2, 0, 8)
    (ref,) = R.pool(torch.randn(2, 0, 8, dtype=torch.float64), torch.zeros(2, 0, dtype=torch.bool), mode)
    assert ref.shape == (2, 8) and (ref == 0).all()
    h = torch.randn(0, 4, requires_grad=True)
    out = lf.pool_segments(h, [0], [0], mode)
    assert out.shape == (1, 4) and (out == 0).all()
    out.sum().backward()
    assert h.grad.shape == (0, 4)


def test_mask_from_inference_mode(backend):
    """A mask (or segment bounds) made under inference_mode with trainable hidden states: inference
    tensors cannot be saved for backward, so they are copied; same gradients."""
    h = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    with torch.inference_mode():
        mi, si, ei = mask.clone(), torch.tensor([0, 3]), torch.tensor([4, 15])
    grads = []
    for m, s, e in ((mi, si, ei), (mask, torch.tensor([0, 3]), torch.tensor([4, 15]))):
        a = h.clone().requires_grad_()
        (lf.pool(a, m, "weighted_mean", normalize=True).sum()
         + lf.pool_segments(a.view(15, 8), s, e, "mean", normalize=True).sum()).backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_all_masked_rows_are_zero_and_finite(backend):
    hidden = torch.randn(3, 6, 10, requires_grad=True)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for mode in MODES:
        out = lf.pool(hidden, mask, mode, dims=[3, 10], normalize=True)
        assert all((o == 0).all() for o in out)
        sum(o.sum() for o in out).backward()
        assert (hidden.grad == 0).all()
        hidden.grad = None


def test_gradcheck_reference_float64():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    for mode in MODES:
        assert torch.autograd.gradcheck(
            lambda h, m=mode: tuple(R.pool(h, mask, m, dims=(3, 6), normalize=True)), (hidden,)
        )


def test_gradcheck_fused_float64():
    """float64 runs the chunked torch path with its own backward: gradcheck it directly."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    for mode in MODES:
        for normalize in (False, True):
            assert torch.autograd.gradcheck(
                lambda h, m=mode, n=normalize: lf.pool(
                    h, mask, m, dims=(2, 6), normalize=n, out_dtype=torch.float64
                ),
                (hidden,),
            )


@pytest.mark.parametrize("mode", MODES)
def test_outputs_may_be_edited_in_place(backend, mode):
    """Like torch's own reductions, the outputs can be edited in place before backward (normalized or not,
    one dim or several): the gradients are those of the edited result."""
    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(3, 7, 16, generator=gen)
    mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    for dims, normalize in (((16,), False), ((16,), True), ((4, 16), False), ((16, 16), False)):
        h = hidden.clone().requires_grad_(True)
        outs = _as_list(lf.pool(h, mask, mode, dims=dims if len(dims) > 1 else dims[0], normalize=normalize))
        assert len({id(o) for o in outs}) == len(outs)  # repeated dims: distinct tensors
        for o in outs:
            o.mul_(3.0)
        grads = [torch.randn(o.shape, generator=gen) for o in outs]
        torch.autograd.backward(outs, grads)
        _, want = _ref_grad(hidden, mask, mode, dims, normalize, [3.0 * g for g in grads])
        assert_close_rel(h.grad, want, 1e-5, f"{mode} {dims} normalize={normalize}")


def test_max_propagates_nan(backend):
    """A NaN among the pooled tokens makes the max NaN (as torch.amax and the reference), and its gradient
    goes to the first NaN position; masked-out NaNs are ignored; other columns are unaffected."""
    h = torch.tensor([[[float("nan"), 1.0, 5.0], [3.0, float("nan"), 4.0], [2.0, 0.0, float("nan")]]])
    mask = torch.tensor([[1, 1, 0]])  # the third token (a NaN in column 2) is padding
    hg = h.clone().requires_grad_(True)
    out = lf.pool(hg, mask, "max")
    assert torch.isnan(out[0, :2]).all() and out[0, 2].item() == 5.0
    out.backward(torch.ones_like(out))
    want = torch.zeros_like(h)
    want[0, 0, 0] = want[0, 1, 1] = want[0, 0, 2] = 1.0
    assert torch.equal(hg.grad, want)
    (ref,) = R.pool(h.double(), mask, "max")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    seg = lf.pool_segments(h[0], torch.tensor([0, 1]), torch.tensor([2, 3]), "max")
    assert torch.isnan(seg[0, :2]).all() and seg[0, 2].item() == 5.0
    assert torch.isnan(seg[1]).tolist() == [False, True, True]
    # a +inf before the NaN: the gradient still goes to the NaN (the kernel's search gave it to the +inf)
    inf, nan = float("inf"), float("nan")
    h = torch.tensor([[[inf, 1.0], [nan, 2.0], [0.0, inf]]])
    for pooled in (lambda x: lf.pool(x, torch.ones(1, 3), "max"),
                   lambda x: lf.pool_segments(x[0], torch.tensor([0]), torch.tensor([3]), "max")):
        hg = h.clone().requires_grad_(True)
        out = pooled(hg)
        assert torch.isnan(out[0, 0]) and out[0, 1].item() == inf
        out.backward(torch.ones_like(out))
        assert hg.grad[0].tolist() == [[0, 0], [1, 0], [0, 1]]


def test_reference_first_and_last_ignore_other_tokens():
    """The reference's first/last read one token: a NaN/inf among the other pooled tokens stays out (its
    0 weight times inf made NaN), in pool and pool_segments."""
    inf, nan = float("inf"), float("nan")
    h = torch.tensor([[[1.0, 2.0], [inf, nan], [3.0, 4.0]]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    assert R.pool(h, mask, "first")[0].tolist() == [[1.0, 2.0]]
    assert R.pool(h, mask, "last")[0].tolist() == [[3.0, 4.0]]
    seg = R.pool_segments(h[0], torch.tensor([0]), torch.tensor([3]), "last")
    assert seg[0].tolist() == [[3.0, 4.0]]


def test_max_of_all_minus_inf_goes_to_the_first_pooled_token(backend):
    """A column whose pooled values are all -inf: the max is -inf and its gradient goes to the first pooled
    token, as torch.max(dim) (it was dropped; the reference read a padding slot's value)."""
    h = torch.tensor([[[5.0, 1.0], [float("-inf"), 2.0], [float("-inf"), 0.0]]])
    mask = torch.tensor([[0, 1, 1]])
    hg = h.clone().requires_grad_(True)
    out = lf.pool(hg, mask, "max")
    assert out.tolist() == [[float("-inf"), 2.0]]
    out.sum().backward()
    assert hg.grad[0].tolist() == [[0, 0], [1, 1], [0, 0]]
    (ref,) = R.pool(h.double().requires_grad_(True), mask, "max")
    assert ref.tolist() == [[float("-inf"), 2.0]]
    h2 = h[0].clone().requires_grad_(True)
    seg = lf.pool_segments(h2, torch.tensor([1]), torch.tensor([3]), "max")
    assert seg.tolist() == [[float("-inf"), 2.0]]
    seg.sum().backward()
    assert h2.grad.tolist() == [[0, 0], [1, 1], [0, 0]]


def test_segment_first_and_last_read_one_token(backend):
    """pool_segments "first" / "last" read only that token: a NaN or inf elsewhere in the segment stays out
    (the torch path summed every token with 0 weights, and 0 * inf is NaN)."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[1.0, 2.0], [inf, 0.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [nan, 9.0]],
                     dtype=torch.float16)
    starts, ends = torch.tensor([0, 3, 2]), torch.tensor([3, 6, 2])  # the last one is empty
    first = lf.pool_segments(x, starts, ends, "first")
    assert first.tolist() == [[1.0, 2.0], [5.0, 6.0], [0.0, 0.0]]
    last = lf.pool_segments(x, starts, ends, "last")
    assert last[0].tolist() == [3.0, 4.0] and torch.isnan(last[1, 0]) and last[1, 1].item() == 9.0
    assert last[2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_padding_is_not_read(backend, mode, dtype):
    """NaN/inf in tokens outside the mask (left padding of a half-precision model can hold them) change
    nothing: the output and the gradient equal those with zeros there, on every backend and in the
    reference (the torch path summed 0 * NaN over all tokens). A NaN among the pooled tokens still shows."""
    gen = torch.Generator().manual_seed(_seed("nonfinite", mode, str(dtype)))
    B, L, H = 4, 9, 40
    mask = make_mask(B, L, "left", gen)
    mask[1, :] = True
    clean = torch.randn(B, L, H, generator=gen).to(dtype)
    dirty = clean.clone()
    pad = ~mask
    dirty[pad] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype).repeat(int(pad.sum()))[
        : int(pad.sum()), None].expand(-1, H)
    outs = []
    for h in (clean, dirty):
        hg = h.clone().requires_grad_(True)
        out = lf.pool(hg, mask, mode, dims=(8, 40), normalize=True)
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
        outs.append(([o.detach() for o in out], hg.grad))
    for a, b in zip(outs[0][0], outs[1][0], strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    assert torch.equal(outs[0][1], outs[1][1])
    for h in (clean, dirty):
        (r,) = R.pool(h.double(), mask, mode)
        assert torch.isfinite(r).all()
    dirty[1, 4, 3] = float("nan")  # a pooled token: row 1 is fully pooled
    out = lf.pool(dirty, mask, mode)
    if mode in ("first", "last"):
        assert torch.isfinite(out).all()  # position 4 is neither the first nor the last token of row 1
    else:
        assert out[1, 3].isnan() and torch.isfinite(out[[0, 2, 3]]).all()


def test_double_backward_raises():
    """The fused backwards are not differentiable: create_graph=True raises instead of a wrong
    second-order gradient (gradient penalties through these ops need the reference implementation)."""
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for fn in (
        lambda: lf.pool(x, mask, "mean", normalize=True),
        lambda: lf.pool(x, mask, "max"),
        lambda: lf.l2_normalize(x[:, 0]),
        lambda: lf.matryoshka(x[:, 0], (2, 6))[0],
        lambda: lf.pool_segments(x.reshape(10, 6), torch.tensor([0, 4]), torch.tensor([4, 10]), "mean"),
    ):
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(fn().sum(), x, create_graph=True)
        (g,) = torch.autograd.grad(fn().sum(), x)  # first order is unaffected
        assert torch.isfinite(g).all()


# ------------------------------------------------------------------------------------------------
# pool_segments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", MODES)
def test_pool_segments_matches_reference(backend, mode, dtype):
    T, H = 53, 45
    for overlap in (False, True):
        gen = torch.Generator().manual_seed(_seed("seg", backend, mode, dtype, overlap))
        hidden = torch.randn(T, H, generator=gen).to(dtype).requires_grad_(True)
        if overlap:  # late-chunking style spans, overlapping, plus an empty one
            starts, ends = [0, 5, 20, 20, 40], [12, 30, 20, 45, 53]
        else:  # packed batch: cu_seqlens with a gap and an empty segment
            starts, ends = [0, 9, 9, 30, 41], [9, 9, 25, 41, 53]
        dims = (16, 45)
        outs = lf.pool_segments(hidden, starts, ends, mode, dims=dims, normalize=True)
        grads = [torch.randn(o.shape, generator=gen) for o in outs]
        torch.autograd.backward(outs, grads)
        h64 = hidden.detach().double().requires_grad_(True)
        ref = R.pool_segments(h64, starts, ends, mode, dims=dims, normalize=True)
        torch.autograd.backward(ref, [g.double() for g in grads])
        for o, r in zip(outs, ref, strict=False):
            assert_close_rel(o, r.detach(), OUT_TOL, f"segments {mode} overlap={overlap}")
        assert_close_rel(hidden.grad, h64.grad, GRAD_RTOL[dtype], f"segments grad {mode} overlap={overlap}")


def test_pool_segments_equals_padded_pool(backend):
    """A packed batch pooled by segments equals the same batch padded and pooled with a mask."""
    gen = torch.Generator().manual_seed(5)
    lengths = [7, 1, 12]
    H = 20
    rows = [torch.randn(n, H, generator=gen) for n in lengths]
    packed = torch.cat(rows)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)))
    padded = torch.zeros(3, max(lengths), H)
    mask = torch.zeros(3, max(lengths), dtype=torch.bool)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
        mask[i, : len(r)] = True
    for mode in MODES:
        a = lf.pool_segments(packed, cu[:-1], cu[1:], mode, normalize=True)
        b = lf.pool(padded, mask, mode, normalize=True)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# l2_normalize, matryoshka, EmbeddingHead
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_l2_normalize(backend, dtype):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 3, 77, generator=gen).to(dtype)
    x[0, 1] = 0  # zero vector -> zeros
    x.requires_grad_(True)
    y = lf.l2_normalize(x)
    assert y.shape == x.shape and y.dtype == dtype
    x64 = x.detach().double().requires_grad_(True)
    ref = F.normalize(x64, dim=-1)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert_close_rel(y, ref.detach(), tol, "l2_normalize")
    assert (y[0, 1] == 0).all()
    g = torch.randn(y.shape, generator=gen)
    g[0, 1] = 0  # the zero vector's gradient is g / eps: keep it out of the comparison
    y.backward(g.to(dtype))
    ref.backward(g.double())
    assert_close_rel(x.grad, x64.grad, GRAD_RTOL[dtype] * 2, "l2_normalize grad")


def test_matryoshka(backend):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(6, 100, generator=gen, requires_grad=True)
    outs = lf.matryoshka(x, (100, 64, 8))
    ref = R.matryoshka(x.detach().double().requires_grad_(True), (100, 64, 8))
    for o, r in zip(outs, ref, strict=False):
        assert_close_rel(o, r.detach(), 1e-6, "matryoshka")
    single = lf.matryoshka(x, 32)
    assert isinstance(single, torch.Tensor) and single.shape == (6, 32)
    raw = lf.matryoshka(x, [10, 20], normalize=False)
    assert torch.equal(raw[1], x[:, :20])
    g = [torch.randn(o.shape, generator=gen) for o in outs]
    torch.autograd.backward(outs, g)
    x64 = x.detach().double().requires_grad_(True)
    torch.autograd.backward(R.matryoshka(x64, (100, 64, 8)), [t.double() for t in g])
    assert_close_rel(x.grad, x64.grad, 1e-5, "matryoshka grad")


def test_embedding_head_module(backend):
    head = lf.EmbeddingHead("last", dims=[8, 16], normalize=True)
    hidden = torch.randn(2, 5, 16)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    a, b = head(hidden, mask)
    torch.testing.assert_close(b, F.normalize(hidden[[0, 1], [4, 2]], dim=-1))
    torch.testing.assert_close(a, F.normalize(hidden[[0, 1], [4, 2]][:, :8], dim=-1))
    assert "last" in repr(head)


# ------------------------------------------------------------------------------------------------
# sentence-transformers parity
# ------------------------------------------------------------------------------------------------

ST_MODES = {
    "cls": "first",
    "mean": "mean",
    "max": "max",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weighted_mean",
    "lasttoken": "last",
}


@pytest.mark.parametrize("st_mode", list(ST_MODES))
def test_sentence_transformers_pooling_parity(backend, st_mode):
    pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling  # sentence-transformers >= 6
    except ImportError:
        from sentence_transformers.models import Pooling
    gen = torch.Generator().manual_seed(12)
    B, L, H = 4, 23, 48
    hidden = torch.randn(B, L, H, generator=gen)
    lengths = torch.tensor([23, 5, 17, 1])
    mask = (torch.arange(L)[None] < lengths[:, None]).long()  # right padding, as ST tokenizers produce
    pooling = Pooling(H, pooling_mode=st_mode)
    want = pooling({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    got = lf.pool(hidden, mask, ST_MODES[st_mode])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    hidden = torch.randn(2, 4, 8)
    mask = torch.ones(2, 4, dtype=torch.bool)
    cases = [
        (lambda: lf.pool(hidden, mask, "median"), ValueError, "mode"),
        (lambda: lf.pool(hidden, mask, dims=9), ValueError, "dims"),
        (lambda: lf.pool(hidden, mask, dims=0), ValueError, "dims"),
        (lambda: lf.pool(hidden, mask, dims=[]), ValueError, "dims"),
        (lambda: lf.pool(hidden, mask, dims=[4, 2.5]), TypeError, "dims"),
        (lambda: lf.pool(hidden, mask, dims=True), TypeError, "dims"),
        (lambda: lf.pool(hidden, mask, dims="8"), TypeError, "dims"),
        (lambda: lf.pool(hidden, torch.ones(2, 5)), ValueError, "mask"),
        (lambda: lf.pool(hidden, torch.full((2, 4), 0.5)), ValueError, "mask"),
        (lambda: lf.pool(hidden, torch.ones(2, 4, device="meta")), ValueError, "mask"),
        (lambda: lf.pool(hidden, [[1, 1, 1, 1]] * 2), TypeError, "mask"),
        (lambda: lf.pool(hidden[0], mask), ValueError, "hidden"),
        (lambda: lf.pool(hidden.long(), mask), TypeError, "hidden"),
        (lambda: lf.pool(hidden.numpy(), mask), TypeError, "hidden"),
        (lambda: lf.pool(hidden, mask, out_dtype=torch.int8), TypeError, "out_dtype"),
        (lambda: lf.pool(hidden, mask, eps=0), ValueError, "eps"),
        (lambda: lf.pool(hidden, mask, eps="1e-6"), TypeError, "eps"),
        (lambda: lf.pool(hidden, mask, normalize="no"), TypeError, "normalize"),
        (lambda: lf.pool_segments(hidden[0], [0], [2], normalize=1), TypeError, "normalize"),
        (lambda: lf.pool(hidden, mask, dims=torch.tensor([[2, 4]])), TypeError, "dims"),
        (lambda: lf.pool(hidden, mask, dims=torch.tensor([2.0])), TypeError, "dims"),
        (lambda: lf.pool_segments(hidden[0], [0], [5]), ValueError, "segments"),
        (lambda: lf.pool_segments(hidden[0], [2], [1]), ValueError, "segments"),
        (lambda: lf.pool_segments(hidden[0], [0, 1], [1]), ValueError, "starts and ends"),
        (lambda: lf.pool_segments(hidden[0], torch.tensor([0.0]), [1]), TypeError, "starts"),
        (lambda: lf.pool_segments(hidden[0], [0.9], [2.9]), TypeError, "starts"),  # was truncated to [0, 2)
        (lambda: lf.pool_segments(hidden[0], [0], np.array([True])), TypeError, "ends"),
        (lambda: lf.matryoshka(torch.randn(3, 8), [4], normalize="no"), TypeError, "normalize"),
        (lambda: lf.pool_segments(hidden[0], [[0]], [[1]]), ValueError, "starts"),
        (lambda: lf.l2_normalize(torch.zeros(3, 0)), ValueError, "x"),
        (lambda: lf.l2_normalize(torch.ones(3, dtype=torch.int64)), TypeError, "x"),
        (lambda: lf.matryoshka(torch.randn(3, 8), [16]), ValueError, "dims"),
        (lambda: lf.matryoshka(torch.randn(3, 8), None), TypeError, "dims"),
        (lambda: lf.EmbeddingHead("sum"), ValueError, "mode"),
        # checked at construction as lf.pool checks them ("no" turned normalization on)
        (lambda: lf.EmbeddingHead("mean", normalize="no"), TypeError, "normalize"),
        (lambda: lf.EmbeddingHead("mean", dims=[0]), ValueError, "dims"),
        (lambda: lf.EmbeddingHead("mean", dims="64"), TypeError, "dims"),
        (lambda: lf.EmbeddingHead("mean", out_dtype=torch.int8), TypeError, "out_dtype"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn()
    # integer tensors are accepted as dims: 0-d like an int, 1-d like a sequence
    assert lf.pool(hidden, mask, dims=torch.tensor(4)).shape == (2, 4)
    assert [o.shape[1] for o in lf.pool(hidden, mask, dims=torch.tensor([2, 4]))] == [2, 4]


def test_float64_mask_keeps_the_kernel_backend(monkeypatch):
    """Only float64 *data* takes the torch path (the kernels accumulate in float32), not a float64 mask."""
    from llmembed_fast.ops import pooling as ops

    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "triton")
    hidden = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.float64)
    assert ops._backend(hidden, mask).__name__.endswith("triton_kernels.pooling")
    assert ops._backend(hidden.double(), mask).__name__.endswith("reference.pooling_chunked")
    mask[1, 3:] = 0
    want = lf.pool(hidden.double(), mask).float()
    torch.testing.assert_close(lf.pool(hidden, mask), want, atol=1e-6, rtol=0)


def test_autocast_keeps_the_inputs_dtype(backend):
    """float32 hidden states under a caller's bf16 autocast (forward and backward): the same embeddings and
    gradients as without it, on both backends (the torch path's masked sums are matmuls autocast would
    round to bf16)."""
    gen = torch.Generator().manual_seed(17)
    hidden = torch.randn(3, 21, 40, generator=gen)
    mask = make_mask(3, 21, "holes", gen)
    for mode in MODES:
        outs = {}
        for autocast in (False, True):
            h = hidden.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                embs = lf.pool(h, mask, mode, dims=[8, 40])
                (g,) = torch.autograd.grad(sum((e * e.detach()).sum() for e in embs), h)
            outs[autocast] = (embs, g)
        (e0, g0), (e1, g1) = outs[False], outs[True]
        for a, b in zip(e0, e1, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=lambda m, mode=mode: f"{mode}: {m}")
        torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7, msg=lambda m, mode=mode: f"{mode}: {m}")


def test_op_context_makes_the_input_device_current(monkeypatch):
    """Forward and backward of the ops run with their input's CUDA device current (Triton launches on the
    current device, not the tensors': inputs on cuda:1 with cuda:0 current failed or raced). No GPU here:
    torch.cuda.device is replaced by a recorder."""
    import types

    from llmembed_fast.ops._autograd import op_context

    seen = []

    class Recorder:
        def __init__(self, dev):
            seen.append(dev)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)

    @op_context
    def forward(ctx, x):
        return "forward"

    @op_context
    def backward(ctx, grad):
        return "backward"

    ctx, x = types.SimpleNamespace(), types.SimpleNamespace(device=torch.device("cuda", 1))
    assert forward(ctx, x) == "forward" and backward(ctx, None) == "backward"
    assert seen == [torch.device("cuda", 1)] * 2
    seen.clear()
    forward(ctx, types.SimpleNamespace(device=torch.device("cpu")))
    assert seen == []


def test_numpy_dims_and_bad_backend_for_float64(monkeypatch):
    """dims may be numpy integers (as LLMEmbedder's dims and quant's k accept); a bad LLMEMBED_FAST_BACKEND
    is an error for float64 inputs too (they skipped the check)."""
    h = torch.randn(2, 3, 16)
    want = lf.pool(h, None, dims=[4, 16])
    for dims in (np.array([4, 16]), [np.int64(4), np.int32(16)]):
        for a, b in zip(lf.pool(h, None, dims=dims), want, strict=True):
            assert torch.equal(a, b)
    assert torch.equal(lf.pool(h, None, dims=np.int64(4)), want[0])
    assert torch.equal(lf.matryoshka(want[1], np.int64(4)), lf.matryoshka(want[1], 4))
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LLMEMBED_FAST_BACKEND"):
        lf.pool(h.double(), None)
    with pytest.raises(ValueError, match="LLMEMBED_FAST_BACKEND"):
        lf.contrastive_loss(h[0].double(), h[1].double())


def test_backward_through_one_of_several_outputs(backend):
    """Only one Matryoshka output in the loss: the other's missing gradient counts as zero."""
    h = torch.randn(2, 5, 16, requires_grad=True)
    a, _ = lf.pool(h, None, "mean", dims=(8, 16))
    a.sum().backward()
    want = torch.zeros(2, 5, 16)
    want[..., :8] = 1 / 5
    torch.testing.assert_close(h.grad, want)


def test_l2_normalize_and_matryoshka_of_a_transposed_input(backend):
    """A last dimension that is not contiguous (stride 7 here) is read as its values, not its memory."""
    x = torch.randn(12, 7).t()
    torch.testing.assert_close(lf.l2_normalize(x), F.normalize(x, dim=-1))
    torch.testing.assert_close(lf.matryoshka(x, (5, 12))[0], F.normalize(x[:, :5], dim=-1))


def test_torch_path_half_precision_in_token_chunks(monkeypatch):
    """The CPU path upcasts half-precision states in bounded token chunks: with 3 tokens per chunk every
    chunk must count (the default chunk covers the tests' shapes whole)."""
    from llmembed_fast.reference import pooling_chunked

    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    monkeypatch.setattr(pooling_chunked, "CHUNK_ELEMENTS", 2 * 3 * 8)
    h = torch.randn(2, 10, 8).half()
    for mode in ("mean", "max", "weighted_mean", "mean_sqrt_len"):
        torch.testing.assert_close(lf.pool(h, None, mode), R.pool(h, None, mode)[0], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_non_finite_padding_in_token_chunks(monkeypatch, dtype):
    """The rows whose padding holds NaN/inf are summed again over their pooled tokens in token chunks (a copy
    of their whole states took two [rows, L, H] temporaries): with 3 tokens per chunk, every chunk counts and
    the result equals the clean states'."""
    from llmembed_fast.reference import pooling_chunked

    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    gen = torch.Generator().manual_seed(7)
    B, L, H = 4, 11, 8
    mask = make_mask(B, L, "left", gen)
    mask[2] = True  # a row with no padding: summed once
    clean = torch.randn(B, L, H, generator=gen).to(dtype)
    dirty = clean.clone()
    n_pad = int((~mask).sum())
    assert n_pad > 0
    bad = torch.tensor([float("nan"), float("inf")]).to(dtype).repeat(n_pad)[:n_pad]
    dirty[~mask] = bad[:, None].expand(-1, H)
    monkeypatch.setattr(pooling_chunked, "CHUNK_ELEMENTS", 2 * 3 * H)  # 3 tokens of the 2 bad rows' states
    for mode in ("mean", "weighted_mean", "mean_sqrt_len"):
        want = lf.pool(clean, mask, mode)
        got = lf.pool(dirty, mask, mode)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_embedding_head_int_dims_and_out_dtype(backend):
    """EmbeddingHead(dims=int) returns one tensor (not a tuple), in its out_dtype."""
    y = lf.EmbeddingHead("mean", dims=8, out_dtype=torch.float16)(torch.randn(2, 5, 16))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 8) and y.dtype == torch.float16
