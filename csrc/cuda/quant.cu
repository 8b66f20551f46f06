// CUDA kernels of the quantization ops: quantize_scalar (int8/uint8 codes) and hamming_topk.
// Same results as the CPU ops: identical arithmetic for quantize (IEEE division, floor, clamp; float16
// arithmetic rounded after every step), exact distances and (distance, index) order for hamming_topk.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>

namespace lf_torch {
namespace {

// ------------------------------------------------------------------------------------ quantize
template <class T>
__device__ __forceinline__ float load_f(const T* p) { return static_cast<float>(*p); }
template <>
__device__ __forceinline__ float load_f<at::Half>(const at::Half* p) { return __half2float(*reinterpret_cast<const __half*>(p)); }
template <>
__device__ __forceinline__ float load_f<at::BFloat16>(const at::BFloat16* p) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
}

template <class T>
__device__ __forceinline__ double load_d(const T* p) { return static_cast<double>(load_f(p)); }
template <>
__device__ __forceinline__ double load_d<double>(const double* p) { return *p; }

__device__ __forceinline__ float round_half(float v) { return __half2float(__float2half_rn(v)); }

// The output byte: the code xor flip; NaN gives 0 for uint8 and int8 alike (as the CPU op, see quantize.cpp)
template <class C>
__device__ __forceinline__ uint8_t out_byte(C v, uint8_t flip) {
  if (isnan(v)) return 0;
  v = floor(v);
  v = v < C(0) ? C(0) : (v > C(255) ? C(255) : v);
  return static_cast<uint8_t>(v) ^ flip;
}

// mode 0: float32 arithmetic, 1: float16 arithmetic (rounded each step), 2: float64 arithmetic
template <class T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t row_stride,
                                const float* __restrict__ sf, const float* __restrict__ tf,
                                const double* __restrict__ sd, const double* __restrict__ td, int mode,
                                uint8_t flip, uint8_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * d) return;
  const int64_t r = i / d, j = i - r * d;
  const T* p = x + r * row_stride + j;
  uint8_t c;
  if (mode == 2) {
    c = out_byte<double>(__ddiv_rn(__dsub_rn(load_d(p), sd[j]), td[j]), flip);
  } else if (mode == 1) {
    c = out_byte<float>(round_half(__fdiv_rn(round_half(__fsub_rn(load_f(p), sf[j])), tf[j])), flip);
  } else {
    c = out_byte<float>(__fdiv_rn(__fsub_rn(load_f(p), sf[j]), tf[j]), flip);
  }
  out[i] = c;
}

