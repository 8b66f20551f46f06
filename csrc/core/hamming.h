// Exact Hamming-distance top-k over packed binary codes (numpy.packbits layout, any byte length).
#pragma once
#include <cstdint>

namespace lf {

// queries [nq, nbytes] and docs [nd, nbytes], both contiguous. For each query, writes the k smallest
// distances in ascending order to out_dist [nq, k] and their document rows to out_idx [nq, k]; equal
// distances are ordered by lower row. Requires 1 <= k <= nd. Parallel over documents (one query uses
// every thread) or over queries when the corpus is small.
void hamming_topk(const uint8_t* queries, int64_t nq, const uint8_t* docs, int64_t nd, int64_t nbytes,
                  int64_t k, int32_t* out_dist, int64_t* out_idx, int num_threads);

// Distances of one query to nd consecutive docs (the dispatched kernel; exposed for tests/benchmarks).
void hamming_row(const uint8_t* query, const uint8_t* docs, int64_t nd, int64_t nbytes, int32_t* out);

}  // namespace lf
