#include "hamming.h"

#include <algorithm>
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

// ---------------------------------------------------------------- scalar (portable) kernel
inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

inline int32_t hamming_scalar(const uint8_t* a, const uint8_t* b, int64_t nbytes) {
  int64_t s = 0, i = 0;
  for (; i + 8 <= nbytes; i += 8) s += __builtin_popcountll(load64(a + i) ^ load64(b + i));
  for (; i < nbytes; ++i) s += __builtin_popcount(static_cast<unsigned>(a[i] ^ b[i]));
  return static_cast<int32_t>(s);
}

// A fused scan: (query, documents [j0, j0 + nd), nbytes) -> the selection.
using ScanFn = void (*)(const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, TopK<int32_t>&);

void row_scalar(const uint8_t* q, const uint8_t* d, int64_t nd, int64_t nbytes, int32_t* out) {
  for (int64_t j = 0; j < nd; ++j) out[j] = hamming_scalar(q, d + j * nbytes, nbytes);
}

#ifdef LF_X86
// ---------------------------------------------------------------- AVX2: nibble-LUT popcount (pshufb)
#define LF_AVX2 __attribute__((target("avx2,popcnt")))

LF_AVX2 inline __m256i popcount_bytes(__m256i x) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(x, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

LF_AVX2 inline int32_t tail_popcnt(const uint8_t* a, const uint8_t* b, int64_t from, int64_t nbytes) {
  int64_t s = 0, i = from;
  for (; i + 8 <= nbytes; i += 8) s += _mm_popcnt_u64(load64(a + i) ^ load64(b + i));
  for (; i < nbytes; ++i) s += _mm_popcnt_u32(static_cast<unsigned>(a[i] ^ b[i]));
  return static_cast<int32_t>(s);
}

// Per 64-bit lane byte-count sums (<= 64 * NC each) of the XOR of one document's NC 32-byte chunks with the
// query held in registers.
template <int NC>
LF_AVX2 inline __m256i lane_counts_fixed(const uint8_t* p, const __m256i* qv, __m256i zero) {
  __m256i acc = popcount_bytes(_mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), qv[0]));
  for (int c = 1; c < NC; ++c)
    acc = _mm256_add_epi8(acc, popcount_bytes(_mm256_xor_si256(
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c)), qv[c])));
  return _mm256_sad_epu8(acc, zero);
}

// Codes of exactly NC 32-byte chunks: the query lives in registers, four documents per step, their four
// byte-count vectors are summed per 64-bit lane (sad) and packed 16 bits apart so one horizontal sum
// yields four distances.
template <int NC>
LF_AVX2 void row_avx2_fixed(const uint8_t* q, const uint8_t* d, int64_t nd, int32_t* out) {
  constexpr int64_t NB = NC * 32;
  __m256i qv[NC];
  for (int c = 0; c < NC; ++c) qv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c));
  const __m256i zero = _mm256_setzero_si256();
  auto lane_counts = [&](const uint8_t* p) LF_AVX2 { return lane_counts_fixed<NC>(p, qv, zero); };
  int64_t j = 0;
  for (; j + 4 <= nd; j += 4) {
    const uint8_t* p = d + j * NB;
    const __m256i s0 = lane_counts(p), s1 = lane_counts(p + NB), s2 = lane_counts(p + 2 * NB),
                  s3 = lane_counts(p + 3 * NB);
    const __m256i packed = _mm256_or_si256(_mm256_or_si256(s0, _mm256_slli_epi64(s1, 16)),
                                           _mm256_or_si256(_mm256_slli_epi64(s2, 32), _mm256_slli_epi64(s3, 48)));
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(packed), _mm256_extracti128_si256(packed, 1));
    t = _mm_add_epi64(t, _mm_unpackhi_epi64(t, t));
    const uint64_t v = static_cast<uint64_t>(_mm_cvtsi128_si64(t));  // 4 x 16-bit sums (each <= 256 * NC)
    out[j] = static_cast<int32_t>(v & 0xffff);
    out[j + 1] = static_cast<int32_t>((v >> 16) & 0xffff);
    out[j + 2] = static_cast<int32_t>((v >> 32) & 0xffff);
    out[j + 3] = static_cast<int32_t>(v >> 48);
  }
  for (; j < nd; ++j) {
    const __m256i s = lane_counts(d + j * NB);
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi64(t, _mm_unpackhi_epi64(t, t));
    out[j] = static_cast<int32_t>(_mm_cvtsi128_si64(t));
  }
}