at::Tensor quantize_scalar_cuda(const at::Tensor& x, const at::Tensor& starts, const at::Tensor& steps,
                                bool signed_out) {
  // a call mixing devices reaches this kernel when any argument is on CUDA; x's data must be
  TORCH_CHECK_VALUE(x.is_cuda(), "quantize_scalar: x is on ", x.device(), " but starts/steps on CUDA");
  TORCH_CHECK_VALUE(x.dim() == 2, "quantize_scalar: x must be 2-D [N, D], got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(starts.dim() == 1 && steps.dim() == 1 && starts.size(0) == x.size(1) &&
                        steps.size(0) == x.size(1),
                    "quantize_scalar: starts and steps must be 1-D of length D = ", x.size(1));
  const auto ct = starts.scalar_type();
  TORCH_CHECK_TYPE(ct == steps.scalar_type() && (ct == at::kHalf || ct == at::kFloat || ct == at::kDouble),
                   "quantize_scalar: starts/steps must both be float16, float32 or float64");
  TORCH_CHECK_VALUE(!(x.scalar_type() == at::kDouble && ct != at::kDouble),
                    "quantize_scalar: float64 x needs float64 starts/steps");
  TORCH_CHECK_VALUE(!(ct == at::kHalf && x.scalar_type() != at::kHalf),
                    "quantize_scalar: float16 arithmetic needs float16 x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = (x.size(1) <= 1 || x.stride(1) == 1) ? x : x.contiguous();
  const int64_t n = xc.size(0), d = xc.size(1);
  at::Tensor out = at::empty({n, d}, x.options().dtype(signed_out ? at::kChar : at::kByte));
  if (n == 0 || d == 0) return out;
  const int mode = ct == at::kDouble ? 2 : (ct == at::kHalf ? 1 : 0);
  at::Tensor sf = starts.to(x.device(), at::kFloat).contiguous(), tf = steps.to(x.device(), at::kFloat).contiguous();
  at::Tensor sd = starts.to(x.device(), at::kDouble).contiguous(), td = steps.to(x.device(), at::kDouble).contiguous();
  const int threads = 256;
  const int64_t blocks = (n * d + threads - 1) / threads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const uint8_t flip = signed_out ? 0x80 : 0x00;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "quantize_scalar_cuda", [&] {
    quantize_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), n, d, xc.stride(0), sf.data_ptr<float>(), tf.data_ptr<float>(),
        sd.data_ptr<double>(), td.data_ptr<double>(), mode, flip, static_cast<uint8_t*>(out.data_ptr()));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------------ hamming top-k
// Pass 1: distances of one chunk of queries to every document, and a per-query histogram of them (shared
// memory per block, flushed with atomics). The corpus is split across the whole grid, so one query keeps
// every SM busy; each thread reads its documents with 16-byte loads when the code length allows.
constexpr int kThreads = 256;

// Block prologue of both distance passes: the query code into shared memory (qs, nb bytes, 16-aligned) and, with
// shared_hist, a zeroed shared histogram (hs). Returns the histogram the block bins into.
__device__ __forceinline__ int32_t* load_query_and_hist(const uint8_t* q, int qi, int nb, int bins, int32_t* hist,
                                                        bool shared_hist, uint8_t* qs, int32_t* hs) {
  for (int i = threadIdx.x; i < nb; i += blockDim.x) qs[i] = q[static_cast<int64_t>(qi) * nb + i];
  if (shared_hist)
    for (int i = threadIdx.x; i < bins; i += blockDim.x) hs[i] = 0;
  __syncthreads();
  return shared_hist ? hs : hist + static_cast<int64_t>(qi) * bins;
}

// Block epilogue: add the shared histogram's non-zero bins to the query's global one.
__device__ __forceinline__ void flush_hist(const int32_t* hs, int32_t* qhist_global, int bins) {
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += blockDim.x)
    if (hs[i]) atomicAdd(qhist_global + i, hs[i]);
}

template <bool VEC16>
__global__ void hamming_dist_hist_kernel(const uint8_t* __restrict__ q, const uint8_t* __restrict__ docs,
                                         int64_t nd, int nb, int32_t* __restrict__ dist,
                                         int32_t* __restrict__ hist, bool shared_hist) {
  extern __shared__ unsigned char smem[];
  const int qi = blockIdx.y;
  const int bins = nb * 8 + 1;
  uint8_t* qs = smem;                                             // the query code (nb bytes, 16-aligned)
  int32_t* hs = reinterpret_cast<int32_t*>(smem + ((nb + 15) / 16) * 16);
  int32_t* bin = load_query_and_hist(q, qi, nb, bins, hist, shared_hist, qs, hs);
  int32_t* qdist = dist + static_cast<int64_t>(qi) * nd;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nd; j += stride) {
    const uint8_t* p = docs + j * nb;
    int s = 0;
    if (VEC16) {
      const uint4* pv = reinterpret_cast<const uint4*>(p);
      const uint4* qv = reinterpret_cast<const uint4*>(qs);
      for (int c = 0; c < nb / 16; ++c) {
        const uint4 a = __ldg(pv + c), b = qv[c];
        s += __popc(a.x ^ b.x) + __popc(a.y ^ b.y) + __popc(a.z ^ b.z) + __popc(a.w ^ b.w);
      }
    } else {
      for (int c = 0; c < nb; ++c) s += __popc(static_cast<unsigned>(p[c] ^ qs[c]));
    }
    qdist[j] = s;
    atomicAdd(bin + s, 1);
  }
  if (shared_hist) flush_hist(hs, hist + static_cast<int64_t>(qi) * bins, bins);
}

