#include "int8_search.h"

#include <algorithm>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "simd.h"
#include "topk.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LF_X86 1
#endif

namespace lf {
namespace {

// The AVX2 kernel's bound on |a| and the offset that makes a unsigned for int8 codes (see mul_rows).
constexpr int kAvx2Qmax = 32;

// The dimensions the AVX2 kernel covers with vectors: all of them from d = 32 up (the last d % 32 through one
// more 32-byte window that ends at the row's end, with the query's lanes before them zeroed), none below.
inline int64_t vector_span(int64_t d) { return d >= 32 ? d : 0; }

// The integer query: a [d] (|a| <= the kernel's bound), a + kAvx2Qmax as uint8, the sum of a over the first
// vector_span(d) dimensions, and the operands of the last 32-byte window (tail[0, 32): a's bytes, tail[32, 64):
// a_off's; both zero in the lanes before the last d % 32 dimensions; all zero when d % 32 == 0 or d < 32).
struct IntQuery {
  const int8_t* a;
  const uint8_t* a_off;
  int32_t head_sum;
  const uint8_t* tail;
};

// Integer dots of one query with n rows of u: out[r] = sum_j a[j] * u[r][j], u = byte ^ flip.
// head_sums[r] = sum over the first vector_span(d) bytes of row r read as int8 (used by the signed AVX2 path).
using DotFn = void (*)(const IntQuery& q, const uint8_t* rows, int64_t n, int64_t d, uint8_t flip,
                       const int32_t* head_sums, int32_t* out);

void dots_scalar(const IntQuery& q, const uint8_t* rows, int64_t n, int64_t d, uint8_t flip, const int32_t*,
                 int32_t* out) {
  const int8_t* a = q.a;
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* u = rows + r * d;
    int32_t s = 0;
    for (int64_t j = 0; j < d; ++j) s += static_cast<int32_t>(a[j]) * static_cast<int32_t>(u[j] ^ flip);
    out[r] = s;
  }
}

#ifdef LF_X86
#define LF_AVX2 __attribute__((target("avx2,fma")))

LF_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// vpmaddubsw multiplies u8 x s8 and sums adjacent pairs to s16; vpmaddwd by ones widens pairs of s16 to s32.
// On Zen 3 the two share the same two pipes (measured: 2 per cycle, alone or interleaved), so the widening
// costs as much as the products. With |a| <= 32 a pair sum is within 2 * 255 * 32 = 16320, so two
// vpmaddubsw results add in int16 without saturating and one vpmaddwd widens both: 3 multiply uops per
// 64 products instead of 4 (the first-digit bound is 2x wider; the in-scan second digit absorbs it).
LF_AVX2 inline __m256i ld(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// uint8 codes: the row byte u is the unsigned operand, a the signed one.
// int8 codes c = u - 128: the signed operand is c itself and the unsigned one a + 32 (in [0, 64]), pair sums in
// [-16384, 16256], two of them in [-32768, 32512]; sum a u = sum (a + 32) c - 32 sum c + 128 sum a.
// No per-byte xor either way.
template <bool SIGNED>
LF_AVX2 inline __m256i mul_rows(__m256i row, __m256i qv) {
  return SIGNED ? _mm256_maddubs_epi16(qv, row) : _mm256_maddubs_epi16(row, qv);
}

// 64 products of one row: two vpmaddubsw summed in int16, widened once.
template <bool SIGNED>
LF_AVX2 inline __m256i dot64(const uint8_t* u, __m256i qa, __m256i qb, __m256i ones) {
  return _mm256_madd_epi16(_mm256_add_epi16(mul_rows<SIGNED>(ld(u), qa), mul_rows<SIGNED>(ld(u + 32), qb)), ones);
}

template <bool SIGNED>
LF_AVX2 inline __m256i dot32(const uint8_t* u, __m256i qv, __m256i ones) {
  return _mm256_madd_epi16(mul_rows<SIGNED>(ld(u), qv), ones);
}

template <bool SIGNED>
LF_AVX2 void dots_avx2_t(const IntQuery& q, const uint8_t* rows, int64_t n, int64_t d, uint8_t flip,
                         const int32_t* head_sums, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t d32 = d & ~int64_t(31), d64 = d & ~int64_t(63);
  const int8_t* a = q.a;
  const uint8_t* qop = SIGNED ? q.a_off : reinterpret_cast<const uint8_t*>(q.a);
  // d % 32 left over: from d = 32 up, one more window over the row's last 32 bytes (the query's lanes before
  // d32 are zero there, so no product counts twice); below 32, scalar products.
  const bool window = d32 < d && d >= 32, scalar_tail = d < 32;
  const __m256i tq = window ? ld(q.tail + (SIGNED ? 32 : 0)) : _mm256_setzero_si256();
  auto tail = [&](const uint8_t* u) {
    int32_t s = 0;
    for (int64_t j = 0; j < d; ++j) s += static_cast<int32_t>(a[j]) * static_cast<int32_t>(u[j] ^ flip);
    return s;
  };
  auto finish = [&](int64_t r, const uint8_t* u, __m256i acc) LF_AVX2 {
    int32_t s = hsum_epi32(acc) + (scalar_tail ? tail(u) : 0);
    if (SIGNED) s += 128 * q.head_sum - kAvx2Qmax * head_sums[r];
    out[r] = s;
  };
  // Four rows' lane sums at once (three vphaddd instead of four separate reductions).
  auto finish4 = [&](int64_t r, const uint8_t* u0, __m256i c0, __m256i c1, __m256i c2, __m256i c3) LF_AVX2 {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(c0, c1), _mm256_hadd_epi32(c2, c3));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    if (SIGNED)
      s = _mm_add_epi32(s, _mm_sub_epi32(_mm_set1_epi32(128 * q.head_sum),
                                         _mm_slli_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(head_sums + r)), 5)));
    if (scalar_tail) s = _mm_add_epi32(s, _mm_setr_epi32(tail(u0), tail(u0 + d), tail(u0 + 2 * d), tail(u0 + 3 * d)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r), s);
  };
  static_assert(kAvx2Qmax == 32, "finish4 multiplies the head sums by 32 with a shift");
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {  // four rows share each query load
    const uint8_t* u0 = rows + r * d;
    const uint8_t* u1 = u0 + d;
    const uint8_t* u2 = u1 + d;
    const uint8_t* u3 = u2 + d;
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t j = 0; j < d64; j += 64) {
      const __m256i qa = ld(qop + j), qb = ld(qop + j + 32);
      c0 = _mm256_add_epi32(c0, dot64<SIGNED>(u0 + j, qa, qb, ones));
      c1 = _mm256_add_epi32(c1, dot64<SIGNED>(u1 + j, qa, qb, ones));
      c2 = _mm256_add_epi32(c2, dot64<SIGNED>(u2 + j, qa, qb, ones));
      c3 = _mm256_add_epi32(c3, dot64<SIGNED>(u3 + j, qa, qb, ones));
    }
    if (d64 < d32) {
      const __m256i qv = ld(qop + d64);
      c0 = _mm256_add_epi32(c0, dot32<SIGNED>(u0 + d64, qv, ones));
      c1 = _mm256_add_epi32(c1, dot32<SIGNED>(u1 + d64, qv, ones));
      c2 = _mm256_add_epi32(c2, dot32<SIGNED>(u2 + d64, qv, ones));
      c3 = _mm256_add_epi32(c3, dot32<SIGNED>(u3 + d64, qv, ones));
    }
    if (window) {
      c0 = _mm256_add_epi32(c0, dot32<SIGNED>(u0 + d - 32, tq, ones));
      c1 = _mm256_add_epi32(c1, dot32<SIGNED>(u1 + d - 32, tq, ones));
      c2 = _mm256_add_epi32(c2, dot32<SIGNED>(u2 + d - 32, tq, ones));
      c3 = _mm256_add_epi32(c3, dot32<SIGNED>(u3 + d - 32, tq, ones));
    }
    finish4(r, u0, c0, c1, c2, c3);
  }
  for (; r < n; ++r) {
    const uint8_t* u = rows + r * d;
    __m256i c = _mm256_setzero_si256();
    for (int64_t j = 0; j < d64; j += 64) c = _mm256_add_epi32(c, dot64<SIGNED>(u + j, ld(qop + j), ld(qop + j + 32), ones));
    if (d64 < d32) c = _mm256_add_epi32(c, dot32<SIGNED>(u + d64, ld(qop + d64), ones));
    if (window) c = _mm256_add_epi32(c, dot32<SIGNED>(u + d - 32, tq, ones));
    finish(r, u, c);
  }
}

