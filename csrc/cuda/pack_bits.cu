// CUDA kernel of pack_bits: one thread per output byte.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace lf_torch {
namespace {

template <class T>
__device__ __forceinline__ bool positive(T v) { return static_cast<float>(v) > 0.0f; }
template <>
__device__ __forceinline__ bool positive<double>(double v) { return v > 0.0; }

template <class T>
__global__ void pack_bits_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t row_stride,
                                 uint8_t* __restrict__ out) {
  const int64_t nb = (d + 7) / 8;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * nb) return;
  const int64_t r = idx / nb, j = idx % nb;
  const T* p = x + r * row_stride + j * 8;
  const int64_t left = d - j * 8;
  unsigned byte = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) byte |= (b < left && positive(p[b]) ? 1u : 0u) << (7 - b);
  out[idx] = static_cast<uint8_t>(byte);
}

at::Tensor pack_bits_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 2, "pack_bits: x must be 2-D [N, D], got ", x.dim(), "-D");
  at::Tensor xc = (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
  const int64_t n = xc.size(0), d = xc.size(1), nb = (d + 7) / 8;
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({n, nb}, x.options().dtype(at::kByte));
  if (n == 0 || d == 0) return out;
  const int threads = 256;
  const int64_t blocks = (n * nb + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "pack_bits_cuda", [&] {
    pack_bits_kernel<scalar_t><<<blocks, threads, 0, stream>>>(xc.data_ptr<scalar_t>(), n, d, xc.stride(0),
                                                               out.data_ptr<uint8_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace lf_torch

TORCH_LIBRARY_IMPL(llmembed_fast, CUDA, m) {
  m.impl("pack_bits", &lf_torch::pack_bits_cuda);
}