// Any length: 32-byte chunks through the LUT (byte counters flushed every 31 chunks), the rest by popcnt.
LF_AVX2 void row_avx2_generic(const uint8_t* q, const uint8_t* d, int64_t nd, int64_t nbytes, int32_t* out) {
  const int64_t nc = nbytes / 32;
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j = 0; j < nd; ++j) {
    const uint8_t* p = d + j * nbytes;
    __m256i total = zero;
    for (int64_t c0 = 0; c0 < nc; c0 += 31) {
      const int64_t c1 = std::min(nc, c0 + 31);
      __m256i acc = zero;
      for (int64_t c = c0; c < c1; ++c)
        acc = _mm256_add_epi8(acc, popcount_bytes(_mm256_xor_si256(
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * c)),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * c)))));
      total = _mm256_add_epi64(total, _mm256_sad_epu8(acc, zero));
    }
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    t = _mm_add_epi64(t, _mm_unpackhi_epi64(t, t));
    out[j] = static_cast<int32_t>(_mm_cvtsi128_si64(t)) + tail_popcnt(q, p, nc * 32, nbytes);
  }
}

LF_AVX2 void row_avx2(const uint8_t* q, const uint8_t* d, int64_t nd, int64_t nbytes, int32_t* out) {
  switch (nbytes) {
    case 32: return row_avx2_fixed<1>(q, d, nd, out);
    case 64: return row_avx2_fixed<2>(q, d, nd, out);
    case 96: return row_avx2_fixed<3>(q, d, nd, out);
    case 128: return row_avx2_fixed<4>(q, d, nd, out);
    case 192: return row_avx2_fixed<6>(q, d, nd, out);
    case 256: return row_avx2_fixed<8>(q, d, nd, out);
    default: return row_avx2_generic(q, d, nd, nbytes, out);
  }
}

// Four per-lane count vectors (values < 2^16) -> one vector of 16-bit fields, s0 lowest.
LF_AVX2 inline __m256i pack4(__m256i s0, __m256i s1, __m256i s2, __m256i s3) {
  return _mm256_or_si256(_mm256_or_si256(s0, _mm256_slli_epi64(s1, 16)),
                         _mm256_or_si256(_mm256_slli_epi64(s2, 32), _mm256_slli_epi64(s3, 48)));
}

// Offers 8 documents' distances (first id ``base``) to the selection: one compare with the current k-th
// distance, so only documents that beat it reach the scalar heap. Shared by the AVX2 and AVX-512 scans.
// Always inlined (as select1): GCC kept it out of line in the AVX-512 scan, and a call per 8 documents made
// that scan ~40% slower (1M x 1024-bit codes, 1000 queries: 0.68 s inlined, 0.94 s not).
LF_AVX2 __attribute__((always_inline)) inline void select8(__m256i dist, int64_t base, TopK<int32_t>& h,
                                                           int32_t& thr, __m256i& thrv) {
  const unsigned m =
      static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(thrv, dist))));
  if (!m) return;
  alignas(32) int32_t dv[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(dv), dist);
  for (unsigned mm = m; mm; mm &= mm - 1) {
    const int i = __builtin_ctz(mm);
    if (dv[i] < thr) {
      h.push_scan(dv[i], base + i);
      thr = h.threshold();
    }
  }
  thrv = _mm256_set1_epi32(thr);
}

