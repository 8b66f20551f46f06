// Scalar (int8/uint8) quantization of embeddings, bit-exact with sentence-transformers'
// quantize_embeddings: code = clip(floor((x - start) / step), 0, 255) computed in the compute precision,
// int8 = code - 128. The caller computes starts/steps (steps with 0 replaced by 1) in that precision.
#pragma once
#include <cstdint>

#include "pack_bits.h"

namespace lf {

// Precision the arithmetic is carried out in (numpy's promotion of the embeddings with the ranges).
// F16 rounds every intermediate to half precision, as numpy's float16 arithmetic does.
enum class ComputeKind { F16, F32, F64 };

// x: n rows of d elements of `xkind` (row i at x + i * row_stride elements). starts/steps: d values,
// float for F16/F32 (F16 values must be exactly representable in half), double for F64.
// out: n * d bytes, contiguous; uint8 codes, or int8 codes (code - 128) when signed_out.
// NaN inputs give code 0 (numpy leaves them undefined).
void quantize_scalar(const void* x, FloatKind xkind, int64_t n, int64_t d, int64_t row_stride, const void* starts,
                     const void* steps, ComputeKind ck, bool signed_out, uint8_t* out, int num_threads);

// Round a float to the nearest half-precision value (ties to even), returned as float.
float round_to_half(float f);

}  // namespace lf
