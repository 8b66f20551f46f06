"""contrastive_loss on both backends (torch chunked; Triton through the interpreter) against the float64
materialized reference: loss and gradients w.r.t. q, d and the temperature, every option and their
combinations, odd shapes, each dtype, several seeds; chunking paths; module; bad input."""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llmembed_fast as lf
from llmembed_fast.reference import contrastive_chunked
from llmembed_fast.reference.contrastive import contrastive_loss as ref_loss

# (loss atol, gradient tolerance relative to the gradient's max-abs) per dtype. bf16 gradients go through
# bf16 gradient tiles / GEMMs; inputs are rounded to the dtype before the float64 reference sees them.
TOL = {torch.float32: (2e-5, 2e-4), torch.float16: (2e-4, 2e-3), torch.bfloat16: (2e-3, 2e-2)}


def _inputs(B, N, D, dtype, seed, labels="perm"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g).to(dtype)
    d = torch.randn(N, D, generator=g).to(dtype)
    if labels == "perm":
        lab = torch.randperm(N, generator=g)[:B]
    elif labels == "arange":
        lab = None
    else:  # duplicates allowed: several queries share a positive
        lab = torch.randint(0, N, (B,), generator=g)
    # make some negatives near-duplicates of positives so false-negative masking has work to do
    if N > B and B > 1:
        pos = torch.arange(B) if lab is None else lab
        d[(pos[0] + 1) % N] = (d[pos[0]].float() + 0.05 * torch.randn(D, generator=g)).to(dtype)
    return q, d, lab


def _check(q, d, labels, tol, temperature=0.05, grad_tau=True, **kw):
    t_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    t = torch.tensor(temperature, dtype=t_dtype, requires_grad=True) if grad_tau else temperature
    qa, da = q.clone().requires_grad_(), d.clone().requires_grad_()
    loss = lf.contrastive_loss(qa, da, labels=labels, temperature=t, **kw)
    wrt = [qa, da] + ([t] if grad_tau else [])
    grads = torch.autograd.grad(loss.sum(), wrt)
    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    t64 = (
        torch.tensor(float(temperature), dtype=torch.float64, requires_grad=True) if grad_tau else temperature
    )
    ref = ref_loss(q64, d64, labels=labels, temperature=t64, **kw)
    refs = torch.autograd.grad(ref.sum(), [q64, d64] + ([t64] if grad_tau else []))
    atol, gtol = tol
    assert loss.shape == ref.shape
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref, atol=atol * max(1.0, ref.abs().max().item()), rtol=0)
    for name, g, r in zip(("q", "d", "temperature"), grads, refs, strict=False):
        assert g.shape == r.shape, name
        assert torch.isfinite(g).all(), name
        scale = max(r.abs().max().item(), 1e-6)
        err = (g.double() - r).abs().max().item() / scale
        assert err <= gtol, f"grad {name}: relative error {err:.2e} > {gtol:.0e}"


OPTION_GRID = list(
    itertools.product([False, True], [False, True], [None, 0.1], [None, (8, 20, 37)], [True, False])
)
# The interpreter runs a covering subset: every pair of option values appears together at least once.
PAIRWISE = {
    (False, False, None, None, True),
    (True, True, 0.1, (8, 20, 37), True),
    (True, False, 0.1, None, False),
    (False, True, None, (8, 20, 37), False),
    (False, False, 0.1, (8, 20, 37), False),
    (True, True, None, None, False),
    (False, True, 0.1, None, True),
    (True, False, None, (8, 20, 37), True),
}


@pytest.mark.parametrize("symmetric,same_tower,margin,mdims,normalize", OPTION_GRID)
def test_every_option_combination(backend, symmetric, same_tower, margin, mdims, normalize):
    if backend == "triton" and (symmetric, same_tower, margin, mdims, normalize) not in PAIRWISE:
        pytest.skip(
            "interpreter time: the torch backend runs the full grid, Triton a pairwise-covering subset"
        )
    q, d, lab = _inputs(7, 11, 37, torch.float32, seed=hash((symmetric, same_tower, margin, mdims)) % 1000)
    weights = None if mdims is None else (1.0, 0.5, 0.25)
    _check(
        q,
        d,
        lab,
        TOL[torch.float32],
        temperature=0.05 if normalize else 4.0,
        symmetric=symmetric,
        same_tower=same_tower,
        false_negative_margin=margin,
        matryoshka_dims=mdims,
        matryoshka_weights=weights,
        normalize=normalize,
    )


@pytest.mark.parametrize("mdims", [(20,), (8, 20)])
@pytest.mark.parametrize("kw", [{}, {"symmetric": True, "same_tower": True}])
def test_matryoshka_dims_below_d(backend, mdims, kw):
    """Columns past the largest Matryoshka dim are not in the loss: their gradients are exactly zero (rows'
    and columns' terms alike), the rest matches the reference."""
    q, d, lab = _inputs(7, 11, 37, torch.float32, seed=9)
    _check(q, d, lab, TOL[torch.float32], matryoshka_dims=mdims, **kw)
    qa, da = q.clone().requires_grad_(), d.clone().requires_grad_()
    lf.contrastive_loss(qa, da, labels=lab, matryoshka_dims=mdims, **kw).backward()
    assert (qa.grad[:, mdims[-1]:] == 0).all() and (da.grad[:, mdims[-1]:] == 0).all()


def test_nine_matryoshka_dims(backend):
    """More Matryoshka dims than the kernels take (8): the Triton backend falls back to torch for 9."""
    _check(*_inputs(5, 8, 36, torch.float32, 2), TOL[torch.float32], matryoshka_dims=tuple(range(4, 37, 4)))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("kw", [{}, {"symmetric": True, "same_tower": True}, {"matryoshka_dims": (1, 16)}])