LF_AVX2 void dots_avx2(const IntQuery& q, const uint8_t* rows, int64_t n, int64_t d, uint8_t flip,
                       const int32_t* head_sums, int32_t* out) {
  if (flip) dots_avx2_t<true>(q, rows, n, d, flip, head_sums, out);
  else dots_avx2_t<false>(q, rows, n, d, flip, head_sums, out);
}

// AVX-512 VNNI: vpdpbusd accumulates u8 x s8 products in int32 without saturation; masked tail loads.
#define LF_VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

// A 512-bit accumulator's 16 lanes folded to 8 (the halves by memcpy, compiled to register moves: GCC 12's
// 512-bit extract and reduce intrinsics warn -Wmaybe-uninitialized).
LF_VNNI inline __m256i fold512(__m512i c) {
  __m256i lo, hi;
  std::memcpy(&lo, &c, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&c) + sizeof lo, sizeof hi);
  return _mm256_add_epi32(lo, hi);
}

LF_VNNI void dots_vnni(const IntQuery& q, const uint8_t* rows, int64_t n, int64_t d, uint8_t flip, const int32_t*,
                       int32_t* out) {
  const int8_t* a = q.a;
  const __m512i fl = _mm512_set1_epi8(static_cast<char>(flip));
  const int64_t nfull = d / 64, rem = d - nfull * 64;
  const __mmask64 tail = rem ? (~0ULL >> (64 - rem)) : 0;
  auto ldu = [&](const uint8_t* u, int64_t j) LF_VNNI { return _mm512_xor_si512(_mm512_loadu_si512(u + 64 * j), fl); };
  // masked-off lanes load 0 for a, so their products vanish whatever u is
  auto ldt = [&](const uint8_t* u) LF_VNNI {
    return _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, u + 64 * nfull), fl);
  };
  int64_t r = 0;
  // Four rows share each query load (two 512-bit loads per vpdpbusd were the limit of one row at a time:
  // Zen 4 loads one 512-bit vector per cycle); eight accumulators, two per row, cover vpdpbusd's latency.
  for (; r + 4 <= n; r += 4) {
    const uint8_t* u0 = rows + r * d;
    const uint8_t* u1 = u0 + d;
    const uint8_t* u2 = u1 + d;
    const uint8_t* u3 = u2 + d;
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, e0 = c0, e1 = c0, e2 = c0, e3 = c0;
    int64_t j = 0;
    for (; j + 2 <= nfull; j += 2) {
      const __m512i av = _mm512_loadu_si512(a + 64 * j), bv = _mm512_loadu_si512(a + 64 * j + 64);
      c0 = _mm512_dpbusd_epi32(c0, ldu(u0, j), av);
      c1 = _mm512_dpbusd_epi32(c1, ldu(u1, j), av);
      c2 = _mm512_dpbusd_epi32(c2, ldu(u2, j), av);
      c3 = _mm512_dpbusd_epi32(c3, ldu(u3, j), av);
      e0 = _mm512_dpbusd_epi32(e0, ldu(u0, j + 1), bv);
      e1 = _mm512_dpbusd_epi32(e1, ldu(u1, j + 1), bv);
      e2 = _mm512_dpbusd_epi32(e2, ldu(u2, j + 1), bv);
      e3 = _mm512_dpbusd_epi32(e3, ldu(u3, j + 1), bv);
    }
    if (j < nfull) {
      const __m512i av = _mm512_loadu_si512(a + 64 * j);
      c0 = _mm512_dpbusd_epi32(c0, ldu(u0, j), av);
      c1 = _mm512_dpbusd_epi32(c1, ldu(u1, j), av);
      c2 = _mm512_dpbusd_epi32(c2, ldu(u2, j), av);
      c3 = _mm512_dpbusd_epi32(c3, ldu(u3, j), av);
    }
    if (rem) {
      const __m512i av = _mm512_maskz_loadu_epi8(tail, a + 64 * nfull);
      e0 = _mm512_dpbusd_epi32(e0, ldt(u0), av);
      e1 = _mm512_dpbusd_epi32(e1, ldt(u1), av);
      e2 = _mm512_dpbusd_epi32(e2, ldt(u2), av);
      e3 = _mm512_dpbusd_epi32(e3, ldt(u3), av);
    }
    // the four rows' lane sums at once: three vphaddd
    const __m256i f0 = fold512(_mm512_add_epi32(c0, e0)), f1 = fold512(_mm512_add_epi32(c1, e1));
    const __m256i f2 = fold512(_mm512_add_epi32(c2, e2)), f3 = fold512(_mm512_add_epi32(c3, e3));
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(f0, f1), _mm256_hadd_epi32(f2, f3));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r),
                     _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
  }
  for (; r < n; ++r) {
    const uint8_t* u = rows + r * d;
    // four independent accumulators: vpdpbusd's latency (~5 cycles) would otherwise bound a single chain
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
    int64_t j = 0;
    for (; j + 4 <= nfull; j += 4) {
      c0 = _mm512_dpbusd_epi32(c0, ldu(u, j), _mm512_loadu_si512(a + 64 * j));
      c1 = _mm512_dpbusd_epi32(c1, ldu(u, j + 1), _mm512_loadu_si512(a + 64 * j + 64));
      c2 = _mm512_dpbusd_epi32(c2, ldu(u, j + 2), _mm512_loadu_si512(a + 64 * j + 128));
      c3 = _mm512_dpbusd_epi32(c3, ldu(u, j + 3), _mm512_loadu_si512(a + 64 * j + 192));
    }
    for (; j < nfull; ++j) c0 = _mm512_dpbusd_epi32(c0, ldu(u, j), _mm512_loadu_si512(a + 64 * j));
    if (rem) c1 = _mm512_dpbusd_epi32(c1, ldt(u), _mm512_maskz_loadu_epi8(tail, a + 64 * nfull));
    const __m256i h = fold512(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)));
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
    out[r] = _mm_cvtsi128_si32(t);
  }
}
#endif  // LF_X86

