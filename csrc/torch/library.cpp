// The llmembed_fast operator library: schemas and CPU/Meta kernels of the portable core.
// Other files add operators with TORCH_LIBRARY_FRAGMENT(llmembed_fast, m).
#include "common.h"

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

namespace lf_torch {

at::Tensor pack_bits_cpu(const at::Tensor& x) {
  check_device("pack_bits", c10::DeviceType::CPU, {&x});
  TORCH_CHECK_VALUE(x.dim() == 2, "pack_bits: x must be 2-D [N, D], got ", x.dim(), "-D");
  const auto kind = float_kind(x, "pack_bits: x");
  // Rows may be strided; elements within a row must be contiguous.
  at::Tensor xc = (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
  const int64_t n = xc.size(0), d = xc.size(1);
  at::Tensor out = at::empty({n, lf::packed_bytes(d)}, x.options().dtype(at::kByte));
  if (n == 0 || d == 0) return out;
  lf::pack_bits(xc.data_ptr(), kind, n, d, xc.stride(0), out.data_ptr<uint8_t>(), num_threads());
  return out;
}

at::Tensor pack_bits_meta(const at::Tensor& x) {
  check_device("pack_bits", c10::DeviceType::Meta, {&x});
  TORCH_CHECK_VALUE(x.dim() == 2, "pack_bits: x must be 2-D [N, D], got ", x.dim(), "-D");
  float_kind(x, "pack_bits: x");  // the CPU kernel's checks: same shapes and errors under FakeTensor
  return at::empty({x.size(0), lf::packed_bytes(x.size(1))}, x.options().dtype(at::kByte));
}

}  // namespace lf_torch

TORCH_LIBRARY(llmembed_fast, m) {
  m.def("pack_bits(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmembed_fast, CPU, m) {
  m.impl("pack_bits", &lf_torch::pack_bits_cpu);
}

TORCH_LIBRARY_IMPL(llmembed_fast, Meta, m) {
  m.impl("pack_bits", &lf_torch::pack_bits_meta);
}

// None of the ops is differentiable (codes, indices, search scores). Without an Autograd kernel a direct
// torch.ops call on an input that requires grad returned an output that claimed a gradient and silently
// gave none; this one makes a backward through them raise, naming the op.
TORCH_LIBRARY_IMPL(llmembed_fast, Autograd, m) {
  for (const char* op : {"pack_bits", "quantize_scalar", "hamming_topk", "int8_topk", "score_rows"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}