def test_margin_keeps_ties_with_the_positive(backend, normalize, kw):
    """false_negative_margin=0: a negative tied with the positive (an exact duplicate of it) is not above it
    by more than the margin, so it stays, whatever order the dot products were summed in and however the
    scalings round (a one-dimension prefix, where they dominate, dropped ties)."""
    for seed in range(8 if kw else 16):
        g = torch.Generator().manual_seed(seed)
        q, d = torch.randn(4, 16, generator=g), torch.randn(7, 16, generator=g)
        d[5], d[6] = d[0], d[2]  # duplicates of the positives of queries 0 and 2
        t = 0.05 if normalize else 5.0
        got = lf.contrastive_loss(q, d, temperature=t, normalize=normalize, false_negative_margin=0.0,
                                  reduction="none", **kw)
        want = ref_loss(q.double(), d.double(), temperature=t, normalize=normalize, false_negative_margin=0.0,
                        reduction="none", **kw)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_margin_keeps_ties_in_one_dimension(backend):
    """D = 1: every same-sign candidate has cosine exactly 1, a tie with the positive; none is dropped."""
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        q, d = torch.rand(3, 1, generator=g) + 0.1, torch.rand(9, 1, generator=g) + 0.1
        got = lf.contrastive_loss(q, d, temperature=0.05, false_negative_margin=0.0, reduction="none")
        torch.testing.assert_close(got, torch.full((3,), math.log(9.0)), atol=1e-5, rtol=0)


def test_margin_keeps_ties_unnormalized_large_norms(backend):
    """normalize=False, margin 0: the tie slack's summation-order term is in units of ||q_i|| ||d_p|| (raw
    dots of norm-~128 vectors); unscaled it is far below their rounding and an exact duplicate of the
    positive (a dot near 0, all else orthogonal) is dropped for some seeds."""
    kw = dict(temperature=50.0, normalize=False, false_negative_margin=0.0, reduction="none")
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        q, d = 8 * torch.randn(1, 256, generator=g), 8 * torch.randn(6, 256, generator=g)
        u = q[0] / q[0].norm()
        d -= (d @ u)[:, None] * u  # every candidate orthogonal to the query,
        d[0] += 1e-3 * u  # the positive barely above 0,
        d[1:5] -= 50.0 * u  # clear negatives far below it,
        d[5] = d[0]  # and an exact duplicate of the positive: a tie, kept
        want = ref_loss(q.double(), d.double(), **kw)
        torch.testing.assert_close(lf.contrastive_loss(q, d, **kw).double(), want, atol=1e-5, rtol=0)


def test_double_backward_raises(backend):
    q, d, lab = _inputs(5, 8, 16, torch.float32, seed=3)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(lf.contrastive_loss(q, d, labels=lab), q, create_graph=True)


SHAPES = [  # B, N, D, temperature, dtype, seed
    (1, 1, 8, 0.05, torch.float32, 0),
    (1, 6, 37, 0.01, torch.bfloat16, 1),
    (7, 7, 384, 0.05, torch.bfloat16, 2),
    (7, 19, 8, 0.01, torch.float16, 3),
    (7, 19, 37, 0.05, torch.float32, 4),
    (64, 64, 37, 0.05, torch.float16, 5),
    (64, 96, 8, 0.01, torch.float32, 6),
    (64, 80, 384, 0.01, torch.bfloat16, 7),
]