// ---------------------------------------------------------------- exact float64 rescoring
// The defined score: 16 lanes (j mod 16) of separately rounded products and sums, combined as a fixed
// pairwise tree, then the d % 16 tail in order. Scalar and AVX2 give bit-identical results; 16 lanes keep
// four independent vector add chains in flight.
inline double combine16(const double* l) {
  double t[8];
  for (int i = 0; i < 8; ++i) t[i] = l[i] + l[i + 8];
  for (int i = 0; i < 4; ++i) t[i] = t[i] + t[i + 4];
  return (t[0] + t[2]) + (t[1] + t[3]);
}

double exact_score_scalar(const double* w, const uint8_t* u, int64_t d, uint8_t flip) {
  double l[16] = {0};
  const int64_t d16 = d & ~int64_t(15);
  for (int64_t j = 0; j < d16; j += 16)
    for (int i = 0; i < 16; ++i) l[i] += w[j + i] * static_cast<double>(u[j + i] ^ flip);
  double s = combine16(l);
  for (int64_t j = d16; j < d; ++j) s += w[j] * static_cast<double>(u[j] ^ flip);
  return s;
}

#ifdef LF_X86
__attribute__((target("avx2"))) double exact_score_avx2(const double* w, const uint8_t* u, int64_t d, uint8_t flip) {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  const int64_t d16 = d & ~int64_t(15);
  const __m256i fl = _mm256_set1_epi32(flip);
  for (int64_t j = 0; j < d16; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(u + j));
    const __m256i lo = _mm256_xor_si256(_mm256_cvtepu8_epi32(b), fl);
    const __m256i hi = _mm256_xor_si256(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), fl);
    acc[0] = _mm256_add_pd(acc[0], _mm256_mul_pd(_mm256_loadu_pd(w + j), _mm256_cvtepi32_pd(_mm256_castsi256_si128(lo))));
    acc[1] = _mm256_add_pd(acc[1], _mm256_mul_pd(_mm256_loadu_pd(w + j + 4), _mm256_cvtepi32_pd(_mm256_extracti128_si256(lo, 1))));
    acc[2] = _mm256_add_pd(acc[2], _mm256_mul_pd(_mm256_loadu_pd(w + j + 8), _mm256_cvtepi32_pd(_mm256_castsi256_si128(hi))));
    acc[3] = _mm256_add_pd(acc[3], _mm256_mul_pd(_mm256_loadu_pd(w + j + 12), _mm256_cvtepi32_pd(_mm256_extracti128_si256(hi, 1))));
  }
  alignas(32) double l[16];
  for (int i = 0; i < 4; ++i) _mm256_store_pd(l + 4 * i, acc[i]);
  double s = combine16(l);
  for (int64_t j = d16; j < d; ++j) s += w[j] * static_cast<double>(u[j] ^ flip);
  return s;
}
#endif

