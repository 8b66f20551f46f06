"""Build of llmembed_fast: the Python packages plus the C++ extension llmembed_fast._C.

The extension is a CppExtension (portable core + torch bindings) and becomes a CUDAExtension when the
installed torch has CUDA and the CUDA toolkit is found (for TORCH_CUDA_ARCH_LIST, else the visible GPU, else
every architecture the installed torch was built for). Build it the torch-extension way:
    pip install --no-build-isolation -e .
LLMEMBED_FAST_NO_EXT=1 skips the extension (the Triton and torch paths do not need it). A build without
torch, or in an isolated build environment (which would link the extension against another torch), stops
with a message saying so; an sdist (or a metadata query) needs no torch.
"""

import glob
import os
import re
import subprocess
import sys
import tempfile

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


def _cuda_toolkit_found(cuda_home):
    """nvcc in CUDA_HOME/bin, and a CUDA runtime that links (-lcudart) as torch's extension build links it:
    from CUDA_HOME/lib64 (lib when there is no lib64) or the linker's own paths. A CUDA_HOME guessed from an
    nvcc wrapper outside the toolkit (e.g. /usr/local/bin/nvcc -> /usr/local) failed only at the link."""
    if cuda_home is None or not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return False
    lib = os.path.join(cuda_home, "lib64")
    if not os.path.isdir(lib):
        lib = os.path.join(cuda_home, "lib")
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "probe.so")
        cmd = [cxx, "-shared", "-x", "c++", os.devnull, "-o", out, "-L" + lib, "-lcudart"]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:  # no compiler to ask: let the build itself say
            return True


def _default_arch_list(torch):
    """Without a visible GPU and without TORCH_CUDA_ARCH_LIST, torch's extension build has no architecture to
    target (it fails with an IndexError): build for the architectures the installed torch was built for."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return
    archs = []
    for name in torch.cuda.get_arch_list():  # e.g. ['sm_75', 'sm_80', ..., 'sm_120']
        m = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", name)
        if m:
            archs.append(f"{m.group(1)}.{m.group(2)}{m.group(3)}")
    if not archs:
        raise SystemExit(
            "llmembed_fast: no GPU is visible and torch names no CUDA architecture: set TORCH_CUDA_ARCH_LIST "
            "(e.g. TORCH_CUDA_ARCH_LIST=9.0), or LLMEMBED_FAST_NO_CUDA=1 to build without the CUDA kernels"
        )
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
    print(
        f"llmembed_fast: no GPU visible; building the CUDA kernels for torch's architectures {archs} (set "
        "TORCH_CUDA_ARCH_LIST to build fewer, LLMEMBED_FAST_NO_CUDA=1 for none)",
        file=sys.stderr,
    )


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
        and os.environ.get("LLMEMBED_FAST_NO_CUDA") != "1"
        and _cuda_toolkit_found(cpp_extension.CUDA_HOME)
    )
    if torch.version.cuda is not None and not use_cuda and os.environ.get("LLMEMBED_FAST_NO_CUDA") != "1":
        print(
            f"llmembed_fast: torch has CUDA {torch.version.cuda} but no CUDA toolkit was found (CUDA_HOME="
            f"{cpp_extension.CUDA_HOME}: bin/nvcc, and a libcudart that links): building the extension "
            "without its CUDA kernels (the quant ops on CUDA tensors then use torch code). Set CUDA_HOME to "
            "the toolkit (e.g. /usr/local/cuda) to build them.",
            file=sys.stderr,
        )
    if use_cuda:
        _default_arch_list(torch)
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