// Offers one document (its distance as four int64 lane counts) to the selection.
LF_AVX2 __attribute__((always_inline)) inline void select1(__m256i lanes, int64_t id, TopK<int32_t>& h,
                                                           int32_t& thr) {
  __m128i t = _mm_add_epi64(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
  t = _mm_add_epi64(t, _mm_unpackhi_epi64(t, t));
  const int32_t dj = static_cast<int32_t>(_mm_cvtsi128_si64(t));
  if (dj < thr) {
    h.push_scan(dj, id);
    thr = h.threshold();
  }
}

// Eight documents' lane counts packed as 16-bit fields (a: documents 0-3, b: 4-7; every field a partial sum
// of one distance) -> their eight distances as int32, document 0 lowest.
LF_AVX2 __attribute__((always_inline)) inline __m256i distances8(__m256i a, __m256i b) {
  const __m256i ab = _mm256_add_epi64(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
  return _mm256_cvtepu16_epi32(_mm_add_epi64(_mm256_castsi256_si128(ab), _mm256_extracti128_si256(ab, 1)));
}

// The fused scans pack distances as 16-bit fields: codes up to 8191 bytes (65528 bits); longer ones take the row
// kernels.
constexpr int64_t kMaxFusedBytes = 65535 / 8;

// The query as the AVX2 scan reads codes: nc whole 32-byte chunks, then, when the length is not a multiple of 32,
// a tail read as the code's last 32 bytes (a load inside the document, unlike one past the end) with the bytes
// before the tail masked off.
struct Avx2Query {
  const uint8_t* q;
  int64_t nc;
  bool tail;
  __m256i last, mask;  // the query's tail where a last-32-byte window holds it, zero before; 0xff on the tail
};

LF_AVX2 __attribute__((always_inline)) inline Avx2Query avx2_query(const uint8_t* q, int64_t nbytes) {
  const int64_t rem = nbytes % 32;
  alignas(32) uint8_t last[32] = {};
  std::memcpy(last + 32 - rem, q + nbytes - rem, static_cast<size_t>(rem));
  const __m256i pos = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                       22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  return {q, nbytes / 32, rem != 0, _mm256_load_si256(reinterpret_cast<const __m256i*>(last)),
          _mm256_cmpgt_epi8(pos, _mm256_set1_epi8(static_cast<char>(31 - rem)))};
}

LF_AVX2 inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// lanes[i] = the bit counts (4 x int64) of document i < G against the query: documents `stride` bytes apart from
// p, their last-32-byte windows from tail. NC >= 0: codes of exactly NC whole chunks (unrolled), NC < 0: any. The
// byte counters gain at most 8 per chunk, so they are summed (sad) every 31 chunks.
template <int NC, int G>
LF_AVX2 __attribute__((always_inline)) inline void lanes_avx2(const Avx2Query& qs, const uint8_t* p,
                                                              const uint8_t* tail, int64_t stride, __m256i* lanes) {
  const int64_t nc = NC >= 0 ? NC : qs.nc;
  const __m256i zero = _mm256_setzero_si256();
  for (int i = 0; i < G; ++i) lanes[i] = zero;
  for (int64_t c0 = 0; c0 < nc + qs.tail; c0 += 31) {
    __m256i acc[G];
    for (int i = 0; i < G; ++i) acc[i] = zero;
    for (int64_t c = c0; c < std::min(nc, c0 + 31); ++c) {
      const __m256i qc = load256(qs.q + 32 * c);
      for (int i = 0; i < G; ++i)
        acc[i] = _mm256_add_epi8(acc[i], popcount_bytes(_mm256_xor_si256(load256(p + i * stride + 32 * c), qc)));
    }
    if (qs.tail && nc < c0 + 31)  // the tail is this block's last chunk
      for (int i = 0; i < G; ++i)
        acc[i] = _mm256_add_epi8(acc[i], popcount_bytes(_mm256_and_si256(
                                             _mm256_xor_si256(load256(tail + i * stride), qs.last), qs.mask)));
    for (int i = 0; i < G; ++i) lanes[i] = _mm256_add_epi64(lanes[i], _mm256_sad_epu8(acc[i], zero));
  }
}

// Fused scan, groups of 8 documents: their 8 distances are formed as 16-bit fields of one register, widened to
// int32 and compared with the current k-th distance in one vpcmpgtd + movemask (select8), so only documents that
// beat it reach the scalar selection (no distance buffer round trip). NC as lanes_avx2; EXACT: the code is exactly
// NC chunks (a compile-time stride and no tail).
template <int NC, bool EXACT>
LF_AVX2 void scan_avx2_fused(const uint8_t* q, const uint8_t* d, int64_t j0, int64_t nd, int64_t length,
                             TopK<int32_t>& h) {
  const int64_t nbytes = EXACT ? 32 * NC : length;
  // Codes of exactly 1-8 chunks: the query stays in registers and each document is counted on its own (as the
  // row kernel; 5-15% faster there than chunk by chunk over 4 documents, Zen 4).
  constexpr bool kQueryInRegs = EXACT && NC >= 1 && NC <= 8;
  const Avx2Query qs = avx2_query(q, nbytes);
  const __m256i zero = _mm256_setzero_si256();
  __m256i qv[kQueryInRegs ? NC : 1];
  for (int c = 0; c < (kQueryInRegs ? NC : 0); ++c) qv[c] = load256(q + 32 * c);
  int32_t thr = h.threshold();
  __m256i thrv = _mm256_set1_epi32(thr);
  // One document; codes under 32 bytes: the first documents' windows would start before d, so they read a copy.
  auto one = [&](int64_t j) LF_AVX2 {
    const uint8_t* p = d + j * nbytes;
    const uint8_t* tail = p + nbytes - 32;
    alignas(32) uint8_t copy[32] = {};
    if ((j + 1) * nbytes < 32) {
      std::memcpy(copy + 32 - nbytes, p, static_cast<size_t>(nbytes));
      tail = copy;
    }
    __m256i lanes[1];
    lanes_avx2<NC, 1>(qs, p, tail, nbytes, lanes);
    select1(lanes[0], j0 + j, h, thr);
  };
  int64_t j = 0;
  for (; j < nd && (j + 1) * nbytes < 32; ++j) one(j);
  for (; j + 8 <= nd; j += 8) {
    const uint8_t* p = d + j * nbytes;
    __m256i s[8];
    if constexpr (kQueryInRegs) {
#pragma GCC unroll 8  // else GCC keeps the 8 counts in memory
      for (int i = 0; i < 8; ++i) s[i] = lane_counts_fixed<NC>(p + i * nbytes, qv, zero);
    } else {  // in two halves: 8 documents' byte counters at once spill (16 ymm registers), ~20-40% slower
      lanes_avx2<NC, 4>(qs, p, p + nbytes - 32, nbytes, s);
      lanes_avx2<NC, 4>(qs, p + 4 * nbytes, p + 5 * nbytes - 32, nbytes, s + 4);
    }
    select8(distances8(pack4(s[0], s[1], s[2], s[3]), pack4(s[4], s[5], s[6], s[7])), j0 + j, h, thr, thrv);
  }
  for (; j < nd; ++j) one(j);
}

// The AVX2 scan for this length: unrolled for up to 16 whole chunks (543 bytes; Zen 4: 10-35% less time than the
// loop form on codes of 16-448 bytes), the loop form beyond. Picked once per search, not per call (a call scans
// one 16 KiB tile of documents).
ScanFn avx2_scan_for(int64_t nbytes) {
  switch (nbytes / 32) {
    case 0: return scan_avx2_fused<0, false>;
#define LF_CASE(n) \
  case n: return nbytes % 32 ? scan_avx2_fused<n, false> : scan_avx2_fused<n, true>;
    LF_CASE(1) LF_CASE(2) LF_CASE(3) LF_CASE(4) LF_CASE(5) LF_CASE(6) LF_CASE(7) LF_CASE(8)
    LF_CASE(9) LF_CASE(10) LF_CASE(11) LF_CASE(12) LF_CASE(13) LF_CASE(14) LF_CASE(15) LF_CASE(16)
#undef LF_CASE
    default: return scan_avx2_fused<-1, false>;
  }
}

// ---------------------------------------------------------------- AVX-512 VPOPCNTDQ
#define LF_AVX512 __attribute__((target("avx2,popcnt,avx512f,avx512bw,avx512vpopcntdq")))

LF_AVX512 void row_avx512(const uint8_t* q, const uint8_t* d, int64_t nd, int64_t nbytes, int32_t* out) {
  const int64_t nfull = nbytes / 64;
  const int64_t rem = nbytes - nfull * 64;
  const __mmask64 tail = rem ? (~0ULL >> (64 - rem)) : 0;
  for (int64_t j = 0; j < nd; ++j) {
    const uint8_t* p = d + j * nbytes;
    __m512i acc = _mm512_setzero_si512();
    for (int64_t c = 0; c < nfull; ++c)
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(p + 64 * c),
                                                                         _mm512_loadu_si512(q + 64 * c))));
    if (rem)
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_xor_si512(
                                      _mm512_maskz_loadu_epi8(tail, p + 64 * nfull),
                                      _mm512_maskz_loadu_epi8(tail, q + 64 * nfull))));
    alignas(64) int64_t lanes[8];
    _mm512_store_si512(lanes, acc);
    out[j] = static_cast<int32_t>(lanes[0] + lanes[1] + lanes[2] + lanes[3] + lanes[4] + lanes[5] + lanes[6] + lanes[7]);
  }
}

