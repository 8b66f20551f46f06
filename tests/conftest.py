"""Test configuration. The Triton interpreter must be on before any @triton.jit function runs, so the
Triton kernels run on CPU tensors here (tests force each backend explicitly where it matters)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LLMEMBED_FAST_POISON", "1")  # kernels' outputs start as NaN
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from llmembed_fast import _dispatch  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if _dispatch.triton_available() else [])


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the torch (CPU) path of the ops, for tests of code built on them (kernels are tested
    elsewhere)."""
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", "torch")
    return "torch"


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Run a test once per backend, forcing it through LLMEMBED_FAST_BACKEND."""
    monkeypatch.setenv("LLMEMBED_FAST_BACKEND", request.param)
    return request.param


# Test tensors are small: one intra-op thread avoids OpenMP spin-waits, which cost 100x on a loaded 2-core
# machine (and when spawned ranks share the cores), and keeps runs reproducible.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
