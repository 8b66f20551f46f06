#include "quantize.h"

#include <cmath>
#include <cstring>

#include "parallel.h"
#include "simd.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LF_X86 1
#endif

namespace lf {

float round_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return f;                              // inf, NaN
  if (a >= 0x477ff000u) return sign ? -INFINITY : INFINITY;    // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                       // below 2^-14: half subnormal grid 2^-24
    const float scaled = std::nearbyint(f * 16777216.0f);      // exact scaling, ties to even
    return scaled / 16777216.0f;
  }
  const uint32_t lsb = (a >> 13) & 1u;                         // keep 10 of 23 mantissa bits
  uint32_t r = ((a + 0xfffu + lsb) & ~0x1fffu) | sign;
  float out;
  std::memcpy(&out, &r, 4);
  return out;
}

namespace {

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    if (m == 0) u = sign;
    else {  // subnormal: m * 2^-24
      float f = static_cast<float>(m) * (1.0f / 16777216.0f);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The output byte of v = (x - start) / step (already rounded to the compute precision): the code, xor flip.
// NaN gives byte 0 for uint8 and int8 alike, as sentence-transformers' numpy casts do (NaN -> 0 on x86 and
// ARM), not code 0 (which would be -128 as int8).
template <class T>
inline uint8_t out_byte(T v, uint8_t flip) {
  if (std::isnan(v)) return 0;
  v = std::floor(v);
  if (v < T(0)) v = T(0);
  if (v > T(255)) v = T(255);
  return static_cast<uint8_t>(v) ^ flip;
}

inline float load_as_float(const void* row, FloatKind kind, int64_t j) {
  switch (kind) {
    case FloatKind::F32: return static_cast<const float*>(row)[j];
    case FloatKind::F16: return half_bits_to_float(static_cast<const uint16_t*>(row)[j]);
    case FloatKind::BF16: return bf16_bits_to_float(static_cast<const uint16_t*>(row)[j]);
    case FloatKind::F64: return static_cast<float>(static_cast<const double*>(row)[j]);  // not used
  }
  return 0.0f;
}

inline double load_as_double(const void* row, FloatKind kind, int64_t j) {
  if (kind == FloatKind::F64) return static_cast<const double*>(row)[j];
  return static_cast<double>(load_as_float(row, kind, j));
}

void row_generic(const void* row, FloatKind kind, int64_t d, const void* starts, const void* steps, ComputeKind ck,
                 uint8_t flip, uint8_t* o) {
  switch (ck) {
    case ComputeKind::F64: {
      const double* s = static_cast<const double*>(starts);
      const double* t = static_cast<const double*>(steps);
      for (int64_t j = 0; j < d; ++j) o[j] = out_byte((load_as_double(row, kind, j) - s[j]) / t[j], flip);
      break;
    }
    case ComputeKind::F32: {
      const float* s = static_cast<const float*>(starts);
      const float* t = static_cast<const float*>(steps);
      for (int64_t j = 0; j < d; ++j) o[j] = out_byte((load_as_float(row, kind, j) - s[j]) / t[j], flip);
      break;
    }
    case ComputeKind::F16: {
      const float* s = static_cast<const float*>(starts);
      const float* t = static_cast<const float*>(steps);
      for (int64_t j = 0; j < d; ++j)
        o[j] = out_byte(round_to_half(round_to_half(load_as_float(row, kind, j) - s[j]) / t[j]), flip);
      break;
    }
  }
}

#ifdef LF_X86
// float32 rows in float32 arithmetic: 8 lanes of sub, div (IEEE, as numpy), floor, clamp.
__attribute__((target("avx2"))) void row_f32_avx2(const float* x, int64_t d, const float* s, const float* t,
                                                  uint8_t flip, uint8_t* o) {
  const __m256 lo = _mm256_setzero_ps(), hi = _mm256_set1_ps(255.0f);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    __m256 v = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(s + j)), _mm256_loadu_ps(t + j));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    v = _mm256_round_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);  // max(NaN, 0) = 0: NaN -> code 0 ...
    const __m256i c = _mm256_cvttps_epi32(v);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    __m128i b = _mm_xor_si128(_mm_packus_epi16(w, w), _mm_set1_epi8(static_cast<char>(flip)));
    // ... and its byte 0 whatever the flip (see out_byte): the NaN lanes' all-ones masks packed to bytes
    const __m128i nw = _mm_packs_epi32(_mm256_castsi256_si128(nan), _mm256_extracti128_si256(nan, 1));
    b = _mm_andnot_si128(_mm_packs_epi16(nw, nw), b);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(o + j), b);
  }
  for (; j < d; ++j) o[j] = out_byte((x[j] - s[j]) / t[j], flip);
}
#endif

}  // namespace

void quantize_scalar(const void* x, FloatKind xkind, int64_t n, int64_t d, int64_t row_stride, const void* starts,
                     const void* steps, ComputeKind ck, bool signed_out, uint8_t* out, int num_threads) {
  const uint8_t flip = signed_out ? 0x80 : 0x00;
  const int64_t esize = (xkind == FloatKind::F64) ? 8 : (xkind == FloatKind::F32 ? 4 : 2);
  const int64_t grain = d > 0 ? (16384 / d) + 1 : n;
#ifdef LF_X86
  const bool avx2 = simd_active() >= Simd::AVX2 && xkind == FloatKind::F32 && ck == ComputeKind::F32;
#else
  const bool avx2 = false;
#endif
  parallel_for(0, n, grain, num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const void* row = static_cast<const char*>(x) + r * row_stride * esize;
#ifdef LF_X86
      if (avx2) {
        row_f32_avx2(static_cast<const float*>(row), d, static_cast<const float*>(starts),
                     static_cast<const float*>(steps), flip, out + r * d);
        continue;
      }
#endif
      row_generic(row, xkind, d, starts, steps, ck, flip, out + r * d);
    }
  });
}

}  // namespace lf