// float32 rows, the same 16-lane order (the rescoring of stored vectors).
double exact_score_f32_scalar(const double* w, const float* x, int64_t d) {
  double l[16] = {0};
  const int64_t d16 = d & ~int64_t(15);
  for (int64_t j = 0; j < d16; j += 16)
    for (int i = 0; i < 16; ++i) l[i] += w[j + i] * static_cast<double>(x[j + i]);
  double s = combine16(l);
  for (int64_t j = d16; j < d; ++j) s += w[j] * static_cast<double>(x[j]);
  return s;
}

#ifdef LF_X86
__attribute__((target("avx2"))) double exact_score_f32_avx2(const double* w, const float* x, int64_t d) {
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  const int64_t d16 = d & ~int64_t(15);
  for (int64_t j = 0; j < d16; j += 16)
    for (int i = 0; i < 4; ++i)
      acc[i] = _mm256_add_pd(acc[i], _mm256_mul_pd(_mm256_loadu_pd(w + j + 4 * i),
                                                   _mm256_cvtps_pd(_mm_loadu_ps(x + j + 4 * i))));
  alignas(32) double l[16];
  for (int i = 0; i < 4; ++i) _mm256_store_pd(l + 4 * i, acc[i]);
  double s = combine16(l);
  for (int64_t j = d16; j < d; ++j) s += w[j] * static_cast<double>(x[j]);
  return s;
}
#endif