@pytest.mark.parametrize("B,N,D,tau,dtype,seed", SHAPES)
@pytest.mark.parametrize("options", ["plain", "all"])
def test_shapes_dtypes(backend, B, N, D, tau, dtype, seed, options):
    if backend == "triton" and options == "all" and B * N * D > 64 * 64 * 64:
        pytest.skip("interpreter time: the largest shapes run with the plain options only")
    q, d, lab = _inputs(B, N, D, dtype, seed)
    kw = {}
    if options == "all":
        dims = tuple(sorted({max(1, D // 4), max(1, D // 2), D}))
        kw = dict(symmetric=True, same_tower=True, false_negative_margin=0.1, matryoshka_dims=dims)
    _check(q, d, lab, TOL[dtype], temperature=tau, **kw)


@pytest.mark.parametrize("labels", ["arange", "dup"])
def test_labels_default_and_duplicates(backend, labels):
    q, d, lab = _inputs(6, 9, 16, torch.float32, seed=11, labels=labels)
    _check(q, d, lab, TOL[torch.float32], symmetric=True, same_tower=True, false_negative_margin=0.05)


@pytest.mark.parametrize("labels,kw", [("perm", {}), ("arange", dict(symmetric=True))])
def test_negative_margin_keeps_the_positive(backend, labels, kw):
    """A negative false_negative_margin puts the positive itself above the threshold; it always stays
    (rows, and the fused column term). With a margin below -2 every negative goes: the loss is 0."""
    q, d, lab = _inputs(7, 11, 24, torch.float32, 3, labels)
    _check(q, d, lab, TOL[torch.float32], false_negative_margin=-0.05, **kw)
    got = lf.contrastive_loss(q, d, labels=lab, false_negative_margin=-3.0, reduction="none", **kw)
    torch.testing.assert_close(got, torch.zeros(7), atol=1e-6, rtol=0)


FUSED_GRID = [  # symmetric with default labels: the document->query term rides on the query->document tiles
    dict(),
    dict(false_negative_margin=0.05),
    dict(same_tower=True, matryoshka_dims=(5, 16, 24)),
    dict(false_negative_margin=0.1, matryoshka_dims=(8, 24), normalize=False, temperature=3.0),
    dict(same_tower=True, false_negative_margin=0.1, reduction="none"),
]


@pytest.mark.parametrize(
    "kw", FUSED_GRID, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain"
)
@pytest.mark.parametrize("n_extra", [0, 5])
def test_symmetric_default_labels(backend, kw, n_extra):
    kw = dict(kw)
    t = kw.pop("temperature", 0.05)
    q, d, _ = _inputs(9, 9 + n_extra, 24, torch.float32, seed=n_extra + len(kw), labels="arange")
    d[3] = q[3] * 1.5 + 0.01 * d[3]  # a false negative in the document->query direction too
    _check(q, d, None, TOL[torch.float32], temperature=t, symmetric=True, **kw)


def test_symmetric_fused_equals_explicit_labels(backend):
    """labels=None takes the fused path, labels=arange(B) the separate document->query term: same results."""
    q, d, _ = _inputs(6, 10, 16, torch.float32, seed=8, labels="arange")
    outs = []
    for labels in (None, torch.arange(6)):
        qa, da = q.clone().requires_grad_(), d.clone().requires_grad_()
        loss = lf.contrastive_loss(qa, da, labels=labels, symmetric=True, false_negative_margin=0.1)
        outs.append((loss, *torch.autograd.grad(loss, [qa, da])))
    for a, b in zip(*outs, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "labels,n_extra,kw",
    [
        ("arange", 0, dict()),
        ("arange", 13, dict(false_negative_margin=0.1, matryoshka_dims=(7, 20, 24))),
        ("arange", 6, dict(symmetric=True, false_negative_margin=0.05)),
        ("perm", 9, dict(false_negative_margin=0.1, matryoshka_dims=(12, 24))),  # q-q triangle only
    ],
)
def test_same_tower_triangles(backend, monkeypatch, labels, n_extra, kw):
    """One process: the q-q (and, with default labels, d-d) same-tower terms take each pair once (upper
    triangle, both rows' sums and gradients from it), over several backward row blocks, equal to the
    reference and to the full squares."""
    from llmembed_fast.ops import contrastive as op

    tk = None
    if backend == "triton":
        from llmembed_fast.triton_kernels import contrastive as tk

        monkeypatch.setattr(tk, "H_BUDGET_BYTES", 12 * 40 * 4)  # backward blocks of a few rows
        monkeypatch.setattr(tk, "COL_PART_BUDGET_BYTES", 1)  # forward column partials one row tile at a time
    monkeypatch.setattr(contrastive_chunked, "GRAD_CHUNK_ELEMENTS", 3 * 9 * 53)
    monkeypatch.setattr(contrastive_chunked, "CHUNK_ELEMENTS", 7 * 53)
    be = tk if tk is not None else contrastive_chunked
    calls = []
    real_lse, real_grad = be.row_lse, be.grad_tiles

    def lse_spy(*a, **k):
        calls.append(("lse", k.get("tri", False)))
        return real_lse(*a, **k)

    def grad_spy(*a, **k):
        calls.append(("grad", k.get("tri", False), a[11]))
        return real_grad(*a, **k)

    monkeypatch.setattr(be, "row_lse", lse_spy)
    monkeypatch.setattr(be, "grad_tiles", grad_spy)
    q, d, lab = _inputs(40, 40 + n_extra, 24, torch.float32, seed=n_extra + 21, labels=labels)
    q[5] = q[17] * 0.9 + 0.05 * q[5]  # near-duplicate queries: the q-q margin has work to do
    _check(q, d, lab, TOL[torch.float32], same_tower=True, **kw)
    n_tri = 1 if labels == "perm" else 2
    assert sum(1 for c in calls if c[0] == "lse" and c[1]) == n_tri
    assert any(c[0] == "grad" and c[1] and c[2] > 0 for c in calls)  # a block whose triangle starts at c0 > 0
    outs = []
    for tri in (True, False):
        monkeypatch.setattr(op, "SELF_TERM_TRIANGLES", tri)
        qa, da = q.clone().requires_grad_(), d.clone().requires_grad_()
        loss = lf.contrastive_loss(qa, da, labels=lab, same_tower=True, **kw)
        outs.append((loss, *torch.autograd.grad(loss, [qa, da])))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "D,labels,kw",
    [
        (70, "perm", dict(matryoshka_dims=(16, 48, 70), false_negative_margin=0.1)),
        (80, "arange", dict(matryoshka_dims=(32, 64, 80), symmetric=True)),  # the fused column term
        (50, "arange", dict(matryoshka_dims=(16, 32, 50), same_tower=True, false_negative_margin=0.1)),
    ],
)
def test_matryoshka_single_loop(monkeypatch, dtype, D, labels, kw):
    """Inner Matryoshka bounds that are multiples of 16: the kernels run one loop over D and update each dim
    where its range ends. Equal to the reference and to the one-loop-per-range kernels."""
    from llmembed_fast import _dispatch

    if not _dispatch.triton_available():
        pytest.skip("triton not installed")
    from llmembed_fast.triton_kernels import contrastive as tk

    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "triton")
    used = []
    real = tk._single_loop

    def spy(bounds, block_d, pre_s):
        out = real(bounds, block_d, pre_s)
        used.append(out)
        return out

    monkeypatch.setattr(tk, "_single_loop", spy)
    q, d, lab = _inputs(40, 53, D, dtype, seed=D, labels=labels)
    _check(q, d, lab, TOL[dtype], **kw)
    assert used and all(single for single, _ in used), used
    outs = []
    for single in (True, False):
        monkeypatch.setattr(tk, "MATRYOSHKA_SINGLE_LOOP", single)
        qa, da = q.clone().requires_grad_(), d.clone().requires_grad_()
        loss = lf.contrastive_loss(qa, da, labels=lab, **kw)
        outs.append((loss, *torch.autograd.grad(loss, [qa, da])))
    assert not used[-1][0]
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient tiles' rounding differs slightly
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().max()))


def test_single_loop_block_d():
    from llmembed_fast.triton_kernels import contrastive as tk

    assert tk._single_loop((0, 64, 128, 256, 1000), 64, False) == (True, 64)
    assert tk._single_loop((0, 96, 1024), 64, False) == (True, 32)
    assert tk._single_loop((0, 48, 100), 64, False) == (True, 16)
    assert tk._single_loop((0, 20, 100), 64, False) == (False, 64)  # 20: no BLOCK_D >= 16 divides it
    assert tk._single_loop((0, 1024), 64, False) == (False, 64)  # one dim: the plain loop
    assert tk._single_loop((0, 64, 1024), 64, True) == (False, 64)  # cuBLAS logits: no dots in the kernel


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_float_temperature(backend, reduction):
    q, d, lab = _inputs(5, 8, 24, torch.float32, seed=3)
    _check(q, d, lab, TOL[torch.float32], grad_tau=False, reduction=reduction, symmetric=True)