// 512-bit lanes folded to 256 (the halves by memcpy, compiled to register moves: GCC 12's 512-bit extract
// intrinsics warn -Wmaybe-uninitialized).
LF_AVX512 inline __m256i fold512_epi64(__m512i v) {
  __m256i lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  return _mm256_add_epi64(lo, hi);
}

// Four documents' lane counts in the 16-bit fields of each lane (every field a partial sum of one distance,
// so < 2^16 for codes up to kMaxFusedBytes).
LF_AVX512 inline __m512i pack4_512(__m512i s0, __m512i s1, __m512i s2, __m512i s3) {
  return _mm512_or_si512(_mm512_or_si512(s0, _mm512_slli_epi64(s1, 16)),
                         _mm512_or_si512(_mm512_slli_epi64(s2, 32), _mm512_slli_epi64(s3, 48)));
}

// lanes[i] = the bit counts (8 x int64) of document i < G against the query, documents `stride` bytes apart from
// p: whole 64-byte chunks, then the rest of the code by a masked load (it reads nothing outside the mask, so no
// load leaves the document). NC >= 0: codes of exactly NC whole chunks (unrolled), NC < 0: any.
template <int NC, int G>
LF_AVX512 __attribute__((always_inline)) inline void lanes_avx512(const uint8_t* q, int64_t nbytes, const uint8_t* p,
                                                                  int64_t stride, __m512i* lanes) {
  const int64_t nc = NC >= 0 ? NC : nbytes / 64, rem = nbytes - 64 * nc;
  for (int i = 0; i < G; ++i) lanes[i] = _mm512_setzero_si512();
  for (int64_t c = 0; c < nc; ++c) {
    const __m512i qc = _mm512_loadu_si512(q + 64 * c);
    for (int i = 0; i < G; ++i)
      lanes[i] = _mm512_add_epi64(
          lanes[i], _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(p + i * stride + 64 * c), qc)));
  }
  if (rem) {
    const __mmask64 m = ~0ULL >> (64 - rem);
    const __m512i qt = _mm512_maskz_loadu_epi8(m, q + 64 * nc);
    for (int i = 0; i < G; ++i)
      lanes[i] = _mm512_add_epi64(
          lanes[i], _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_maskz_loadu_epi8(m, p + i * stride + 64 * nc), qt)));
  }
}