// Pass 1, coalesced variant (opt-in: LLMEMBED_FAST_HAMMING_COALESCED=1, while it is being measured): LANES
// consecutive lanes share one code of LANES 16-byte words, so a warp's loads cover 512 contiguous bytes; the
// lanes' popcounts are summed with shuffles and the first lane of each group writes the distance and bins it.
// Four independent loads per lane are in flight per step. Needs 16-byte codes rows (nb = 16 * LANES, aligned).
template <int LANES>
__global__ void hamming_dist_hist_coalesced_kernel(const uint8_t* __restrict__ q, const uint8_t* __restrict__ docs,
                                                   int64_t nd, int nb, int32_t* __restrict__ dist,
                                                   int32_t* __restrict__ hist, bool shared_hist) {
  extern __shared__ unsigned char smem[];
  const int qi = blockIdx.y;
  const int bins = nb * 8 + 1;
  uint8_t* qs = smem;
  int32_t* hs = reinterpret_cast<int32_t*>(smem + ((nb + 15) / 16) * 16);
  int32_t* qhist = load_query_and_hist(q, qi, nb, bins, hist, shared_hist, qs, hs);
  int32_t* qdist = dist + static_cast<int64_t>(qi) * nd;
  const int lane32 = threadIdx.x & 31;
  const int word = lane32 % LANES;  // which 16-byte word of its code this lane reads
  const uint4 qw = reinterpret_cast<const uint4*>(qs)[word];
  const uint4* dv = reinterpret_cast<const uint4*>(docs);
  const int64_t total = nd * LANES;  // 16-byte words in the corpus
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  constexpr int kUnroll = 4;
  // wb is warp-uniform, so every lane reaches the shuffles (no divergent exit)
  for (int64_t wb = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); wb < total;
       wb += kUnroll * stride) {
    uint4 a[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t w = wb + u * stride + lane32;
      a[u] = w < total ? __ldg(dv + w) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t w = wb + u * stride + lane32;
      int s = __popc(a[u].x ^ qw.x) + __popc(a[u].y ^ qw.y) + __popc(a[u].z ^ qw.z) + __popc(a[u].w ^ qw.w);
#pragma unroll
      for (int off = LANES / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (word == 0 && w < total) {  // groups are aligned to LANES: all valid or all past the end
        qdist[w / LANES] = s;
        atomicAdd(qhist + s, 1);
      }
    }
  }
  if (shared_hist) flush_hist(hs, hist + static_cast<int64_t>(qi) * bins, bins);
}

template <int LANES>
void launch_coalesced(dim3 grid, size_t smem, cudaStream_t stream, const uint8_t* qp, const uint8_t* dp, int64_t nd,
                      int nb, int32_t* dist, int32_t* hist, bool shared_hist) {
  hamming_dist_hist_coalesced_kernel<LANES><<<grid, kThreads, smem, stream>>>(qp, dp, nd, nb, dist, hist, shared_hist);
}

bool coalesced_hamming_enabled() {
  const char* e = std::getenv("LLMEMBED_FAST_HAMMING_COALESCED");
  return e != nullptr && e[0] == '1';
}

// Pass 2 (one thread per query): the k-th smallest distance t and how many documents lie at or below it.
__global__ void hamming_threshold_kernel(const int32_t* __restrict__ hist, int nq, int bins, int64_t k,
                                         int32_t* __restrict__ thr, int64_t* __restrict__ upto) {
  const int qi = blockIdx.x * blockDim.x + threadIdx.x;
  if (qi >= nq) return;
  const int32_t* h = hist + static_cast<int64_t>(qi) * bins;
  int64_t cum = 0;
  int t = 0;
  for (; t < bins; ++t) {
    cum += h[t];
    if (cum >= k) break;
  }
  thr[qi] = t;
  upto[qi] = cum;
}