def test_zero_row_and_partial_grads(backend):
    """A zero query (norm below eps) and gradients requested for d only / for nothing."""
    q, d, lab = _inputs(4, 6, 16, torch.float32, seed=5)
    q[1] = 0
    _check(q, d, lab, TOL[torch.float32], same_tower=True)
    da = d.clone().requires_grad_()
    loss = lf.contrastive_loss(q, da, labels=lab)
    (gd,) = torch.autograd.grad(loss, [da])
    q64, d64 = q.double(), d.double().requires_grad_()
    (rd,) = torch.autograd.grad(ref_loss(q64, d64, labels=lab), [d64])
    torch.testing.assert_close(gd.double(), rd, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        v = lf.contrastive_loss(q, d, labels=lab)
    torch.testing.assert_close(v.double(), ref_loss(q.double(), d.double(), labels=lab), atol=1e-5, rtol=0)


def test_nonzero_rows_below_eps(backend):
    """Nonzero rows (a query, a positive) with norm below eps: x / eps, so their normalization's radial
    gradient term is off (the norm <= eps mask), in the row and the column chains."""
    q, d, lab = _inputs(4, 6, 16, torch.float32, seed=5)
    q[1] = q[1] / q[1].norm() * 5e-13
    d[lab[2]] = d[lab[2]] / d[lab[2]].norm() * 5e-13
    _check(q, d, lab, TOL[torch.float32], same_tower=True, symmetric=True)


def test_eps_is_the_normalization_clamp(backend):
    """The caller's eps is used: eps = 4 clamps most rows' norms (about 4 here): x / max(||x||, eps)."""
    q, d, lab = _inputs(5, 8, 16, torch.float32, seed=2)
    qa, da = q.clone().requires_grad_(), d.clone().requires_grad_()
    loss = lf.contrastive_loss(qa, da, labels=lab, eps=4.0, same_tower=True)
    grads = torch.autograd.grad(loss, [qa, da])
    q64, d64 = q.double().requires_grad_(), d.double().requires_grad_()
    ref = ref_loss(F.normalize(q64, dim=1, eps=4.0), F.normalize(d64, dim=1, eps=4.0), labels=lab,
                   normalize=False, same_tower=True)
    refs = torch.autograd.grad(ref, [q64, d64])
    torch.testing.assert_close(loss.double(), ref, atol=2e-5, rtol=0)
    for g, r in zip(grads, refs, strict=True):
        assert (g.double() - r).abs().max() <= 2e-4 * r.abs().max()


def test_chunked_blocks(backend, monkeypatch):
    """Several row blocks in forward and backward, and (Triton) a split column range in the forward."""
    from llmembed_fast.ops import contrastive as ops

    monkeypatch.setattr(contrastive_chunked, "CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(contrastive_chunked, "GRAD_CHUNK_ELEMENTS", 300)
    monkeypatch.setattr(ops, "_ROW_CHUNK_ELEMENTS", 24 * 7)  # prologue / epilogue in blocks of 7 rows
    if backend == "triton":
        from llmembed_fast.triton_kernels import contrastive as tk

        monkeypatch.setattr(tk, "H_BUDGET_BYTES", 3 * 8 * 100 * 4)  # 8 rows per block at N=100, K=3
        monkeypatch.setattr(tk, "LSE_SPLITS", 3)
    q, d, lab = _inputs(20, 100, 24, torch.float32, seed=9)
    _check(
        q,
        d,
        lab,
        TOL[torch.float32],
        symmetric=True,
        same_tower=True,
        false_negative_margin=0.1,
        matryoshka_dims=(6, 12, 24),
    )
    _check(q, d, None, TOL[torch.float32], symmetric=True, false_negative_margin=0.1, matryoshka_dims=(6, 24))


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        dict(symmetric=True),
        dict(same_tower=True, false_negative_margin=0.1),
        dict(symmetric=True, false_negative_margin=0.0, matryoshka_dims=(4, 8)),
    ],
)
def test_nan_and_inf_logits_propagate(backend, monkeypatch, bad, kw):
    """A NaN or +inf in one candidate gives the reference's NaN / +inf per-query losses on both backends
    (the Triton forward once turned them into -inf); a NaN is never dropped as a false negative."""
    if backend == "triton":
        from llmembed_fast.triton_kernels import contrastive as tk

        monkeypatch.setattr(tk, "LSE_SPLITS", 2)  # partial log-sum-exps combined across a split
    q, d, lab = _inputs(5, 9, 8, torch.float32, seed=13)
    d[7, 0] = float(bad)
    opts = dict(normalize=bad == "nan", **kw)  # +inf survives only unnormalized
    got = lf.contrastive_loss(q, d, labels=lab, reduction="none", **opts)
    want = ref_loss(q.double(), d.double(), labels=lab, reduction="none", **opts)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf()), (got, want)
    assert want.isnan().any() or want.isinf().any()
    assert not (got == float("-inf")).any()
    fin = want.isfinite()
    torch.testing.assert_close(got[fin].double(), want[fin], atol=2e-5, rtol=2e-5)


def test_float64_matches_reference_tightly():
    q, d, lab = _inputs(9, 13, 21, torch.float64, seed=1)
    _check(
        q,
        d,
        lab,
        (1e-12, 1e-10),
        symmetric=True,
        same_tower=True,
        false_negative_margin=0.2,
        matryoshka_dims=(5, 21),
        matryoshka_weights=(0.3, 1.0),
    )


