"""The CUDA sources (csrc/cuda/*.cu) compile with nvcc for sm_90 against the installed torch's headers and
with the flags a torch CUDA extension build uses: a compile-only check for a machine without a GPU, so a
broken .cu is found before a GPU session builds the extension (nothing is linked or run here; the GPU suite
checks the kernels' results). Skipped where nvcc is not found."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and cpp_extension.CUDA_HOME is not None:
        path = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        found = path if os.path.exists(path) else None
    return found


def _include_dirs(tmp_path) -> list[str]:
    dirs = list(cpp_extension.include_paths())
    # A CPU build of torch ships c10/cuda's headers but not the one its CMake build generates; its only
    # content is the shared-library switch, written here when it is missing.
    generated = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not any(os.path.exists(os.path.join(d, generated)) for d in dirs):
        stub = tmp_path / "stub"
        (stub / generated).parent.mkdir(parents=True)
        (stub / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.insert(0, str(stub))
    return dirs


def test_cuda_sources_compile(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA sources are compiled only where it is")
    assert SOURCES, "no csrc/cuda/*.cu found"
    flags = ["-c", "-std=c++20", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC", "-DLF_WITH_CUDA",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
             *cpp_extension.COMMON_NVCC_FLAGS, "-I" + os.path.join(ROOT, "csrc")]
    flags += ["-I" + d for d in _include_dirs(tmp_path)]
    # both sources at once (the larger takes about a minute on 2 cores)
    procs = [(src, subprocess.Popen([nvcc, *flags, src, "-o", str(tmp_path / (os.path.basename(src) + ".o"))],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for src in SOURCES]
    failed = []
    for src, proc in procs:
        out, _ = proc.communicate(timeout=600)
        errors = "\n".join([line for line in out.splitlines() if "error" in line][:20])
        if proc.returncode != 0:
            failed.append(f"{os.path.relpath(src, ROOT)} (exit {proc.returncode}):\n{errors}")
    assert not failed, "nvcc failed on:\n" + "\n".join(failed)
    for src in SOURCES:
        assert (tmp_path / (os.path.basename(src) + ".o")).stat().st_size > 0
