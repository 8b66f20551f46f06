// Sign-bit packing of embeddings: bit set where x > 0, first dimension in the most significant
// bit of the first byte, zero padding when D % 8 != 0 (identical to numpy.packbits(x > 0, axis=-1)).
#pragma once
#include <cstdint>

namespace lf {

enum class FloatKind { F32, F64, F16, BF16 };

// x: n rows of d elements of `kind`, row i starting at x + i * row_stride elements (element stride 1).
// out: n rows of (d + 7) / 8 bytes, contiguous. NaN packs as 0 (NaN > 0 is false).
void pack_bits(const void* x, FloatKind kind, int64_t n, int64_t d, int64_t row_stride, uint8_t* out,
               int num_threads);

inline int64_t packed_bytes(int64_t d) { return (d + 7) / 8; }

}  // namespace lf
