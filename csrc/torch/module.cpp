// The Python module llmembed_fast._C: importing it registers the operators in torch.ops.llmembed_fast.
#include <torch/extension.h>

#include "../core/parallel.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef LF_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmembed_fast C++ core: quantization and search operators (torch.ops.llmembed_fast)";
  m.def("build_info", &build_info, "Compile-time facts about this build (dict).");
}
