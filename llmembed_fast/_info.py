"""``lf.info()``: versions, backends, CPU features and what the C++ extension was built with."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys

from llmembed_fast import _dispatch, _ext

_CPU_FLAGS = (
    "sse4_2",
    "popcnt",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vpopcntdq",
    "avx512_vnni",
    "avx_vnni",
    "neon",
    "asimd",
)


@functools.cache
def cpu_features() -> dict:
    """Model name and the SIMD flags this package cares about, read from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in _CPU_FLAGS if f in flags]}


def _version(name: str) -> str | None:
    """The installed version of module ``name``, from its package metadata: importing sentence-transformers
    (and through it transformers) only to read its version took 5 s of ``llmembed-fast info``."""
    mod = sys.modules.get(name)
    if mod is not None:
        return getattr(mod, "__version__", "unknown")
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cpu_backend() -> str:
    """The backend ops pick for CPU tensors, or why they cannot run (a forced backend that cannot run on
    CPU tensors, or a bad LLMEMBED_FAST_BACKEND, is reported, not raised: info() is for diagnosing it)."""
    import torch

    try:
        return _dispatch.select_backend(torch.empty(0))
    except (RuntimeError, ValueError) as exc:
        return f"error: {exc}"


def info() -> dict:
    """Return a dict describing this installation: versions, backends, extension build, CPU, GPU."""
    import torch

    import llmembed_fast

    cuda = torch.cuda.is_available()
    ext = _ext.extension()
    ext_info: dict = {"built": ext is not None}
    if ext is not None:
        ext_info.update(ext.build_info())
    else:
        ext_info["error"] = _ext.load_error()
        ext_info["build_command"] = _ext.BUILD_COMMAND
    return {
        "llmembed_fast": llmembed_fast.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            n: _version(n) for n in ("torch", "triton", "numpy", "transformers", "sentence_transformers")
        },
        "backends": {
            "triton_available": _dispatch.triton_available(),
            "triton_interpreter": _dispatch.interpreter_enabled(),
            "forced": os.environ.get(_dispatch.ENV_BACKEND) or None,
            "cuda_available": cuda,
            "default_for_cpu_tensors": _cpu_backend(),
        },
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "torch_cuda": torch.version.cuda,
        "cpu": cpu_features(),
        "torch_threads": torch.get_num_threads(),
        "extension": ext_info,
    }