def test_poisoned_buffers_are_fully_written(backend):
    """Launch-level: the kernels' outputs start as NaN (LLMEMBED_FAST_POISON=1); none may survive."""
    assert os.environ.get("LLMEMBED_FAST_POISON") == "1"
    q, d, lab = _inputs(33, 70, 40, torch.float32, seed=2)
    from llmembed_fast.ops.contrastive import _backend

    be = _backend(q)
    K, b = 2, q.shape[0]
    a2 = torch.rand(K, b) + 0.5
    bb = torch.rand(K, d.shape[0]) + 0.5
    diag = torch.arange(b)
    lse, col = be.row_lse(q, d, None, a2, bb, diag, False, None, (0, 17, 40), col_terms=b)
    assert lse.shape == (K, b) and torch.isfinite(lse).all()
    assert col.shape == (K, b) and torch.isfinite(col).all()
    H, rs, cs = be.grad_tiles(
        q,
        d,
        None,
        a2,
        bb,
        diag,
        False,
        None,
        (0, 17, 40),
        lse,
        torch.ones(K, b),
        3,
        30,
        be.grad_dtype(q.dtype),
        col_lse2=col,
    )
    assert H.shape == (K, 27, 70) and not H.isnan().any() and not rs.isnan().any() and not cs.isnan().any()


def test_module_learnable_temperature(backend):
    q, d, lab = _inputs(6, 10, 16, torch.float32, seed=4)
    mod = lf.ContrastiveLoss(temperature=0.07, learn_temperature=True, symmetric=True)
    qa = q.clone().requires_grad_()
    loss = mod(qa, d, lab)
    loss.backward()
    assert mod.log_scale.grad is not None and torch.isfinite(mod.log_scale.grad)
    t = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    ref = ref_loss(q.double(), d.double(), labels=lab, temperature=t, symmetric=True)
    (gt,) = torch.autograd.grad(ref, [t])
    # d loss / d log_scale = d loss / d t * d t / d log_scale = gt * (-t)
    torch.testing.assert_close(mod.log_scale.grad.double(), -gt * 0.07, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    fixed = lf.ContrastiveLoss(temperature=0.05)
    assert list(fixed.parameters()) == []
    assert lf.ContrastiveLoss(temperature=0.002).temperature == 0.002  # max_scale bounds learned ones only
    with pytest.raises(ValueError, match="temperature"):
        lf.ContrastiveLoss(temperature=0.0)
    torch.testing.assert_close(
        fixed(q, d, lab).double(), ref_loss(q.double(), d.double(), labels=lab), atol=1e-5, rtol=0
    )
    assert "learn_temperature=False" in repr(fixed)


MODULE_KW = [dict(reduction="none"), dict(reduction="sum"), dict(false_negative_margin=0.0),
             dict(symmetric=True, same_tower=True, normalize=False, temperature=4.0)]


@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("kw", MODULE_KW, ids=["none", "sum", "margin", "sym-tower-raw"])
def test_module_forwards_its_options(kw):
    """ContrastiveLoss(**kw)(q, d, labels) equals contrastive_loss(q, d, labels=labels, **kw) (the inputs
    hold a false negative, so the margin changes the loss)."""
    q, d, lab = _inputs(6, 10, 16, torch.float32, seed=4)
    neg = next(j for j in range(10) if j not in lab)
    d[neg] = q[0]  # a false negative of query 0: the margin drops it
    got = lf.ContrastiveLoss(**kw)(q, d, lab)
    want = lf.contrastive_loss(q, d, labels=lab, **kw)
    assert got.shape == want.shape == ((6,) if kw.get("reduction") == "none" else ())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    if "false_negative_margin" in kw:
        assert (want - lf.contrastive_loss(q, d, labels=lab)).abs() > 0.1


def test_module_learned_temperature_never_sticks_at_max_scale():
    """The learned log-scale is clamped in place (CLIP), not at its use: a step past log(max_scale) must not
    leave it with a zero gradient forever; a start past max_scale is refused."""
    q, d, lab = _inputs(6, 10, 16, torch.float32, seed=5)
    mod = lf.ContrastiveLoss(temperature=0.011, learn_temperature=True, max_scale=100.0)
    with torch.no_grad():
        mod.log_scale.fill_(math.log(1000.0))  # an optimizer step overshot the bound
    assert mod.temperature.item() == pytest.approx(0.01)  # the property reads the clamped scale
    loss = mod(q, d, lab)
    loss.backward()
    assert mod.log_scale.item() == pytest.approx(math.log(100.0))
    assert mod.log_scale.grad is not None and mod.log_scale.grad.abs().item() > 0
    # the gradient is that of the loss in the log-scale at the bound, as if nothing were clamped (torch >=
    # 2.14 gives clamp a zero gradient at its bound: a clamp in the temperature's use left it at 0 there)
    s = torch.tensor(math.log(100.0), dtype=torch.float64, requires_grad=True)
    lf.contrastive_loss(q.double(), d.double(), labels=lab, temperature=1.0 / s.exp()).backward()
    torch.testing.assert_close(mod.log_scale.grad.double(), s.grad, rtol=1e-4, atol=1e-6)
    assert mod.temperature.item() == pytest.approx(0.01)
    with pytest.raises(ValueError, match="max_scale"):
        lf.ContrastiveLoss(temperature=0.005, learn_temperature=True, max_scale=100.0)
    with pytest.raises(TypeError, match="max_scale"):
        lf.ContrastiveLoss(max_scale="100")
    with pytest.raises(TypeError, match="max_scale"):
        lf.ContrastiveLoss(max_scale=True)


def test_module_learned_temperature_two_calls_and_inference_embeddings():
    """Two losses summed before one backward (the per-forward clamp must not invalidate the first graph),
    and embeddings made under inference_mode (a frozen encoder) with a learned temperature."""
    q1, d1, _ = _inputs(4, 6, 8, torch.float32, seed=7)
    q2, d2, _ = _inputs(4, 6, 8, torch.float32, seed=8)
    crit = lf.ContrastiveLoss(temperature=0.07, learn_temperature=True)
    (crit(q1, d1) + crit(q2, d2)).backward()
    both = crit.log_scale.grad.clone()
    crit.log_scale.grad = None
    crit(q1, d1).backward()
    crit(q2, d2).backward()
    torch.testing.assert_close(both, crit.log_scale.grad, rtol=1e-6, atol=1e-7)
    with torch.inference_mode():
        qi, di = q1.clone(), d1.clone()
    crit.log_scale.grad = None
    crit(qi, di).backward()
    crit2 = lf.ContrastiveLoss(temperature=0.07, learn_temperature=True)
    crit2(q1, d1).backward()
    torch.testing.assert_close(crit.log_scale.grad, crit2.log_scale.grad, rtol=1e-6, atol=1e-7)


def test_strided_labels(backend):
    """Labels as a strided view (a column of a [B, 2] tensor): the kernels read them as a dense vector, so
    they are made contiguous (the Triton path's gradients were wrong by 137%)."""
    q, d, lab = _inputs(6, 11, 16, torch.float32, seed=22)
    strided = torch.stack([lab, torch.zeros_like(lab)], 1)[:, 0]
    assert not strided.is_contiguous()
    for kw in ({}, {"same_tower": True, "false_negative_margin": 0.1}):
        _check(q, d, strided, TOL[torch.float32], **kw)


def test_column_strided_embeddings(backend):
    """q and d with a column stride != 1 (transposed storage): made contiguous before the kernels."""
    q, d, lab = _inputs(6, 10, 16, torch.float32, seed=4)
    qt, dt = q.T.contiguous().T, d.T.contiguous().T
    assert qt.stride(-1) != 1 and dt.stride(-1) != 1
    _check(qt, dt, lab, TOL[torch.float32], symmetric=True, same_tower=True)


def test_frozen_tower_from_inference_mode(backend):
    """Trainable queries against candidates (and labels) made under inference_mode (a frozen document
    tower): inference tensors cannot be saved for backward, so they are copied; same loss and gradient."""
    q, d, lab = _inputs(5, 9, 16, torch.float32, seed=21)
    with torch.inference_mode():
        di, labi = d.clone(), lab.clone()
    for kw in ({}, {"symmetric": True, "same_tower": True, "false_negative_margin": 0.1}):
        qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
        got = lf.contrastive_loss(qa, di, labels=labi, **kw)
        got.backward()
        want = lf.contrastive_loss(qb, d, labels=lab, **kw)
        want.backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(qa.grad, qb.grad, rtol=0, atol=0)


def test_module_repr_and_tensor_dims():
    """Tensors are accepted for the Matryoshka dims / weights (a 0-d tensor like an int) and print."""
    q, d, lab = _inputs(4, 6, 8, torch.float32, seed=6)
    dims, weights = torch.tensor([4, 8]), torch.tensor([1.0, 0.5])
    mod = lf.ContrastiveLoss(matryoshka_dims=dims, matryoshka_weights=weights)
    assert "matryoshka_dims=tensor([4, 8])" in repr(mod)
    want = ref_loss(q.double(), d.double(), labels=lab, matryoshka_dims=(4, 8), matryoshka_weights=(1.0, 0.5))
    torch.testing.assert_close(mod(q, d, lab).double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        lf.contrastive_loss(q, d, labels=lab, matryoshka_dims=torch.tensor(4)).double(),
        ref_loss(q.double(), d.double(), labels=lab, matryoshka_dims=(4,)), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="matryoshka_dims"):
        lf.contrastive_loss(q, d, matryoshka_dims=torch.tensor([4.0]))



@pytest.mark.usefixtures("torch_backend")
@pytest.mark.parametrize("kw", [{}, dict(symmetric=True, same_tower=True, matryoshka_dims=(8, 32))])
def test_autocast_keeps_the_inputs_dtype(kw):
    """float32 embeddings under a caller's bf16 autocast, in the forward and in the backward (GradCache runs
    backwards inside autocast regions): the loss computes in float32 all the same."""
    q, d, lab = _inputs(24, 40, 32, torch.float32, seed=11)
    t = torch.tensor(0.05, requires_grad=True)

    def run(fwd: bool, bwd: bool):
        qa, da = q.clone().requires_grad_(), d.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fwd):
            loss = lf.contrastive_loss(qa, da, labels=lab, temperature=t, **kw)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bwd):
            grads = torch.autograd.grad(loss, [qa, da, t])
        return loss, grads

    loss0, grads0 = run(False, False)
    for fwd, bwd in ((True, False), (True, True), (False, True)):
        loss, grads = run(fwd, bwd)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0)
        for g, g0 in zip(grads, grads0, strict=True):
            assert g.dtype == g0.dtype
            torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-7)


