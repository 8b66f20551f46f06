#include "pack_bits.h"

#include <cstring>

#include "parallel.h"
#include "simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LF_X86 1
#endif

namespace lf {
namespace {

// x > 0 for IEEE half-width formats, from the bits: sign clear, not zero, not NaN.
// `inf_bits` is the magnitude pattern of +inf (0x7c00 for fp16, 0x7f80 for bf16).
inline bool half_positive(uint16_t bits, uint16_t inf_bits) {
  const uint16_t mag = bits & 0x7fffu;
  return (bits & 0x8000u) == 0 && mag != 0 && mag <= inf_bits;
}

template <class Pred>
void pack_row(int64_t d, uint8_t* out, const Pred& positive) {
  const int64_t full = d / 8;
  for (int64_t j = 0; j < full; ++j) {
    unsigned byte = 0;
    for (int b = 0; b < 8; ++b) byte = (byte << 1) | (positive(j * 8 + b) ? 1u : 0u);
    out[j] = static_cast<uint8_t>(byte);
  }
  const int rem = static_cast<int>(d - full * 8);
  if (rem) {
    unsigned byte = 0;
    for (int b = 0; b < rem; ++b) byte |= (positive(full * 8 + b) ? 1u : 0u) << (7 - b);
    out[full] = static_cast<uint8_t>(byte);
  }
}

#ifdef LF_X86
// Bit-reversal of a byte: movemask puts element 0 in bit 0, packbits wants it in bit 7.
struct ReverseTable {
  uint8_t v[256];
  ReverseTable() {
    for (int i = 0; i < 256; ++i) {
      unsigned r = 0;
      for (int b = 0; b < 8; ++b) r |= ((i >> b) & 1u) << (7 - b);
      v[i] = static_cast<uint8_t>(r);
    }
  }
};
const ReverseTable kReverse;

// float32 rows: compare 32 lanes with 0 (ordered: NaN is not positive), movemask, reverse bits.
__attribute__((target("avx2"))) void pack_row_f32_avx2(const float* p, int64_t d, uint8_t* out) {
  const __m256 zero = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= d; j += 32) {
    const unsigned m0 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), zero, _CMP_GT_OQ));
    const unsigned m1 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 8), zero, _CMP_GT_OQ));
    const unsigned m2 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 16), zero, _CMP_GT_OQ));
    const unsigned m3 = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j + 24), zero, _CMP_GT_OQ));
    const uint32_t word = static_cast<uint32_t>(kReverse.v[m0]) | (static_cast<uint32_t>(kReverse.v[m1]) << 8) |
                          (static_cast<uint32_t>(kReverse.v[m2]) << 16) | (static_cast<uint32_t>(kReverse.v[m3]) << 24);
    std::memcpy(out + j / 8, &word, 4);
  }
  for (; j + 8 <= d; j += 8)
    out[j / 8] = kReverse.v[_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + j), zero, _CMP_GT_OQ))];
  const int64_t full = j / 8;
  const int rem = static_cast<int>(d - j);
  if (rem) {
    unsigned byte = 0;
    for (int b = 0; b < rem; ++b) byte |= (p[j + b] > 0.0f ? 1u : 0u) << (7 - b);
    out[full] = static_cast<uint8_t>(byte);
  }
}
#endif

}  // namespace

void pack_bits(const void* x, FloatKind kind, int64_t n, int64_t d, int64_t row_stride, uint8_t* out,
               int num_threads) {
  const int64_t nb = packed_bytes(d);
  // ~16 KiB of input per task keeps the fork cost negligible.
  const int64_t grain = d > 0 ? (16384 / d) + 1 : n;
#ifdef LF_X86
  const bool avx2 = simd_active() >= Simd::AVX2;
#endif
  parallel_for(0, n, grain, num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* o = out + r * nb;
#ifdef LF_X86
      if (avx2 && kind == FloatKind::F32) {
        pack_row_f32_avx2(static_cast<const float*>(x) + r * row_stride, d, o);
        continue;
      }
#endif
      switch (kind) {
        case FloatKind::F32: {
          const float* p = static_cast<const float*>(x) + r * row_stride;
          pack_row(d, o, [p](int64_t j) { return p[j] > 0.0f; });
          break;
        }
        case FloatKind::F64: {
          const double* p = static_cast<const double*>(x) + r * row_stride;
          pack_row(d, o, [p](int64_t j) { return p[j] > 0.0; });
          break;
        }
        case FloatKind::F16: {
          const uint16_t* p = static_cast<const uint16_t*>(x) + r * row_stride;
          pack_row(d, o, [p](int64_t j) { return half_positive(p[j], 0x7c00u); });
          break;
        }
        case FloatKind::BF16: {
          const uint16_t* p = static_cast<const uint16_t*>(x) + r * row_stride;
          pack_row(d, o, [p](int64_t j) { return half_positive(p[j], 0x7f80u); });
          break;
        }
      }
    }
  });
}

}  // namespace lf