#ifdef LF_X86
// sum_j (u_j - 128)^2 for n rows.
__attribute__((target("avx2"))) void sqnorms_avx2(const uint8_t* rows, int64_t n, int64_t d, uint8_t flip,
                                                  int64_t* out, int32_t* head_sums) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i sflip = _mm256_set1_epi8(static_cast<char>(flip ^ 0x80));  // byte ^ sflip = u - 128 as int8
  const int64_t d32 = d & ~int64_t(31);
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* u = rows + r * d;
    __m256i acc = _mm256_setzero_si256(), sum = acc;
    for (int64_t j = 0; j < d32; j += 32) {
      const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + j)), sflip);
      const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
      const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
      acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(lo, lo), _mm256_madd_epi16(hi, hi)));
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones));
    }
    // v = u - 128 = the int8 code: its sum over vector_span(d) is what the signed dot kernel needs
    int32_t hs = hsum_epi32(sum);
    int64_t s = hsum_epi32(acc);  // <= 32 * 16384 per lane per 32 bytes: int32 lanes hold d <= 65536
    for (int64_t j = d32; j < d; ++j) {
      const int32_t v = static_cast<int32_t>(u[j] ^ flip) - 128;
      s += v * v;
      hs += v;
    }
    head_sums[r] = d >= 32 ? hs : 0;
    out[r] = s;
  }
}
#endif

void sqnorms_scalar(const uint8_t* rows, int64_t n, int64_t d, uint8_t flip, int64_t* out, int32_t* head_sums) {
  const int64_t span = vector_span(d);
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* u = rows + r * d;
    int32_t hs = 0;
    for (int64_t j = 0; j < span; ++j) hs += static_cast<int32_t>(u[j] ^ flip) - 128;
    head_sums[r] = hs;
    int64_t s = 0;
    for (int64_t j = 0; j < d; ++j) {
      const int32_t v = static_cast<int32_t>(u[j] ^ flip) - 128;
      s += v * v;
    }
    out[r] = s;
  }
}

double exact_score(const double* w, const uint8_t* u, int64_t d, uint8_t flip) {
#ifdef LF_X86
  if (simd_active() >= Simd::AVX2) return exact_score_avx2(w, u, d, flip);
#endif
  return exact_score_scalar(w, u, d, flip);
}

double exact_score_f32(const double* w, const float* x, int64_t d) {
#ifdef LF_X86
  if (simd_active() >= Simd::AVX2) return exact_score_f32_avx2(w, x, d);
#endif
  return exact_score_f32_scalar(w, x, d);
}

void sqnorms(const uint8_t* rows, int64_t n, int64_t d, uint8_t flip, int64_t* out, int32_t* head_sums) {
#ifdef LF_X86
  if (simd_active() >= Simd::AVX2) return sqnorms_avx2(rows, n, d, flip, out, head_sums);
#endif
  sqnorms_scalar(rows, n, d, flip, out, head_sums);
}

// ---------------------------------------------------------------- the scan's row filter
// Index of the first i in [from, n) with v[i] >= t, or n. Most rows of a tile fail the cut, so the scan
// skips them eight at a time instead of testing each one.
using NextAtLeastFn = int64_t (*)(const int32_t* v, int64_t from, int64_t n, int32_t t);

int64_t next_at_least_scalar(const int32_t* v, int64_t from, int64_t n, int32_t t) {
  while (from < n && v[from] < t) ++from;
  return from;
}

#ifdef LF_X86
LF_AVX2 int64_t next_at_least_avx2(const int32_t* v, int64_t from, int64_t n, int32_t t) {
  const __m256i tv = _mm256_set1_epi32(t);
  for (; from + 8 <= n; from += 8) {
    const __m256i fail = _mm256_cmpgt_epi32(tv, ld(v + from));  // t > v: below the cut
    const unsigned pass = ~static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(fail))) & 0xffu;
    if (pass) return from + __builtin_ctz(pass);
  }
  return next_at_least_scalar(v, from, n, t);
}
#endif

struct Kernel {
  DotFn dots;
  int qmax;  // largest |a| the kernel accepts
  NextAtLeastFn next_at_least;
};

Kernel pick_kernel() {
#ifdef LF_X86
  if (simd_active() == Simd::AVX512 && cpu_has_avx512_vnni()) return {dots_vnni, 127, next_at_least_avx2};
  if (simd_active() >= Simd::AVX2) return {dots_avx2, kAvx2Qmax, next_at_least_avx2};
#endif
  return {dots_scalar, 127, next_at_least_scalar};
}