// Fused scan, groups of 8 documents, as scan_avx2_fused: the 8 distances are formed in one register and compared
// with the current k-th distance at once, so only documents that beat it reach the scalar selection. (Zen 4
// measured: the row kernel, one lane store and eight scalar adds per document plus a distance buffer, ran slower
// than the AVX2 fused scan.) NC as lanes_avx512; EXACT: the code is exactly NC chunks (a compile-time stride: the
// scan of 64-256-byte codes ran 5-15% slower with the stride a variable, GCC spilled the 8 document offsets).
template <int NC, bool EXACT>
LF_AVX512 void scan_avx512_fused(const uint8_t* q, const uint8_t* d, int64_t j0, int64_t nd, int64_t length,
                                 TopK<int32_t>& h) {
  const int64_t nbytes = EXACT ? 64 * NC : length;
  int32_t thr = h.threshold();
  __m256i thrv = _mm256_set1_epi32(thr);
  int64_t j = 0;
  for (; j + 8 <= nd; j += 8) {
    __m512i s[8];
    lanes_avx512<NC, 8>(q, nbytes, d + j * nbytes, nbytes, s);
    const __m256i a = fold512_epi64(pack4_512(s[0], s[1], s[2], s[3]));
    const __m256i b = fold512_epi64(pack4_512(s[4], s[5], s[6], s[7]));
    select8(distances8(a, b), j0 + j, h, thr, thrv);  // distances of documents j .. j + 7
  }
  for (; j < nd; ++j) {
    __m512i s[1];
    lanes_avx512<NC, 1>(q, nbytes, d + j * nbytes, nbytes, s);
    select1(fold512_epi64(s[0]), j0 + j, h, thr);
  }
}

