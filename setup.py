"""Build of llmembed_fast: the Python packages plus the C++ extension llmembed_fast._C.

The extension is a CppExtension (portable core + torch bindings) and becomes a CUDAExtension when the
installed torch has CUDA and nvcc is found. Build it the torch-extension way:
    pip install --no-build-isolation -e .
LLMEMBED_FAST_NO_EXT=1 skips the extension (the Triton and torch paths do not need it).
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    if os.environ.get("LLMEMBED_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only builds (no torch): the package still works without _C
        return [], {}

    sources = _rel("csrc/core/*.cpp") + _rel("csrc/torch/*.cpp")
    # -g0: no debug info (builds ~35% faster); no -march=native: the binary must run on any x86-64.
    cxx = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-Wall"]
    define_macros = []
    link_args = ["-fopenmp"]
    use_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("LLMEMBED_FAST_NO_CUDA") != "1"
    )
    if use_cuda:
        sources += _rel("csrc/cuda/*.cu")
        define_macros.append(("LF_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        ext = cpp_extension.CUDAExtension(
            "llmembed_fast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            "llmembed_fast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link_args,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["llmembed_fast", "llmembed_fast.*"]) + ["llmembed_fast.triton_kernels"],
    package_dir={"llmembed_fast.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