// Per query: the integer query, its scale and error terms.
// One integer digit of a query: w ~ scale * a, a in [-qmax, qmax]; err = w - scale * a.
struct Digit {
  std::vector<int8_t> a;
  std::vector<uint8_t> a_off;  // a + kAvx2Qmax (read by the AVX2 kernel only)
  int32_t head_sum = 0;        // sum of a over the first vector_span(d) dimensions
  std::vector<uint8_t> tail;   // IntQuery::tail (read by the AVX2 kernel only)
  double scale = 1.0, err_sum = 0.0, err_norm = 0.0;
  IntQuery view() const { return {a.data(), a_off.data(), head_sum, tail.data()}; }
};

// The scan uses the first digit; rows that survive it are refined at once with the second digit (the first
// one's rounding error, quantized again: a bound ~qmax times tighter) while the row is still in L1, and the
// few that survive that wait for exact rescoring.
struct QueryPlan {
  Digit first, second;
  double slack = 0.0;
  bool exhaustive = false;  // weights too large for finite bounds: every row is rescored exactly instead
};

// Quantizes w [d] to one digit; `residual` receives w - scale * a.
void make_digit(const double* w, int64_t d, int qmax, Digit* g, double* residual) {
  double amax = 0.0;
  for (int64_t j = 0; j < d; ++j) amax = std::max(amax, std::fabs(w[j]));
  g->scale = amax > 0.0 ? amax / qmax : 1.0;
  g->a.assign(static_cast<size_t>(d), 0);
  g->a_off.assign(static_cast<size_t>(d), 0);
  g->head_sum = 0;
  double es = 0.0, emax = 0.0;
  const int64_t span = vector_span(d), d32 = d & ~int64_t(31);
  for (int64_t j = 0; j < d; ++j) {
    double q = std::nearbyint(w[j] / g->scale);
    q = std::min<double>(qmax, std::max<double>(-qmax, q));
    g->a[j] = static_cast<int8_t>(q);
    g->a_off[j] = static_cast<uint8_t>(g->a[j] + kAvx2Qmax);  // unused (wraps) when qmax > 32
    if (j < span) g->head_sum += g->a[j];
    const double e = w[j] - g->scale * q;
    residual[j] = e;
    es += e;
    emax = std::max(emax, std::fabs(e));
  }
  g->err_sum = es;
  g->tail.assign(64, 0);
  for (int64_t j = d32; d >= 32 && j < d; ++j) {
    const size_t lane = static_cast<size_t>(j - (d - 32));
    g->tail[lane] = static_cast<uint8_t>(g->a[j]);
    g->tail[32 + lane] = g->a_off[j];
  }
  // ||e|| with e scaled by a power of two (exact) to at most 1 first: squares of tiny errors (|e| < 1e-154)
  // would underflow and those of huge ones overflow, leaving the bound wrong.
  int ex = 0;
  if (emax > 0.0) std::frexp(emax, &ex);
  const int sh = std::min(-ex, 1023);  // 2^sh stays finite; subnormal emax: scaled to >= 2^-51
  const double up = std::ldexp(1.0, sh);
  double e2 = 0.0;
  for (int64_t j = 0; j < d; ++j) {
    const double e = residual[j] * up;
    e2 += e * e;
  }
  g->err_norm = std::ldexp(std::sqrt(e2) * (1.0 + 1e-9), -sh);
}

void plan_query(const double* w, int64_t d, int qmax, QueryPlan* p) {
  double asum = 0.0, amax = 0.0;
  for (int64_t j = 0; j < d; ++j) asum += std::fabs(w[j]), amax = std::max(amax, std::fabs(w[j]));
  // Every bound, approximate and exact score is below 1024 * d * amax in magnitude: past that they could
  // overflow (inf - inf = NaN), so such a query is ranked by exact scores alone.
  p->exhaustive = !(amax <= DBL_MAX / (1024.0 * static_cast<double>(d)));
  if (p->exhaustive) return;
  std::vector<double> r1(static_cast<size_t>(d)), r2(static_cast<size_t>(d));
  make_digit(w, d, qmax, &p->first, r1.data());
  make_digit(r1.data(), d, qmax, &p->second, r2.data());
  // Room for float64 rounding in the bounds and in the exact rescoring (|score| <= 255 * sum|w|).
  p->slack = 1e-9 * (255.0 * asum) + 1e-300;
}

// State of one query over one slice of rows.
struct Selection {
  TopK<double> lower;   // k largest lower bounds (key = -bound)
  TopK<double> exact;   // k best exactly rescored rows (key = -score)
  TopK<double> lower2;  // k largest second-digit lower bounds (each row refined at most once: distinct rows)
  std::vector<std::pair<double, int64_t>> cand;  // (second-digit upper bound, row) awaiting exact rescoring
  double cut() const {  // rows whose upper bound is below this cannot reach the top k
    const double l = -lower.threshold();
    const double e = -exact.threshold();
    return std::max(std::max(l, e), -lower2.threshold());
  }
};