// The AVX-512 scan for this length: unrolled for up to 8 whole chunks (575 bytes), the loop form beyond.
ScanFn avx512_scan_for(int64_t nbytes) {
  switch (nbytes / 64) {
    case 0: return scan_avx512_fused<0, false>;
#define LF_CASE(n) \
  case n: return nbytes % 64 ? scan_avx512_fused<n, false> : scan_avx512_fused<n, true>;
    LF_CASE(1) LF_CASE(2) LF_CASE(3) LF_CASE(4) LF_CASE(5) LF_CASE(6) LF_CASE(7) LF_CASE(8)
#undef LF_CASE
    default: return scan_avx512_fused<-1, false>;
  }
}
#endif  // LF_X86

using RowFn = void (*)(const uint8_t*, const uint8_t*, int64_t, int64_t, int32_t*);

RowFn pick_row() {
#ifdef LF_X86
  switch (simd_active()) {
    case Simd::AVX512: return row_avx512;
    case Simd::AVX2: return row_avx2;
    default: break;
  }
#endif
  return row_scalar;
}

// The fused scan for this code length, or nullptr (scalar level, codes over kMaxFusedBytes): the row path.
ScanFn pick_scan(int64_t nbytes) {
#ifdef LF_X86
  if (nbytes > kMaxFusedBytes) return nullptr;
  switch (simd_active()) {
    case Simd::AVX512: return avx512_scan_for(nbytes);
    case Simd::AVX2: return avx2_scan_for(nbytes);
    default: break;
  }
#endif
  (void)nbytes;
  return nullptr;
}

// Document tile streamed against a chunk of queries: 16 KiB of 128-byte codes stays in L1.
int64_t doc_tile(int64_t nbytes) { return std::max<int64_t>(16, 16384 / std::max<int64_t>(nbytes, 1)); }
constexpr int64_t kQueryChunk = 1024;   // queries whose selections are live at once
constexpr int64_t kMinDocsPerThread = 4096;

