// Unit tests of the Hamming top-k core (no torch): every SIMD level this CPU has, every code-length class
// of the fused scans (whole 32/64-byte chunks, masked tails, codes under one chunk, several byte-counter
// blocks, past the 16-bit limit), ties and duplicate documents, k == nd and k > nd, both parallel
// strategies. Run by ctest.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#define LF_GUARD_PAGES 1
#endif

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

// Documents drawn from few byte values (many equal distances) and/or repeated (whole duplicate codes):
// ties must go to the lower index.
void check_case(std::mt19937& rng, int64_t nq, int64_t nd, int64_t nb, int64_t k, bool few_values,
                bool duplicates = false) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> q(nq * nb), d(nd * nb);
  for (auto& v : q) v = static_cast<uint8_t>(byte(rng));
  for (auto& v : d) v = static_cast<uint8_t>(few_values ? (byte(rng) & 0x03) : byte(rng));  // many ties
  if (duplicates)
    for (int64_t j = 1; j < nd; ++j)
      if (byte(rng) < 96) std::copy_n(&d[(j - 1 - byte(rng) % j) * nb], nb, &d[j * nb]);
  // The largest distance (every bit differs: byte counters full, 16-bit fields at their limit) and zero.
  for (int64_t b = 0; b < nb && nd > 2; ++b) d[nd / 2 * nb + b] = static_cast<uint8_t>(~q[b]), d[2 * nb + b] = q[b];
  std::vector<int32_t> want_d;
  std::vector<int64_t> want_i;
  const int64_t kr = std::min(k, nd);
  reference(q, nq, d, nd, nb, kr, &want_d, &want_i);
  for (int threads : {1, 2, 3}) {
    // k > nd is outside hamming_topk's contract, but a selection that never fills must still come out
    // right: the first nd columns are the ranking, the rest stay untouched.
    std::vector<int32_t> got_d(nq * k, -7);
    std::vector<int64_t> got_i(nq * k, -7);
    lf::hamming_topk(q.data(), nq, d.data(), nd, nb, k, got_d.data(), got_i.data(), threads);
    bool dist_ok = true, idx_ok = true;
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t r = 0; r < k; ++r) {
        dist_ok = dist_ok && got_d[i * k + r] == (r < kr ? want_d[i * kr + r] : -7);
        idx_ok = idx_ok && got_i[i * k + r] == (r < kr ? want_i[i * kr + r] : -7);
      }
    LF_CHECK(dist_ok, "distances differ from brute force");
    LF_CHECK(idx_ok, "indices differ from brute force (ties must go to the lower index)");
    if (!dist_ok || !idx_ok) std::printf("  nb=%lld nd=%lld k=%lld threads=%d\n", static_cast<long long>(nb),
                                         static_cast<long long>(nd), static_cast<long long>(k), threads);
  }
  // The row kernel itself against the bit-by-bit distance.
  std::vector<int32_t> row(nd, -1);
  lf::hamming_row(q.data(), d.data(), nd, nb, row.data());
  bool ok = true;
  for (int64_t j = 0; j < nd; ++j) ok = ok && row[j] == ref_dist(q.data(), &d[j * nb], nb);
  LF_CHECK(ok, "hamming_row differs from bit-by-bit distance");
}