BAD = [
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randn(4)), ValueError, "q must be 2-D"),
    (dict(q=torch.randn(4, 8, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(q=torch.randint(0, 3, (4, 8))), TypeError, "q must be float32"),
    (dict(d=torch.randn(6, 9)), ValueError, "same embedding size"),
    (dict(d=torch.randn(3, 8)), ValueError, "N >= B"),
    (dict(q=torch.randn(0, 8)), ValueError, "at least one row"),
    (dict(labels=torch.tensor([0, 1, 2, 6])), ValueError, "labels must be in"),
    (dict(labels=torch.tensor([0, 1, -1, 2])), ValueError, "labels must be in"),
    (dict(labels=torch.tensor([0, 1, 2])), ValueError, "labels must have shape"),
    (dict(labels=torch.tensor([0.0, 1, 2, 3])), TypeError, "labels must hold integers"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=torch.tensor(-0.5)), ValueError, "temperature"),
    (dict(temperature=torch.tensor([0.1, 0.2])), ValueError, "temperature"),
    (dict(temperature="0.05"), TypeError, "temperature"),
    (dict(temperature=1e-40), ValueError, "underflows"),  # positive, but 0 (or subnormal) in float32
    (dict(temperature=torch.tensor(1e-40, dtype=torch.float64)), ValueError, "1 / temperature"),
    (dict(temperature=np.bool_(True)), TypeError, "temperature"),
    (dict(matryoshka_dims=np.array([2.0, 4.0])), TypeError, "matryoshka_dims"),
    (dict(matryoshka_dims=(4, 16)), ValueError, "matryoshka_dims values"),
    (dict(matryoshka_dims=(4, 4)), ValueError, "strictly increasing"),
    (dict(matryoshka_dims=(6, 4)), ValueError, "strictly increasing"),
    (dict(matryoshka_dims=()), ValueError, "must not be empty"),
    (dict(matryoshka_dims=(2, 4), matryoshka_weights=(1.0,)), ValueError, "one weight per dim"),
    (dict(matryoshka_weights=(1.0,)), ValueError, "needs matryoshka_dims"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(false_negative_margin=float("nan")), ValueError, "false_negative_margin"),
    (dict(false_negative_margin="0.1"), TypeError, "false_negative_margin"),
    (dict(false_negative_margin=torch.tensor(0.1)), TypeError, "false_negative_margin"),
    (dict(matryoshka_dims=(2, 4), matryoshka_weights=("a", 1)), TypeError, "matryoshka_weights"),
    (dict(matryoshka_dims=(2, 4), matryoshka_weights=(1, float("inf"))), ValueError, "matryoshka_weights"),
    (dict(matryoshka_dims=(2, 4), matryoshka_weights=(-1.0, 1.0)), ValueError, "must be >= 0"),
    (dict(eps="1e-12"), TypeError, "eps"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(symmetric=1), TypeError, "symmetric"),
]


