"""Backend choice per call: Triton kernels or the plain-torch reference implementation.

Rules (DESIGN.md): Triton when a tensor is on CUDA, or when ``TRITON_INTERPRET=1`` is set (the Triton
interpreter runs kernels on CPU tensors, for tests); the torch reference otherwise.
``LLMEMBED_FAST_BACKEND=torch|triton`` forces one. The environment is read on every call, so tests and
users may change it at run time.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton")
ENV_BACKEND = "LLMEMBED_FAST_BACKEND"


def compile_disabled(fn):
    """``fn`` run eagerly under ``torch.compile`` (a graph break), as ``torch.compiler.disable(fn)``, but
    without importing ``torch._dynamo`` (and through it triton) unless a compile is tracing the call: the
    import doubled ``import llmembed_fast`` (3.4 s vs torch's 1.6 s here) and, done lazily on the first call
    instead, added ~1 s to a script's first pool / quantize / search. torch's own lazy form is used where it
    exists (torch 2.1+, private), else the public one."""
    lazy = getattr(torch, "_disable_dynamo", None)
    disabled = lazy(fn, recursive=True) if callable(lazy) else torch.compiler.disable(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # a flag read; dynamo traces it as a constant
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return run


_triton_ok: bool | None = None


def triton_available() -> bool:
    """True when ``import triton`` works (the kernels themselves compile lazily). Cached in a module
    global, not ``functools.cache``: dynamo warns on every cache-wrapped call it traces."""
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:
            _triton_ok = False
        else:
            _triton_ok = True
    return _triton_ok


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> str | None:
    """The backend forced by ``LLMEMBED_FAST_BACKEND``, or None."""
    value = os.environ.get(ENV_BACKEND, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS}, got {value!r}")
    return value


def select_backend(*tensors: torch.Tensor) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op over ``tensors``.

    Raises RuntimeError when Triton is forced but cannot run on these tensors.
    """
    on_cuda = any(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    forced = forced_backend()
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{ENV_BACKEND}=triton but triton is not installed (pip install 'llmembed-fast[triton]')"
            )
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError(
                f"{ENV_BACKEND}=triton needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on CPU"
            )
        return "triton"
    if (on_cuda or interpreter_enabled()) and triton_available():  # CPU tensors: triton is not even imported
        return "triton"
    return "torch"
