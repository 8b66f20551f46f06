"""sentence-transformers parity: MultipleNegativesRankingLoss (with hard negatives) and
MultipleNegativesSymmetricRankingLoss give the same loss and embedding gradients as lf.contrastive_loss."""

import importlib
import warnings

import pytest
import torch

import llmembed_fast as lf

pytest.importorskip("sentence_transformers")
try:
    st_losses = importlib.import_module("sentence_transformers.sentence_transformer.losses")
except ImportError:  # sentence-transformers < 6
    st_losses = importlib.import_module("sentence_transformers.losses")


def _embeddings(B, D, n_neg, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2 + n_neg)]
    return [c.requires_grad_() for c in cols]


def _st_loss(kind: str, scale: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "mnrl":
            return st_losses.MultipleNegativesRankingLoss(model=None, scale=scale)
        return st_losses.MultipleNegativesSymmetricRankingLoss(model=None, scale=scale)


@pytest.mark.parametrize("kind,n_neg", [("mnrl", 0), ("mnrl", 2), ("mnsrl", 0), ("mnsrl", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_sentence_transformers(backend, kind, n_neg, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 always runs on the torch backend")
    B, D, scale = 9, 24, 20.0
    cols = _embeddings(B, D, n_neg, dtype, seed=n_neg + 3)
    st = _st_loss(kind, scale)
    ref = st.compute_loss_from_embeddings(cols, labels=None)
    ref_grads = torch.autograd.grad(ref, cols)

    ours_cols = [c.detach().clone().requires_grad_() for c in cols]
    q, docs = (
        ours_cols[0],
        torch.cat(ours_cols[1:]),
    )  # positives first, then hard negatives: labels = arange(B)
    loss = lf.contrastive_loss(q, docs, temperature=1.0 / scale, symmetric=(kind == "mnsrl"))
    grads = torch.autograd.grad(loss, ours_cols)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.to(dtype), ref, **tol)
    for g, r in zip(grads, ref_grads, strict=False):
        torch.testing.assert_close(g, r, **tol)


def test_module_matches_sentence_transformers():
    cols = _embeddings(5, 16, 1, torch.float32, seed=0)
    ref = _st_loss("mnrl", 20.0).compute_loss_from_embeddings(cols, labels=None)
    ours = lf.ContrastiveLoss(temperature=0.05)(cols[0], torch.cat(cols[1:]))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