@pytest.mark.parametrize("override,exc,msg", [b for b in BAD if not {"q", "d", "labels", "temperature", "eps"}
                                              & set(b[0]) and "matryoshka_dims values" not in b[2]])
def test_loss_module_checks_its_options_at_construction(override, exc, msg):
    """ContrastiveLoss raises at construction what contrastive_loss would at its first call (mid-training
    otherwise); only the dims' bound by D waits for the embeddings."""
    with pytest.raises(exc, match=msg):
        lf.ContrastiveLoss(**override)


@pytest.mark.parametrize("override,exc,msg", BAD)
def test_bad_input(override, exc, msg):
    args = dict(q=torch.randn(4, 8), d=torch.randn(6, 8))
    args.update({k: v for k, v in override.items() if k in ("q", "d")})
    kw = {k: v for k, v in override.items() if k not in ("q", "d")}
    with pytest.raises(exc, match=msg):
        lf.contrastive_loss(args["q"], args["d"], **kw)


def test_numpy_scalars_and_arrays_are_accepted():
    """numpy scalars (np.float32 is not a python float) and integer arrays work wherever python numbers and
    sequences do, with the same result."""
    from llmembed_fast.losses import ContrastiveLoss

    g = torch.Generator().manual_seed(5)
    q, d = torch.randn(4, 8, generator=g), torch.randn(6, 8, generator=g)
    want = lf.contrastive_loss(q, d, temperature=0.05, false_negative_margin=0.1, matryoshka_dims=[4, 8],
                               matryoshka_weights=[0.5, 1.0])
    got = lf.contrastive_loss(q, d, temperature=np.float32(0.05), false_negative_margin=np.float32(0.1),
                              matryoshka_dims=np.array([4, 8]), matryoshka_weights=np.array([0.5, 1.0]))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    got = lf.contrastive_loss(q, d, temperature=0.05, false_negative_margin=0.1,
                              matryoshka_dims=[np.int64(4), np.int32(8)],
                              matryoshka_weights=[np.float32(0.5), 1])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    want = lf.contrastive_loss(q, d, temperature=float(np.float32(0.05)))
    torch.testing.assert_close(ContrastiveLoss(temperature=np.float32(0.05))(q, d), want, rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="temperature must be a number"):
        ContrastiveLoss(temperature=torch.tensor(0.05))
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(temperature=1e-320)


def test_bad_group():
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        lf.contrastive_loss(torch.randn(2, 4), torch.randn(2, 4), group=object())
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup"):
        lf.ContrastiveLoss(group="x")


def test_cpu_memory_is_bounded(tmp_path):
    """B = N = 8192, D = 64 float32 forward + backward on the CPU backend: the similarity matrix alone would
    be 256 MiB (the naive loss holds three such matrices); the loss must stay far below (peak RSS growth, in a
    fresh process; the chunk buffers are fixed-size, about 32 MiB each)."""
    code = textwrap.dedent("""
        import os, resource, torch
        os.environ["LLMEMBED_FAST_BACKEND"] = "torch"
        import llmembed_fast as lf
        torch.set_num_threads(2)
        B = N = 8192; D = 64
        q = torch.randn(B, D, requires_grad=True); d = torch.randn(N, D, requires_grad=True)
        lf.contrastive_loss(q[:16], d[:16]).backward()        # warm up allocator / kernels
        q.grad = d.grad = None
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = lf.contrastive_loss(q, d)
        loss.backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) / 1024)
    """)
    env = dict(os.environ, TRITON_INTERPRET="0", LLMEMBED_FAST_BACKEND="torch", LLMEMBED_FAST_POISON="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    assert extra_mib < 160, f"peak extra memory {extra_mib:.0f} MiB"


def test_gpu_tile_configs_in_interpreter(monkeypatch):
    """The GPU launch path (128/64-row tiles, BLOCK_D = 64 with a partial last block, forward column splits
    sized from the SM count) run through the interpreter: fp32 with every option and the fused symmetric
    term; bf16 on the single-loop Matryoshka path with the column term and with the triangles."""
    import types

    from llmembed_fast import _dispatch

    if not _dispatch.triton_available():
        pytest.skip("triton not installed")
    from llmembed_fast.triton_kernels import contrastive as tk

    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "triton")
    monkeypatch.setattr(tk, "_interpreting", lambda: False)
    monkeypatch.setattr(tk, "_upcast", lambda x: x.dtype != torch.float32)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(multi_processor_count=132)
    )
    q, d, _ = _inputs(130, 260, 70, torch.float32, seed=12, labels="arange")
    _check(
        q,
        d,
        None,
        TOL[torch.float32],
        symmetric=True,
        same_tower=True,
        false_negative_margin=0.1,
        matryoshka_dims=(20, 70),
    )
    _check(q[:3], d, None, TOL[torch.float32])  # few rows: the forward splits the columns over programs
    # bf16 tiles on the Matryoshka single-loop path (inner dims multiples of 16), same-tower triangles
    qb, db, _ = _inputs(130, 260, 70, torch.bfloat16, seed=13, labels="arange")
    for kw in (dict(symmetric=True), dict(same_tower=True, false_negative_margin=0.1)):
        _check(qb, db, None, TOL[torch.bfloat16], matryoshka_dims=(32, 64, 70), **kw)