// Scan docs [lo, hi) for queries [q0, q0 + qn), feeding selections sel[qi]: by the fused scan when there
// is one, else row kernel + distance buffer.
void scan(RowFn row, ScanFn fused, const uint8_t* queries, int64_t q0, int64_t qn, const uint8_t* docs, int64_t lo,
          int64_t hi, int64_t nbytes, TopK<int32_t>* sel) {
  const int64_t tile = doc_tile(nbytes);
  std::vector<int32_t> buf(fused ? 0 : static_cast<size_t>(tile));
  for (int64_t j0 = lo; j0 < hi; j0 += tile) {
    const int64_t jn = std::min(tile, hi - j0);
    if (fused) {
      for (int64_t qi = 0; qi < qn; ++qi)
        fused(queries + (q0 + qi) * nbytes, docs + j0 * nbytes, j0, jn, nbytes, sel[qi]);
      continue;
    }
    for (int64_t qi = 0; qi < qn; ++qi) {
      row(queries + (q0 + qi) * nbytes, docs + j0 * nbytes, jn, nbytes, buf.data());
      TopK<int32_t>& h = sel[qi];
      int32_t thr = h.threshold();
      for (int64_t jj = 0; jj < jn; ++jj) {
        if (buf[jj] < thr) {
          h.push_scan(buf[jj], j0 + jj);
          thr = h.threshold();
        }
      }
    }
  }
}

}  // namespace

void hamming_row(const uint8_t* query, const uint8_t* docs, int64_t nd, int64_t nbytes, int32_t* out) {
  pick_row()(query, docs, nd, nbytes, out);
}

void hamming_topk(const uint8_t* queries, int64_t nq, const uint8_t* docs, int64_t nd, int64_t nbytes,
                  int64_t k, int32_t* out_dist, int64_t* out_idx, int num_threads) {
  if (nq <= 0 || k <= 0) return;
  const RowFn row = pick_row();
  const ScanFn fused = pick_scan(nbytes);
  const int threads = std::max(1, num_threads);
  const int64_t doc_parts = std::max<int64_t>(1, std::min<int64_t>(threads, nd / kMinDocsPerThread));

  if (doc_parts == 1) {
    // Small corpus: parallel over queries, each thread scans every document.
    parallel_for(0, nq, 1, threads, [&](int64_t a, int64_t b) {
      for (int64_t q0 = a; q0 < b; q0 += kQueryChunk) {
        const int64_t qn = std::min(kQueryChunk, b - q0);
        std::vector<TopK<int32_t>> sel(static_cast<size_t>(qn), TopK<int32_t>(k));
        scan(row, fused, queries, q0, qn, docs, 0, nd, nbytes, sel.data());
        for (int64_t qi = 0; qi < qn; ++qi)
          merge_topk<int32_t, int32_t>({&sel[qi]}, k, out_dist + (q0 + qi) * k, out_idx + (q0 + qi) * k);
      }
    });
    return;
  }

  // Large corpus: every thread scans its own slice of the documents for a chunk of queries, then the
  // per-slice selections are merged per query.
  for (int64_t q0 = 0; q0 < nq; q0 += kQueryChunk) {
    const int64_t qn = std::min(kQueryChunk, nq - q0);
    std::vector<TopK<int32_t>> sel(static_cast<size_t>(qn * doc_parts), TopK<int32_t>(k));
    parallel_for(0, doc_parts, 1, threads, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) {
        const int64_t lo = nd * t / doc_parts, hi = nd * (t + 1) / doc_parts;
        scan(row, fused, queries, q0, qn, docs, lo, hi, nbytes, sel.data() + t * qn);
      }
    });
    parallel_for(0, qn, 64, threads, [&](int64_t a, int64_t b) {
      std::vector<const TopK<int32_t>*> parts(static_cast<size_t>(doc_parts));
      for (int64_t qi = a; qi < b; ++qi) {
        for (int64_t t = 0; t < doc_parts; ++t) parts[t] = &sel[t * qn + qi];
        merge_topk<int32_t, int32_t>(parts, k, out_dist + (q0 + qi) * k, out_idx + (q0 + qi) * k);
      }
    });
  }
}

}  // namespace lf