constexpr int64_t kQueryChunk = 256;
constexpr int64_t kMinRowsPerThread = 2048;

// Rescore the pending rows exactly, best upper bounds first, until the bounds fall below the k-th exact score.
void flush(Selection& s, const QueryPlan& p, const double* w, const uint8_t* codes, int64_t d, uint8_t flip) {
  std::sort(s.cand.begin(), s.cand.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  for (const auto& [upper, row] : s.cand) {
    if (upper < s.cut()) break;  // sorted: no later row can enter either
    s.exact.push(-exact_score(w, codes + row * d, d, flip), row);
  }
  s.cand.clear();
  // Exact scores bound the k-th best from below too: tighten the cut for the rest of the scan.
  if (s.exact.full()) s.lower.push(s.exact.threshold() + p.slack, -1);
}

void scan(const Kernel& kern, const double* w, const std::vector<QueryPlan>& plans, int64_t q0, int64_t qn,
          const uint8_t* codes, int64_t lo, int64_t hi, int64_t d, bool signed_codes, int64_t k, Selection* sel) {
  const uint8_t flip = signed_codes ? 0x80 : 0x00;
  const int64_t tile = std::max<int64_t>(8, 24576 / std::max<int64_t>(d, 1));
  const size_t cap = static_cast<size_t>(std::max<int64_t>(256, 4 * k));
  std::vector<int32_t> dots(static_cast<size_t>(tile));
  std::vector<double> norms(static_cast<size_t>(tile));
  std::vector<int64_t> sq(static_cast<size_t>(tile));
  std::vector<int32_t> head_sums(static_cast<size_t>(tile));
  for (int64_t r0 = lo; r0 < hi; r0 += tile) {
    const int64_t rn = std::min(tile, hi - r0);
    sqnorms(codes + r0 * d, rn, d, flip, sq.data(), head_sums.data());  // ||u - 128|| of each row of the tile
    double max_norm = 0.0;
    for (int64_t r = 0; r < rn; ++r) max_norm = std::max(max_norm, norms[r] = std::sqrt(static_cast<double>(sq[r])));
    for (int64_t qi = 0; qi < qn; ++qi) {
      const QueryPlan& p = plans[q0 + qi];
      if (p.exhaustive) continue;
      const double* wq = w + (q0 + qi) * d;
      const IntQuery iq = p.first.view(), second = p.second.view();
      kern.dots(iq, codes + r0 * d, rn, d, flip, head_sums.data(), dots.data());
      Selection& s = sel[qi];
      const Digit& g = p.first;
      const double base = 128.0 * g.err_sum;
      double cut = s.cut();
      // Rows with dot < dot_cut fail even with the tile's largest error radius; as an integer, the cut is
      // ceil(dot_cut) (the cut only rises, so a row skipped under an older cut fails the newer one too).
      auto dot_cut = [&]() -> int64_t {
        const double c = std::ceil((cut - base - g.err_norm * max_norm - 2.0 * p.slack) / g.scale);
        if (!(c > static_cast<double>(INT32_MIN))) return INT32_MIN;  // also -inf and NaN: every row is tested
        return c > static_cast<double>(INT32_MAX) ? int64_t(INT32_MAX) + 1 : static_cast<int64_t>(c);
      };
      int64_t dcut = dot_cut();
      for (int64_t r = 0; r < rn; ++r) {
        if (dcut > INT32_MAX) break;  // no dot can reach the cut
        r = kern.next_at_least(dots.data(), r, rn, static_cast<int32_t>(dcut));
        if (r >= rn) break;
        const double approx = g.scale * dots[r] + base;
        const double radius = g.err_norm * norms[r] + p.slack;
        if (approx + radius < cut) continue;
        if (s.lower.push(-(approx - radius), r0 + r)) cut = s.cut(), dcut = dot_cut();
        // Second digit now, while the row is in L1 (later it would be a cache miss per row).
        int32_t dot2;
        kern.dots(second, codes + (r0 + r) * d, 1, d, flip, &head_sums[r], &dot2);
        const double approx2 = g.scale * dots[r] + p.second.scale * dot2 + 128.0 * p.second.err_sum;
        const double radius2 = p.second.err_norm * norms[r] + p.slack;
        if (s.lower2.push(-(approx2 - radius2), r0 + r)) cut = s.cut(), dcut = dot_cut();
        if (approx2 + radius2 < cut) continue;
        s.cand.emplace_back(approx2 + radius2, r0 + r);
        if (s.cand.size() >= cap) {
          flush(s, p, wq, codes, d, flip);
          cut = s.cut(), dcut = dot_cut();
        }
      }
    }
  }
  for (int64_t qi = 0; qi < qn; ++qi)
    if (!plans[q0 + qi].exhaustive) flush(sel[qi], plans[q0 + qi], w + (q0 + qi) * d, codes, d, flip);
}

// Exact scores of every row: the fallback when the bounds cannot certify k rows.
void exhaustive_topk(const double* w, const uint8_t* codes, int64_t nd, int64_t d, uint8_t flip, TopK<double>* out) {
  for (int64_t r = 0; r < nd; ++r) out->push(-exact_score(w, codes + r * d, d, flip), r);
}

}  // namespace