def _spy_logits_blocks(monkeypatch, mode: str) -> list:
    """The Triton backend in logits ``mode`` with 32-row forward blocks at N = 90, K = 3; returns the list
    that receives (x_index is None, NC, r0, r1, out given) for every ``_logits_block`` call."""
    from llmembed_fast import _dispatch

    if not _dispatch.triton_available():
        pytest.skip("triton not installed")
    from llmembed_fast.triton_kernels import contrastive as tk

    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "triton")
    monkeypatch.setenv("LLMEMBED_FAST_CONTRASTIVE_LOGITS", mode)
    calls = []
    real = tk._logits_block

    def spy(x, y, x_index, r0, r1, bounds, allow_tf32, out=None):
        calls.append((x_index is None, y.shape[0], r0, r1, out is not None))
        return real(x, y, x_index, r0, r1, bounds, allow_tf32, out=out)

    monkeypatch.setattr(tk, "_logits_block", spy)
    monkeypatch.setattr(tk, "H_BUDGET_BYTES", 3 * 32 * 90 * 4)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_logits_mode(monkeypatch, dtype):
    """LLMEMBED_FAST_CONTRASTIVE_LOGITS=gemm: the float32 logits of each block of rows come from a GEMM and
    the kernels read them; several blocks in forward and backward, every option, the fused symmetric term."""
    calls = _spy_logits_blocks(monkeypatch, "gemm")
    q, d, lab = _inputs(70, 90, 24, dtype, seed=11)
    kw = dict(symmetric=True, same_tower=True, false_negative_margin=0.1, matryoshka_dims=(6, 12, 24))
    _check(q, d, lab, TOL[dtype], **kw)
    blocks = {(r0, r1) for _, _, r0, r1, _ in calls}
    assert {(0, 32), (32, 64), (64, 70)} <= blocks  # forward blocks of 32 rows
    assert any(r1 - r0 < 32 for r0, r1 in blocks)  # backward blocks are smaller (gradient tiles too)
    calls.clear()
    q, d, _ = _inputs(70, 90, 24, dtype, seed=12, labels="arange")
    _check(q, d, None, TOL[dtype], symmetric=True, matryoshka_dims=(8, 24))
    assert len({(r0, r1) for _, _, r0, r1, _ in calls}) >= 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_logits_mode(monkeypatch, dtype):
    """LLMEMBED_FAST_CONTRASTIVE_LOGITS=keep: the plain term's forward logits (every Matryoshka dim) are kept
    and its backward blocks read them instead of recomputing (no GEMM for that term's rows in backward);
    the other terms (same-tower, the separate symmetric one) recompute as in "gemm" mode. Over the budget,
    or without gradients, nothing is kept."""
    from llmembed_fast.triton_kernels import contrastive as tk

    calls = _spy_logits_blocks(monkeypatch, "keep")

    def plain(c):  # the q x d term (not d[labels] x d, d[labels] x q)
        return c[0] and c[1] == 90

    q, d, lab = _inputs(70, 90, 24, dtype, seed=21)
    for kw, labels, only_kept in ((dict(matryoshka_dims=(6, 12, 24)), lab, True),
                                  (dict(false_negative_margin=0.1, symmetric=True), None, True),  # fused
                                  (dict(symmetric=True), lab, False),  # a separate d -> q term
                                  (dict(same_tower=True, matryoshka_dims=(8, 24)), lab, False)):
        calls.clear()
        _check(q, d, labels, TOL[dtype], **kw)
        kept = [c for c in calls if c[4]]
        assert kept and all(plain(c) for c in kept)  # only the plain term's logits are kept
        assert max(c[3] for c in kept) == 70  # the forward wrote every row
        assert not any(plain(c) and not c[4] for c in calls)  # the plain term's backward recomputed none
        assert only_kept == all(c[4] for c in calls)  # the other terms recompute theirs
    calls.clear()
    monkeypatch.setattr(tk, "KEEP_BUDGET_BYTES", 70 * 90 * 4 - 1)  # one float32 [70, 90] over the budget
    _check(q, d, lab, TOL[dtype])
    assert calls and not any(c[4] for c in calls)
    calls.clear()
    monkeypatch.setattr(tk, "KEEP_BUDGET_BYTES", 3 * 70 * 90 * 4 - 1)  # K = 3 dims: [3, 70, 90] over it
    lf.contrastive_loss(q.clone().requires_grad_(), d, labels=lab, matryoshka_dims=(6, 12, 24))
    assert calls and not any(c[4] for c in calls)
    calls.clear()
    monkeypatch.setattr(tk, "KEEP_BUDGET_BYTES", 1 << 30)
    with torch.no_grad():
        lf.contrastive_loss(q, d, labels=lab)
    assert calls and not any(c[4] for c in calls)


def test_logits_mode_rejects_unknown(monkeypatch):
    from llmembed_fast.triton_kernels import contrastive as tk

    monkeypatch.setenv("LLMEMBED_FAST_CONTRASTIVE_LOGITS", "cublas")
    with pytest.raises(ValueError, match="LLMEMBED_FAST_CONTRASTIVE_LOGITS"):
        tk.logits_mode()
