#include "pack_bits.h"

#include "parallel.h"

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

}  // namespace

void pack_bits(const void* x, FloatKind kind, int64_t n, int64_t d, int64_t row_stride, uint8_t* out,
               int num_threads) {
  const int64_t nb = packed_bytes(d);
  // ~16 KiB of input per task keeps the fork cost negligible.
  const int64_t grain = d > 0 ? (16384 / d) + 1 : n;
  parallel_for(0, n, grain, num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* o = out + r * nb;
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
