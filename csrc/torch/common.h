// Shared helpers for the torch bindings of the portable core.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../core/pack_bits.h"

namespace lf_torch {

inline lf::FloatKind float_kind(const at::Tensor& x, const char* arg) {
  switch (x.scalar_type()) {
    case at::kFloat: return lf::FloatKind::F32;
    case at::kDouble: return lf::FloatKind::F64;
    case at::kHalf: return lf::FloatKind::F16;
    case at::kBFloat16: return lf::FloatKind::BF16;
    default:
      TORCH_CHECK_TYPE(false, arg, " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  }
  return lf::FloatKind::F32;
}

// Every tensor argument of an op on the device its kernel is for: the dispatcher sends a call mixing CPU and
// meta tensors to one kernel, whose outputs then took the first argument's device (uninitialised CPU memory
// returned as results).
inline void check_device(const char* op, c10::DeviceType type, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK_VALUE(t->device().type() == type, op, ": every tensor must be on ", c10::DeviceTypeName(type, true),
                      ", got one on ", t->device());
}

// Threads the core may use: torch's intra-op setting, so torch.set_num_threads() governs both.
inline int num_threads() { return at::get_num_threads(); }

}  // namespace lf_torch