// Pass 3: collect (distance << 40 | index) of every document at or below the threshold.
__global__ void hamming_collect_kernel(const int32_t* __restrict__ dist, int64_t nd, const int32_t* __restrict__ thr,
                                       int64_t cap, int64_t* __restrict__ keys, unsigned long long* __restrict__ count) {
  const int qi = blockIdx.y;
  const int32_t t = thr[qi];
  const int32_t* qdist = dist + static_cast<int64_t>(qi) * nd;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nd; j += stride) {
    const int32_t s = qdist[j];
    if (s <= t) {
      const unsigned long long pos = atomicAdd(count + qi, 1ULL);
      if (static_cast<int64_t>(pos) < cap) keys[qi * cap + pos] = (static_cast<int64_t>(s) << 40) | j;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> hamming_topk_cuda(const at::Tensor& queries, const at::Tensor& docs, int64_t k) {
  TORCH_CHECK_TYPE((queries.scalar_type() == at::kByte || queries.scalar_type() == at::kChar) &&
                       queries.scalar_type() == docs.scalar_type(),
                   "hamming_topk: queries and docs must both be uint8 or both int8 codes");
  TORCH_CHECK_VALUE(queries.dim() == 2 && docs.dim() == 2 && queries.size(1) == docs.size(1),
                    "hamming_topk: queries [Q, B] and docs [N, B] must have the same B");
  TORCH_CHECK_VALUE(queries.device() == docs.device(), "hamming_topk: queries are on ", queries.device(),
                    ", docs on ", docs.device());
  TORCH_CHECK_VALUE(k >= 1 && k <= docs.size(0), "hamming_topk: k must be in [1, ", docs.size(0), "], got ", k);
  // the per-query distance histograms count in int32: one bin can hold every document
  TORCH_CHECK_VALUE(docs.size(0) <= INT32_MAX, "hamming_topk: at most 2^31 - 1 documents on CUDA, got ",
                    docs.size(0));
  TORCH_CHECK_VALUE(docs.size(1) <= 4096, "hamming_topk: codes of at most 4096 bytes on CUDA");
  c10::cuda::CUDAGuard guard(docs.device());
  at::Tensor q = queries.contiguous(), d = docs.contiguous();
  const int64_t nq = q.size(0), nd = d.size(0);
  const int nb = static_cast<int>(d.size(1)), bins = nb * 8 + 1;
  at::Tensor out_d = at::empty({nq, k}, q.options().dtype(at::kInt));
  at::Tensor out_i = at::empty({nq, k}, q.options().dtype(at::kLong));
  if (nq == 0) return {out_d, out_i};
  auto stream = c10::cuda::getCurrentCUDAStream();
  int dev = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  // Query chunks keep the distance buffer under ~1 GiB; a chunk's queries are grid.y, at most 65535.
  const int64_t chunk = std::max<int64_t>(
      1, std::min<int64_t>({nq, (int64_t(1) << 28) / std::max<int64_t>(nd, 1), int64_t(65535)}));
  const bool vec16 = nb % 16 == 0 && reinterpret_cast<uintptr_t>(d.data_ptr()) % 16 == 0;
  const bool coalesced = coalesced_hamming_enabled();
  const size_t qbytes = ((nb + 15) / 16) * 16;
  const bool shared_hist = qbytes + bins * sizeof(int32_t) <= 40 * 1024;
  const size_t smem = qbytes + (shared_hist ? bins * sizeof(int32_t) : 0);
  const uint8_t* dp = static_cast<const uint8_t*>(d.data_ptr());
  for (int64_t q0 = 0; q0 < nq; q0 += chunk) {
    const int64_t qn = std::min(chunk, nq - q0);
    at::Tensor dist = at::empty({qn, nd}, q.options().dtype(at::kInt));
    at::Tensor hist = at::zeros({qn, bins}, q.options().dtype(at::kInt));
    const int64_t want_blocks = (nd + kThreads - 1) / kThreads;
    const unsigned gx = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want_blocks, 8LL * sms)));
    const dim3 grid(gx, static_cast<unsigned>(qn));
    const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr()) + q0 * nb;
    const int lanes = nb / 16;
    if (vec16 && coalesced && lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0) {  // not 0-byte codes
      const int64_t words = nd * lanes;
      const unsigned cx = static_cast<unsigned>(
          std::max<int64_t>(1, std::min<int64_t>((words + 4 * kThreads - 1) / (4 * kThreads), 8LL * sms)));
      const dim3 cgrid(cx, static_cast<unsigned>(qn));
      int32_t* dd = dist.data_ptr<int32_t>();
      int32_t* hh = hist.data_ptr<int32_t>();
      switch (lanes) {
        case 1: launch_coalesced<1>(cgrid, smem, stream, qp, dp, nd, nb, dd, hh, shared_hist); break;
        case 2: launch_coalesced<2>(cgrid, smem, stream, qp, dp, nd, nb, dd, hh, shared_hist); break;
        case 4: launch_coalesced<4>(cgrid, smem, stream, qp, dp, nd, nb, dd, hh, shared_hist); break;
        case 8: launch_coalesced<8>(cgrid, smem, stream, qp, dp, nd, nb, dd, hh, shared_hist); break;
        case 16: launch_coalesced<16>(cgrid, smem, stream, qp, dp, nd, nb, dd, hh, shared_hist); break;
        default: launch_coalesced<32>(cgrid, smem, stream, qp, dp, nd, nb, dd, hh, shared_hist); break;
      }
    } else if (vec16)
      hamming_dist_hist_kernel<true><<<grid, kThreads, smem, stream>>>(qp, dp, nd, nb, dist.data_ptr<int32_t>(),
                                                                       hist.data_ptr<int32_t>(), shared_hist);
    else
      hamming_dist_hist_kernel<false><<<grid, kThreads, smem, stream>>>(qp, dp, nd, nb, dist.data_ptr<int32_t>(),
                                                                        hist.data_ptr<int32_t>(), shared_hist);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor thr = at::empty({qn}, q.options().dtype(at::kInt));
    at::Tensor upto = at::empty({qn}, q.options().dtype(at::kLong));
    hamming_threshold_kernel<<<static_cast<unsigned>((qn + 127) / 128), 128, 0, stream>>>(
        hist.data_ptr<int32_t>(), static_cast<int>(qn), bins, k, thr.data_ptr<int32_t>(), upto.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t cap = upto.max().item<int64_t>();  // documents at or below the threshold (>= k)
    at::Tensor keys = at::full({qn, cap}, std::numeric_limits<int64_t>::max(), q.options().dtype(at::kLong));
    at::Tensor count = at::zeros({qn}, q.options().dtype(at::kLong));
    hamming_collect_kernel<<<grid, kThreads, 0, stream>>>(dist.data_ptr<int32_t>(), nd, thr.data_ptr<int32_t>(), cap,
                                                          keys.data_ptr<int64_t>(),
                                                          reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor best = std::get<0>(at::sort(keys, /*dim=*/1)).narrow(1, 0, k);
    out_d.narrow(0, q0, qn).copy_(at::bitwise_right_shift(best, 40).to(at::kInt));
    out_i.narrow(0, q0, qn).copy_(at::bitwise_and(best, (int64_t(1) << 40) - 1));
  }
  return {out_d, out_i};
}

}  // namespace
}  // namespace lf_torch

TORCH_LIBRARY_IMPL(llmembed_fast, CUDA, m) {
  m.impl("quantize_scalar", &lf_torch::quantize_scalar_cuda);
  m.impl("hamming_topk", &lf_torch::hamming_topk_cuda);
}
