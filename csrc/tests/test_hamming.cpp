// Unit tests of the Hamming top-k core (no torch): every SIMD level this CPU has, odd code lengths,
// ties, k == nd, both parallel strategies. Run by ctest.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "../core/hamming.h"
#include "../core/simd.h"
#include "test_util.h"

namespace {

int ref_dist(const uint8_t* a, const uint8_t* b, int64_t nb) {
  int s = 0;
  for (int64_t i = 0; i < nb; ++i)
    for (int bit = 0; bit < 8; ++bit) s += ((a[i] ^ b[i]) >> bit) & 1;
  return s;
}

// Brute force: sort (distance, index) pairs, keep k.
void reference(const std::vector<uint8_t>& q, int64_t nq, const std::vector<uint8_t>& d, int64_t nd,
               int64_t nb, int64_t k, std::vector<int32_t>* dist, std::vector<int64_t>* idx) {
  dist->assign(nq * k, 0);
  idx->assign(nq * k, 0);
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<std::pair<int, int64_t>> all(nd);
    for (int64_t j = 0; j < nd; ++j) all[j] = {ref_dist(&q[i * nb], &d[j * nb], nb), j};
    std::sort(all.begin(), all.end());
    for (int64_t r = 0; r < k; ++r) {
      (*dist)[i * k + r] = all[r].first;
      (*idx)[i * k + r] = all[r].second;
    }
  }
}

void check_case(std::mt19937& rng, int64_t nq, int64_t nd, int64_t nb, int64_t k, bool few_values) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> q(nq * nb), d(nd * nb);
  for (auto& v : q) v = static_cast<uint8_t>(byte(rng));
  for (auto& v : d) v = static_cast<uint8_t>(few_values ? (byte(rng) & 0x03) : byte(rng));  // many ties
  std::vector<int32_t> want_d;
  std::vector<int64_t> want_i;
  reference(q, nq, d, nd, nb, k, &want_d, &want_i);
  for (int threads : {1, 2, 3}) {
    std::vector<int32_t> got_d(nq * k, -7);
    std::vector<int64_t> got_i(nq * k, -7);
    lf::hamming_topk(q.data(), nq, d.data(), nd, nb, k, got_d.data(), got_i.data(), threads);
    LF_CHECK(got_d == want_d, "distances differ from brute force");
    LF_CHECK(got_i == want_i, "indices differ from brute force (ties must go to the lower index)");
  }
  // The row kernel itself against the bit-by-bit distance.
  std::vector<int32_t> row(nd, -1);
  lf::hamming_row(q.data(), d.data(), nd, nb, row.data());
  bool ok = true;
  for (int64_t j = 0; j < nd; ++j) ok = ok && row[j] == ref_dist(q.data(), &d[j * nb], nb);
  LF_CHECK(ok, "hamming_row differs from bit-by-bit distance");
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const lf::Simd top = lf::simd_detected();
  for (int level = 0; level <= static_cast<int>(top); ++level) {
    lf::set_simd_cap(static_cast<lf::Simd>(level));
    std::printf("hamming kernel: %s\n", lf::hamming_kernel_name());
    for (int64_t nb : {1, 2, 7, 8, 13, 32, 48, 64, 96, 100, 128, 192, 256, 260, 1100}) {
      check_case(rng, 3, 37, nb, 5, false);
      check_case(rng, 2, 37, nb, 37, true);   // k == nd, heavy ties
    }
    check_case(rng, 5, 9000, 128, 10, true);   // split over documents
    check_case(rng, 4, 9001, 48, 3, false);
    check_case(rng, 3, 5003, 32, 7, true);     // fused 8-document scan: ties across groups, tail
    check_case(rng, 2, 4099, 256, 12, true);
  }
  return lf_test::finish("test_hamming");
}
