"""pytest-benchmark suite of the embedding head on CPU: each case paired with the sentence-transformers
code a user would otherwise run (same group, so the saved comparison shows the ratio).

    pytest benchmarks/test_bench_pooling.py --benchmark-only --benchmark-group-by=group
"""

import pytest
import torch

import llmembed_fast as lf
from llmembed_fast.bench.cases_pooling import make_inputs, st_head

CONFIGS = [  # (B, L, H, dim)
    (32, 256, 1024, 256),
    (32, 256, 1024, 1024),
    (16, 512, 2048, 512),
]
MODES = ["mean", "weighted_mean", "max", "last"]


@pytest.fixture(params=CONFIGS, ids=lambda c: "B{}-L{}-H{}-d{}".format(*c))
def inputs(request):
    B, L, H, dim = request.param
    hidden, mask, _ = make_inputs(B, L, H, torch.float32, "cpu", "uniform")
    return hidden, mask, dim


@pytest.mark.parametrize("provider", ["llmembed_fast", "sentence-transformers"])
@pytest.mark.parametrize("mode", MODES)
def test_pool_forward(benchmark, inputs, mode, provider, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    hidden, mask, dim = inputs
    benchmark.group = f"pool-fwd {mode} {tuple(hidden.shape)}->{dim}"
    if provider == "llmembed_fast":
        benchmark(lambda: lf.pool(hidden, mask, mode, dims=dim, normalize=True))
    else:
        st = st_head(mode, hidden.shape[2], dim)
        if not callable(st):
            pytest.skip(st)
        benchmark(lambda: st(hidden, mask))


@pytest.mark.parametrize("provider", ["llmembed_fast", "sentence-transformers"])
def test_pool_forward_backward(benchmark, inputs, provider, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    hidden, mask, dim = inputs
    h = hidden.clone().requires_grad_(True)
    grad = torch.randn(h.shape[0], dim)
    benchmark.group = f"pool-fwd+bwd mean {tuple(hidden.shape)}->{dim}"
    fn = (
        (lambda x, m: lf.pool(x, m, "mean", dims=dim, normalize=True))
        if provider == "llmembed_fast"
        else st_head("mean", hidden.shape[2], dim)
    )
    if not callable(fn):
        pytest.skip(fn)

    def step():
        h.grad = None
        fn(h, mask).backward(grad)

    benchmark(step)
