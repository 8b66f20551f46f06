// Exact top-k by inner product over 8-bit codes.
#pragma once
#include <cstdint>

namespace lf {

// w [nq, d] float64 weights (the query with the per-dimension steps folded in), codes [nd, d] bytes read as
// u = byte (uint8 codes) or u = byte ^ 0x80 (int8 codes, signed_codes). For each query, writes the k largest
// scores sum_j w[j] * u[j] (computed in float64) in descending order, ties by lower row, to
// out_score [nq, k] / out_idx [nq, k]. Requires 1 <= k <= nd and d <= 65536.
//
// Two stages, exact by construction: the query is rounded to small integers a ~ w / s, an integer dot
// a . u over every row (SIMD) gives an approximate score with a per-row error bound ||w - s a|| * ||u - 128||
// (Cauchy-Schwarz); rows whose upper bound falls below the k-th best lower bound are rejected, the rest are
// rescored exactly in float64.
void int8_topk(const double* w, int64_t nq, const uint8_t* codes, int64_t nd, int64_t d, bool signed_codes,
               int64_t k, double* out_score, int64_t* out_idx, int num_threads);

// Exact float64 score of one row (the rescoring step; exposed for tests).
double int8_exact_score(const double* w, const uint8_t* row, int64_t d, bool signed_codes);

// Exact float64 scores of chosen rows: out[q, c] = sum_j w[q, j] * x[rows[q, c], j], x the codes read as above
// (int8_score_rows) or float32 vectors (float_score_rows), rows [nq, nr] valid row indices. Every score uses
// the same fixed summation order as int8_exact_score, whatever the row's position or nr: equal rows score
// bitwise equal.
void int8_score_rows(const double* w, int64_t nq, int64_t d, const uint8_t* codes, bool signed_codes,
                     const int64_t* rows, int64_t nr, double* out, int num_threads);
void float_score_rows(const double* w, int64_t nq, int64_t d, const float* vecs, const int64_t* rows, int64_t nr,
                      double* out, int num_threads);

}  // namespace lf
