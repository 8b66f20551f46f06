"""pytest-benchmark suite of the contrastive loss on CPU (the chunked torch backend): forward + backward,
each case paired with the naive loss (normalize, matmul, F.cross_entropy) in the same group, and the
options' costs against plain InfoNCE.

    pytest benchmarks/test_bench_contrastive.py --benchmark-only --benchmark-group-by=group
"""

import pytest
import torch

import llmembed_fast as lf
from llmembed_fast.bench.cases_contrastive import fwd_bwd, make_batch, naive_loss, option_kwargs

CONFIGS = [(1024, 1024, 256), (4096, 4096, 256), (2048, 4096, 768)]  # B, N, D


@pytest.fixture(params=CONFIGS, ids=lambda c: "B{}-N{}-D{}".format(*c))
def batch(request):
    B, N, D = request.param
    return make_batch(B, N, D, torch.float32, "cpu")


@pytest.mark.parametrize("provider", ["llmembed_fast", "naive"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_loss_forward_backward(benchmark, batch, provider, symmetric, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    q, d = batch
    benchmark.group = (
        f"contrastive fwd+bwd {'symmetric' if symmetric else 'plain'} B{q.shape[0]} N{d.shape[0]} "
        f"D{q.shape[1]}"
    )
    fn = lf.contrastive_loss if provider == "llmembed_fast" else naive_loss
    benchmark(fwd_bwd(fn, q, d, symmetric=symmetric))


@pytest.mark.parametrize("option", ["plain", "symmetric", "same_tower", "matryoshka5", "fn_margin"])
def test_option_cost(benchmark, option, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    q, d = make_batch(2048, 2048, 256, torch.float32, "cpu")
    benchmark.group = "contrastive option cost B2048 N2048 D256"
    benchmark(fwd_bwd(lf.contrastive_loss, q, d, **option_kwargs(option, q.shape[1])))


@pytest.mark.parametrize("provider", ["llmembed_fast", "naive"])
def test_loss_forward_only(benchmark, provider, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    q, d = make_batch(4096, 4096, 256, torch.float32, "cpu")
    benchmark.group = "contrastive fwd (no grad) B4096 N4096 D256"
    fn = lf.contrastive_loss if provider == "llmembed_fast" else naive_loss
    with torch.no_grad():
        benchmark(lambda: fn(q, d))
