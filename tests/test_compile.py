"""torch.compile around the ops: a model compiled with lf.EmbeddingHead / lf.contrastive_loss inside is not
recompiled for every padded length or batch size (the ops run eagerly behind a graph break), and values and
gradients equal eager ones."""

import warnings

import pytest
import torch

import llmembed_fast as lf

pytestmark = pytest.mark.usefixtures("torch_backend")  # the ops' CPU path


def test_compiled_model_is_not_recompiled_per_shape():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())
    head = lf.EmbeddingHead("max", normalize=True)

    def step(h, m):
        e = head(body(h), m)
        return lf.contrastive_loss(e, e.flip(0), temperature=0.1)

    compiled = torch.compile(step, backend="eager")
    for i, L in enumerate(range(5, 15)):  # ten batches, each of its own padded length and batch size
        g = torch.Generator().manual_seed(L)
        h = torch.randn(3 + i % 3, L, 16, generator=g)
        m = torch.rand(h.shape[:2], generator=g) > 0.3
        m[:, 0] = True
        got = compiled(h, m)
        want = step(h, m)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        (gw,) = torch.autograd.grad(got, body[0].weight)
        (ww,) = torch.autograd.grad(want, body[0].weight)
        torch.testing.assert_close(gw, ww, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()


@pytest.mark.parametrize("be", ["torch", "triton"])
def test_compiled_normalize_and_matryoshka(monkeypatch, be):
    """lf.l2_normalize / lf.matryoshka inside a compiled function, on either path: the torch path is traced,
    the Triton launch runs behind a graph break (dynamo traced into the launcher and failed)."""
    if be == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", be)
    torch._dynamo.reset()

    def f(x):
        a = lf.l2_normalize(x * 2)
        b, c = lf.matryoshka(x, [3, 8])
        return a.sum(-1) + b[:, 0] * 3 + c[:, -1]

    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = torch.compile(f, backend="aot_eager")(xa)
    want = f(xb)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_normalize_and_matryoshka_trace_in_one_graph():
    """On the torch path l2_normalize / matryoshka trace without a graph break (fullgraph): the ops'
    autocast guard is entered only when autocast is on (entering it was a break)."""
    torch._dynamo.reset()

    def f(x):
        a, b = lf.matryoshka(x, [3, 8])
        return lf.l2_normalize(x * 2).sum(-1) + a[:, 0] + b[:, -1]

    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(got, f(x), rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_default_backend_choice_traces_without_dynamo_warnings(monkeypatch):
    """The default backend choice (no LLMEMBED_FAST_BACKEND) asks whether triton imports; that answer is
    cached without functools.cache, which dynamo warned about in every compiled model using the ops."""
    monkeypatch.delenv("LLMEMBED_FAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: the torch path, chosen by default
    torch._dynamo.reset()
    warn_once_cache = getattr(torch._dynamo.utils, "warn_once_cache", None)
    if warn_once_cache is not None:
        warn_once_cache.clear()  # dynamo warns once per process: an earlier test may have used it up
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(lambda t: lf.l2_normalize(t * 2), backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, torch.nn.functional.normalize(x * 2, dim=-1), rtol=1e-6, atol=1e-6)
    dynamo_warnings = [str(w.message) for w in caught if "Dynamo" in str(w.message)]
    assert not dynamo_warnings, dynamo_warnings
    torch._dynamo.reset()