#ifdef LF_GUARD_PAGES
// n bytes flush against an inaccessible page, after it (at_end = false) or before it: a load outside them faults.
class Guarded {
 public:
  Guarded(size_t n, bool at_end) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    span_ = (n + page - 1) / page * page + 2 * page;
    base_ = static_cast<uint8_t*>(mmap(nullptr, span_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    mprotect(base_, page, PROT_NONE);
    mprotect(base_ + span_ - page, page, PROT_NONE);
    data_ = at_end ? base_ + span_ - page - n : base_ + page;
  }
  ~Guarded() { munmap(base_, span_); }
  uint8_t* data() const { return data_; }

 private:
  uint8_t *base_, *data_;
  size_t span_;
};

// The scans read no byte before the first code or after the last (lengths under one chunk, masked tails):
// queries and documents flush against an inaccessible page on either side. A stray load crashes the test.
void check_no_load_outside(std::mt19937& rng, int64_t nq, int64_t nd, int64_t nb, int64_t k) {
  std::uniform_int_distribution<int> byte(0, 255);
  for (bool at_end : {false, true}) {
    Guarded gq(nq * nb, at_end), gd(nd * nb, at_end);
    std::vector<uint8_t> q(nq * nb), d(nd * nb);
    for (auto& v : q) v = static_cast<uint8_t>(byte(rng));
    for (auto& v : d) v = static_cast<uint8_t>(byte(rng));
    std::copy(q.begin(), q.end(), gq.data());
    std::copy(d.begin(), d.end(), gd.data());
    std::vector<int32_t> want_d, got_d(nq * k);
    std::vector<int64_t> want_i, got_i(nq * k);
    reference(q, nq, d, nd, nb, k, &want_d, &want_i);
    lf::hamming_topk(gq.data(), nq, gd.data(), nd, nb, k, got_d.data(), got_i.data(), 1);
    LF_CHECK(got_d == want_d && got_i == want_i, "guarded codes: ranking differs from brute force");
    std::vector<int32_t> row(nd);
    lf::hamming_row(gq.data(), gd.data(), nd, nb, row.data());
    bool ok = true;
    for (int64_t j = 0; j < nd; ++j) ok = ok && row[j] == ref_dist(q.data(), &d[j * nb], nb);
    LF_CHECK(ok, "guarded codes: hamming_row differs from bit-by-bit distance");
  }
}
#endif

}  // namespace

int main() {
  std::mt19937 rng(7);
  const lf::Simd top = lf::simd_detected();
  for (int level = 0; level <= static_cast<int>(top); ++level) {
    lf::set_simd_cap(static_cast<lf::Simd>(level));
    std::printf("hamming kernel: %s\n", lf::hamming_kernel_name());
    // Whole chunks (32/64 bytes, the unrolled scans), masked tails, codes under one chunk, lengths of
    // common embedders (48, 96, 112, 192, 320, 448, 512 bytes), several byte-counter blocks (1100, 2000),
    // the last fused length (8191) and one past it (row path).
    for (int64_t nb : {1, 2, 7, 8, 13, 16, 31, 32, 33, 48, 63, 64, 65, 96, 100, 112, 128, 160, 192, 256, 260, 320,
                       384, 448, 512, 520, 1100, 2000}) {
      check_case(rng, 3, 37, nb, 5, false);
      check_case(rng, 2, 37, nb, 37, true);        // k == nd, heavy ties
      check_case(rng, 2, 45, nb, 50, true, true);  // k > nd, duplicate documents
      check_case(rng, 2, 8, nb, 3, false, true);   // exactly one group of 8
    }
    for (int64_t nb : {8191, 8192}) check_case(rng, 2, 19, nb, 4, false);
#ifdef LF_GUARD_PAGES
    for (int64_t nb : {1, 3, 16, 31, 33, 48, 63, 65, 100, 520})
      for (int64_t nd : {1, 5, 8, 13, 40}) check_no_load_outside(rng, 2, nd, nb, std::min<int64_t>(nd, 3));
#endif
    check_case(rng, 5, 9000, 128, 10, true);   // split over documents
    check_case(rng, 4, 9001, 48, 3, false);
    check_case(rng, 3, 5003, 32, 7, true);     // fused 8-document scan: ties across groups, tail
    check_case(rng, 2, 4099, 256, 12, true);
    for (int64_t nb : {1, 16, 112, 520}) check_case(rng, 2, 8195, nb, 9, true, true);  // split, duplicates
  }
  return lf_test::finish("test_hamming");
}
