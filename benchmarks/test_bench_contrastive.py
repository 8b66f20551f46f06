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


@pytest.mark.parametrize("layout", ["triangles", "full_squares"])
def test_same_tower_layout(benchmark, layout, monkeypatch):
    """same_tower in one process: each symmetric self-term pair once (default) or both squares."""
    from llmembed_fast.ops import contrastive as opc

    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    monkeypatch.setattr(opc, "SELF_TERM_TRIANGLES", layout == "triangles")
    q, d = make_batch(2048, 2048, 256, torch.float32, "cpu")
    benchmark.group = "contrastive same_tower B2048 N2048 D256"
    benchmark(fwd_bwd(lf.contrastive_loss, q, d, same_tower=True))


@pytest.mark.parametrize("provider", ["llmembed_fast", "naive"])
def test_loss_forward_only(benchmark, provider, monkeypatch):
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    q, d = make_batch(4096, 4096, 256, torch.float32, "cpu")
    benchmark.group = "contrastive fwd (no grad) B4096 N4096 D256"
    fn = lf.contrastive_loss if provider == "llmembed_fast" else naive_loss
    with torch.no_grad():
        benchmark(lambda: fn(q, d))


_MEMORY_SCRIPT = """
import os, resource, sys, time, torch
os.environ["LLMEMBED_FAST_BACKEND"] = "torch"
import llmembed_fast as lf
from llmembed_fast.bench.cases_contrastive import make_batch, naive_loss
torch.set_num_threads(int(sys.argv[4]))
which, B, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q, d = make_batch(B, B, D, torch.float32, "cpu")
fn = lf.contrastive_loss if which == "llmembed_fast" else naive_loss
fn(q[:64].detach().requires_grad_(), d[:64].detach().requires_grad_()).backward()  # warm-up
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
loss = fn(q, d)
t1 = time.perf_counter()
loss.backward()
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) / 1024, t1 - t0, t2 - t1, loss.item())
"""


@pytest.mark.parametrize("provider", ["llmembed_fast", "naive"])
def test_cpu_memory_target(benchmark, provider):
    """The issue's CPU target, B = N = 16384, D = 256 float32 forward + backward: peak extra RSS (fresh
    process) and time. Figures go to extra_info and stdout (run with -s)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, LLMEMBED_FAST_POISON="0", TRITON_INTERPRET="0")
    threads = str(torch.get_num_threads())

    def run():
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, provider, "16384", "256", threads],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        return [float(v) for v in out.stdout.split()]

    benchmark.group = "contrastive CPU target B=N=16384 D=256 fp32 (fresh process)"
    extra_mib, fwd_s, bwd_s, loss = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(peak_extra_MiB=round(extra_mib), fwd_s=round(fwd_s, 2), bwd_s=round(bwd_s, 2))
    print(
        f"\n{provider}: peak extra {extra_mib:.0f} MiB, forward {fwd_s:.2f} s, backward {bwd_s:.2f} s, "
        f"loss {loss:.6f}"
    )
