// The Python module llmembed_fast._C: importing it registers the operators in torch.ops.llmembed_fast.
#include <torch/extension.h>

#include "../core/parallel.h"
#include "../core/simd.h"

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
  d["simd_detected"] = std::string(lf::simd_name(lf::simd_detected()));
  d["simd"] = std::string(lf::simd_name(lf::simd_active()));
  pybind11::dict k;
  k["hamming"] = std::string(lf::hamming_kernel_name());
  k["int8_dot"] = std::string(lf::int8_kernel_name());
  k["pack_bits"] = std::string(lf::pack_bits_kernel_name());
  k["quantize"] = std::string(lf::quantize_kernel_name());
  d["kernels"] = k;
  return d;
}

// Cap the SIMD level the CPU kernels use ("scalar" | "avx2" | "avx512"); returns the level now in use.
std::string set_simd(const std::string& name) {
  lf::Simd s;
  if (!lf::parse_simd(name, &s)) throw pybind11::value_error("simd must be 'scalar', 'avx2' or 'avx512', got '" + name + "'");
  return lf::simd_name(lf::set_simd_cap(s));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmembed_fast C++ core: quantization and search operators (torch.ops.llmembed_fast)";
  m.def("build_info", &build_info, "Facts about this build and the SIMD kernels chosen at run time (dict).");
  m.def("set_simd", &set_simd, "Cap the SIMD level of the CPU kernels; returns the level in use.");
}