double int8_exact_score(const double* w, const uint8_t* row, int64_t d, bool signed_codes) {
  return exact_score(w, row, d, signed_codes ? 0x80 : 0x00);
}

void int8_score_rows(const double* w, int64_t nq, int64_t d, const uint8_t* codes, bool signed_codes,
                     const int64_t* rows, int64_t nr, double* out, int num_threads) {
  const uint8_t flip = signed_codes ? 0x80 : 0x00;
  parallel_for(0, nq, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, nr)), std::max(1, num_threads),
               [&](int64_t a, int64_t b) {
                 for (int64_t q = a; q < b; ++q)
                   for (int64_t c = 0; c < nr; ++c)
                     out[q * nr + c] = exact_score(w + q * d, codes + rows[q * nr + c] * d, d, flip);
               });
}

void float_score_rows(const double* w, int64_t nq, int64_t d, const float* vecs, const int64_t* rows, int64_t nr,
                      double* out, int num_threads) {
  parallel_for(0, nq, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, nr)), std::max(1, num_threads),
               [&](int64_t a, int64_t b) {
                 for (int64_t q = a; q < b; ++q)
                   for (int64_t c = 0; c < nr; ++c)
                     out[q * nr + c] = exact_score_f32(w + q * d, vecs + rows[q * nr + c] * d, d);
               });
}

void int8_topk(const double* w, int64_t nq, const uint8_t* codes, int64_t nd, int64_t d, bool signed_codes,
               int64_t k, double* out_score, int64_t* out_idx, int num_threads) {
  if (nq <= 0 || k <= 0) return;
  const Kernel kern = pick_kernel();
  const int threads = std::max(1, num_threads);
  std::vector<QueryPlan> plans(static_cast<size_t>(nq));
  parallel_for(0, nq, 16, threads, [&](int64_t a, int64_t b) {
    for (int64_t q = a; q < b; ++q) plan_query(w + q * d, d, kern.qmax, &plans[q]);
  });
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, nd / kMinRowsPerThread));
  auto finish = [&](int64_t q, const std::vector<const TopK<double>*>& sels) {
    int64_t found = 0;
    for (const auto* s : sels) found += s->size();
    TopK<double> all;
    if (found < k) {  // exhaustive query (or bounds that failed to certify k rows): never leave outputs unset
      all.reset(k);
      exhaustive_topk(w + q * d, codes, nd, d, signed_codes ? 0x80 : 0x00, &all);
    }
    std::vector<double> neg(static_cast<size_t>(k));
    merge_topk<double, double>(found < k ? std::vector<const TopK<double>*>{&all} : sels, k, neg.data(),
                               out_idx + q * k);
    for (int64_t i = 0; i < k; ++i) out_score[q * k + i] = -neg[i];
  };
  if (parts == 1) {  // small corpus: parallel over queries
    parallel_for(0, nq, 1, threads, [&](int64_t a, int64_t b) {
      for (int64_t q0 = a; q0 < b; q0 += kQueryChunk) {
        const int64_t qn = std::min(kQueryChunk, b - q0);
        std::vector<Selection> sel(static_cast<size_t>(qn));
        for (auto& s : sel) s.lower.reset(k), s.exact.reset(k), s.lower2.reset(k);
        scan(kern, w, plans, q0, qn, codes, 0, nd, d, signed_codes, k, sel.data());
        for (int64_t qi = 0; qi < qn; ++qi) finish(q0 + qi, {&sel[qi].exact});
      }
    });
    return;
  }
  for (int64_t q0 = 0; q0 < nq; q0 += kQueryChunk) {
    const int64_t qn = std::min(kQueryChunk, nq - q0);
    std::vector<Selection> sel(static_cast<size_t>(qn * parts));
    for (auto& s : sel) s.lower.reset(k), s.exact.reset(k), s.lower2.reset(k);
    parallel_for(0, parts, 1, threads, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t)
        scan(kern, w, plans, q0, qn, codes, nd * t / parts, nd * (t + 1) / parts, d, signed_codes, k,
             sel.data() + t * qn);
    });
    for (int64_t qi = 0; qi < qn; ++qi) {
      std::vector<const TopK<double>*> ps;
      for (int64_t t = 0; t < parts; ++t) ps.push_back(&sel[t * qn + qi].exact);
      finish(q0 + qi, ps);
    }
  }
}

}  // namespace lf
