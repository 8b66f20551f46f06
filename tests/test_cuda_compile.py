"""The CUDA sources (csrc/cuda/*.cu) compile with nvcc for sm_90 against the installed torch's headers and
with the flags a torch CUDA extension build uses: a compile-only check for a machine without a GPU, so a
broken .cu is found before a GPU session builds the extension (nothing is linked or run here; the GPU suite
checks the kernels' results). Skipped where nvcc is not found.

The standard is C++17, as torch 2.11 (the GPU machine's) builds extensions; torch 2.13 passes C++20 and its
headers still compile as C++17 (with warnings); torch >= 2.14's headers require C++20, which is then used. The
torch bindings (csrc/torch/*.cpp, built here with the installed torch's C++20) get a syntax check in that
standard beside them."""
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


def _std() -> str:
    """C++17, as torch 2.11 (the GPU machine's) builds extensions, unless the installed torch's headers refuse
    it: torch >= 2.14's ATen.h requires C++20."""
    for d in cpp_extension.include_paths():
        header = os.path.join(d, "ATen", "ATen.h")
        if os.path.exists(header):
            with open(header) as f:
                return "c++20" if "202002L" in f.read(4096) else "c++17"
    return "c++17"


def test_cuda_sources_compile(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA sources are compiled only where it is")
    assert SOURCES, "no csrc/cuda/*.cu found"
    std = _std()
    flags = ["-c", f"-std={std}", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC", "-DLF_WITH_CUDA",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
             *cpp_extension.COMMON_NVCC_FLAGS, "-I" + os.path.join(ROOT, "csrc")]
    dirs = _include_dirs(tmp_path)
    flags += ["-I" + d for d in dirs]
    # both sources at once (the larger takes about a minute on 2 cores), and the bindings' syntax beside them
    procs = [(os.path.relpath(src, ROOT),
              subprocess.Popen([nvcc, *flags, src, "-o", str(tmp_path / (os.path.basename(src) + ".o"))],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for src in SOURCES]
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is not None:
        import sysconfig

        import pybind11

        bindings = sorted(glob.glob(os.path.join(ROOT, "csrc", "torch", "*.cpp")))
        assert bindings, "no csrc/torch/*.cpp found"
        inc = ["-I" + d for d in dirs]
        inc += ["-I" + os.path.join(ROOT, "csrc"), "-I" + sysconfig.get_paths()["include"],
                "-I" + pybind11.get_include()]
        cmd = [cxx, f"-std={std}", "-fsyntax-only", "-DLF_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H",
               "-DTORCH_EXTENSION_NAME=_C", *inc, *bindings]
        procs.append((f"csrc/torch/*.cpp as {std}",
                      subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failed = []
    for name, proc in procs:
        out, _ = proc.communicate(timeout=600)
        errors = "\n".join([line for line in out.splitlines() if "error" in line][:20])
        if proc.returncode != 0:
            failed.append(f"{name} (exit {proc.returncode}):\n{errors}")
    assert not failed, "compile failed:\n" + "\n".join(failed)
    for src in SOURCES:
        assert (tmp_path / (os.path.basename(src) + ".o")).stat().st_size > 0
