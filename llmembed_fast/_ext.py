"""The one door to the C++ extension ``llmembed_fast._C``.

``import llmembed_fast`` never needs a compiler: the extension is loaded lazily. Without it the quant ops
run their plain-torch paths on the CPU, with a warning naming the build command (``quant._args``); what has
no such path raises a RuntimeError naming it (:func:`require`).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

from llmembed_fast import _warn

SIMD_LEVELS = ("scalar", "avx2", "avx512")

BUILD_COMMAND = "pip install --no-build-isolation -e ."


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        import torch  # noqa: F401  (the extension links against libtorch)

        from llmembed_fast import _C  # registers torch.ops.llmembed_fast.*
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{type(exc).__name__}: {exc}"
    simd = os.environ.get("LLMEMBED_FAST_SIMD")
    if simd is not None and simd not in SIMD_LEVELS:  # the core ignores it: say so instead of silently
        _warn.warn(f"LLMEMBED_FAST_SIMD={simd!r} is not one of {SIMD_LEVELS} and is ignored (the kernels "
                   f"use {_C.build_info().get('simd')})", RuntimeWarning)
    return _C, None


def extension() -> ModuleType | None:
    """The loaded ``llmembed_fast._C`` module, or None when it is not available."""
    return _load()[0]


def load_error() -> str | None:
    """Why the extension could not be loaded (None when it loaded)."""
    return _load()[1]


def require(what: str) -> ModuleType:
    """Return the extension or raise RuntimeError saying ``what`` needs it and how to build it."""
    mod, err = _load()
    if mod is None:
        raise RuntimeError(
            f"{what} needs the C++ extension llmembed_fast._C, which could not be loaded ({err}). "
            f"Build it against the torch you run, from the repository root: {BUILD_COMMAND} "
            "(or pip install --no-build-isolation . for a non-editable install)"
        )
    return mod


def ops():
    """``torch.ops.llmembed_fast`` after making sure the extension is loaded."""
    import torch

    require("torch.ops.llmembed_fast")
    return torch.ops.llmembed_fast
