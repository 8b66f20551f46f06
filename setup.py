"""Build of llmembed_fast: the Python packages plus the C++ extension llmembed_fast._C.

The extension is a CppExtension (portable core + torch bindings) and becomes a CUDAExtension when the
installed torch has CUDA and nvcc is found. Build it the torch-extension way:
    pip install --no-build-isolation -e .
LLMEMBED_FAST_NO_EXT=1 skips the extension (the Triton and torch paths do not need it). A build without
torch, or in an isolated build environment (which would link the extension against another torch), stops
with a message saying so; an sdist (or a metadata query) needs no torch.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# setup.py commands that write only metadata or a source archive: they run without torch, e.g. in the isolated
# environment of `python -m build --sdist` (the extension's sources travel by MANIFEST.in, not ext_modules)
METADATA_COMMANDS = {"sdist", "egg_info", "dist_info"}
BUILD_COMMANDS = {
    "build",
    "build_ext",
    "build_py",
    "bdist",
    "bdist_wheel",
    "bdist_egg",
    "install",
    "develop",
    "editable_wheel",
}


def _metadata_only(argv):
    words = set(argv)
    return bool(words & METADATA_COMMANDS) and not words & BUILD_COMMANDS


ISOLATED_ENV_MARKERS = ("pip-build-env", "build-env-")  # pip's and `python -m build`'s isolated envs


def _extensions():
    if os.environ.get("LLMEMBED_FAST_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if _metadata_only(sys.argv[1:]):
            return [], {}  # an sdist or metadata query needs no compiler and no torch (csrc/ is grafted)
        raise SystemExit(
            "llmembed_fast: building the C++ extension needs torch in this environment. Install torch "
            "first, then: pip install --no-build-isolation .  (or set LLMEMBED_FAST_NO_EXT=1 to build "
            "without the extension: the Triton and torch paths do not need it)"
        ) from None
    if (
        any(m in torch.__file__ for m in ISOLATED_ENV_MARKERS)
        and os.environ.get("LLMEMBED_FAST_ALLOW_ISOLATED_BUILD") != "1"
    ):
        # An isolated build resolves its own (unpinned, usually CUDA) torch, and the extension it builds
        # then fails to load beside the user's torch.
        raise SystemExit(
            "llmembed_fast: the C++ extension must be built against the torch you run. Build without "
            "isolation: pip install --no-build-isolation .  (or -e . for a checkout; "
            "LLMEMBED_FAST_ALLOW_ISOLATED_BUILD=1 overrides, LLMEMBED_FAST_NO_EXT=1 skips the extension)"
        )

    sources = _rel("csrc/core/*.cpp") + _rel("csrc/torch/*.cpp")
    # -g0: no debug info (builds ~35% faster); no -march=native: the binary must run on any x86-64.
    # No -std: torch's BuildExtension adds the standard its headers need (C++20 for torch >= 2.13).
    cxx = ["-O3", "-g0", "-fopenmp", "-Wall"]
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
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
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
