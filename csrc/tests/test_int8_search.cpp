// Unit tests of the exact int8 top-k core (no torch): the two-stage search must return exactly the
// brute-force float64 ranking at every SIMD level, for odd dims, both code kinds, heavy ties, k == nd.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../core/int8_search.h"
#include "../core/simd.h"
#include "test_util.h"

namespace {

// int8_topk with 1, 2 and 3 threads against the brute-force float64 ranking.
void compare(const std::vector<double>& w, const std::vector<uint8_t>& codes, int64_t nq, int64_t nd, int64_t d,
             int64_t k, bool signed_codes) {
  std::vector<double> want_s(nq * k);
  std::vector<int64_t> want_i(nq * k);
  for (int64_t q = 0; q < nq; ++q) {
    std::vector<std::pair<double, int64_t>> all(nd);
    for (int64_t r = 0; r < nd; ++r)
      all[r] = {-lf::int8_exact_score(&w[q * d], &codes[r * d], d, signed_codes), r};
    std::sort(all.begin(), all.end());
    for (int64_t i = 0; i < k; ++i) want_s[q * k + i] = -all[i].first, want_i[q * k + i] = all[i].second;
  }
  for (int threads : {1, 2, 3}) {
    std::vector<double> got_s(nq * k, -1.0);
    std::vector<int64_t> got_i(nq * k, -1);
    lf::int8_topk(w.data(), nq, codes.data(), nd, d, signed_codes, k, got_s.data(), got_i.data(), threads);
    LF_CHECK(got_s == want_s, "scores differ from brute force");
    LF_CHECK(got_i == want_i, "rows differ from brute force (ties must go to the lower row)");
  }
}

void check_case(std::mt19937& rng, int64_t nq, int64_t nd, int64_t d, int64_t k, bool signed_codes, int distinct,
                double wscale) {
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<double> w(nq * d);
  for (auto& v : w) v = normal(rng) * wscale;
  if (nq > 1) std::fill(w.begin() + d, w.begin() + 2 * d, 0.0);  // an all-zero query: every score ties
  std::vector<uint8_t> codes(nd * d);
  for (auto& v : codes) v = static_cast<uint8_t>(distinct >= 256 ? byte(rng) : 120 + byte(rng) % distinct);
  compare(w, codes, nq, nd, d, k, signed_codes);
}

// Integer sums at the kernels' limits: queries of +-1 (every integer digit at +-qmax, no rounding error, so
// the bounds have no slack to hide a saturated int16 pair sum) against rows of the extreme bytes.
void check_extremes(std::mt19937& rng, int64_t d, bool signed_codes) {
  const int64_t nq = 4, nd = 40, k = 6;
  const uint8_t extreme[4] = {0x00, 0xff, 0x7f, 0x80};
  std::uniform_int_distribution<int> pick(0, 3), coin(0, 1);
  std::vector<double> w(nq * d);
  for (int64_t j = 0; j < d; ++j) {
    w[j] = 1.0;
    w[d + j] = -1.0;
    w[2 * d + j] = j % 2 ? 1.0 : -1.0;
    w[3 * d + j] = coin(rng) ? 1.0 : -1.0;
  }
  std::vector<uint8_t> codes(nd * d);
  for (int64_t r = 0; r < nd; ++r)
    for (int64_t j = 0; j < d; ++j)  // rows 0-3 constant, the rest mixed: the top rows differ by one byte
      codes[r * d + j] = r < 4 ? extreme[r] : (j < r ? extreme[pick(rng)] : extreme[r % 4]);
  compare(w, codes, nq, nd, d, k, signed_codes);
}

// Rows equal in the dimensions where the query is large and different where it is tiny: their scores differ
// by far less than one step of either integer digit, so only the error bounds keep the right rows.
void check_near_ties(std::mt19937& rng, bool signed_codes) {
  const int64_t d = 80, nd = 3000, nq = 3, k = 10;
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> byte(0, 255), small(-3, 3);
  std::vector<double> w(nq * d);
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t j = 0; j < d; ++j) w[q * d + j] = normal(rng) * (j < 8 ? 1.0 : 1e-5);
  std::vector<uint8_t> base(d), codes(nd * d);
  for (auto& v : base) v = static_cast<uint8_t>(40 + byte(rng) % 170);
  for (int64_t r = 0; r < nd; ++r)
    for (int64_t j = 0; j < d; ++j)
      codes[r * d + j] = static_cast<uint8_t>(j < 8 ? base[j] : base[j] + small(rng));
  for (int64_t q = 0; q < nq; ++q) {
    std::vector<std::pair<double, int64_t>> all(nd);
    for (int64_t r = 0; r < nd; ++r) all[r] = {-lf::int8_exact_score(&w[q * d], &codes[r * d], d, signed_codes), r};
    std::sort(all.begin(), all.end());
    std::vector<double> s(k);
    std::vector<int64_t> idx(k);
    lf::int8_topk(&w[q * d], 1, codes.data(), nd, d, signed_codes, k, s.data(), idx.data(), 2);
    bool ok = true;
    for (int64_t i = 0; i < k; ++i) ok = ok && idx[i] == all[i].second && s[i] == -all[i].first;
    LF_CHECK(ok, "near-ties below one integer step");
  }
}

// Scores that differ by less than their own float64 rounding, where the error bounds are (computed as) zero,
// so only the bounds' rounding slack keeps the right rows:
// - "split": w = 2^40 a on some dimensions (one exact digit), small integers b elsewhere (an exact second
//   digit); rows agree where a != 0 and differ where b != 0, so their scores tie up to the float64 rounding
//   of 2^40 a . u.
// - "rounded": w = fl(s a) with s a full 53-bit significand: the digit's computed error w - fl(s a) is 0 while
//   the real one is not; rows with equal integer dots score apart by rounding only.
// Setting the slack to 0 fails most of these cases (checked when they were written).
void check_rounding_ties(std::mt19937& rng) {
  const bool avx2 = std::string(lf::int8_kernel_name()).find("avx2") != std::string::npos;
  const int qmax = avx2 ? 32 : 127;  // the kernel's digit range: a = +-qmax makes the digit's scale exact
  std::uniform_int_distribution<int> a_of(-qmax, qmax), b_of(-1, 1), byte(0, 255), small(-2, 2);
  const int64_t nq = 4;
  for (int64_t d : {16, 33, 64}) {
    const int64_t nd = 300;
    std::vector<double> w(nq * d);
    std::vector<uint8_t> base(d), codes(nd * d);
    for (int64_t q = 0; q < nq; ++q)
      for (int64_t j = 0; j < d; ++j)
        w[q * d + j] = j % 3 == 0 ? std::ldexp(j == 0 ? qmax : a_of(rng), 40) : b_of(rng);
    for (auto& v : base) v = static_cast<uint8_t>(60 + byte(rng) % 130);
    for (int64_t r = 0; r < nd; ++r)
      for (int64_t j = 0; j < d; ++j)
        codes[r * d + j] = static_cast<uint8_t>(j % 3 == 0 ? base[j] : base[j] + small(rng));
    compare(w, codes, nq, nd, d, 10, d % 2 == 0);
  }
  for (int64_t d : {3, 8, 33})
    for (int spread : {2, 4, 16}) {
      const int64_t nd = 400;
      std::vector<double> w(nq * d);
      for (int64_t q = 0; q < nq; ++q) {
        const uint64_t bits = ((uint64_t(rng()) << 21) ^ rng()) & ((uint64_t(1) << 52) - 1);
        const double s = std::ldexp(static_cast<double>(bits | (uint64_t(1) << 52)), -52);  // in [1, 2)
        for (int64_t j = 0; j < d; ++j) w[q * d + j] = s * (j == 0 ? qmax : a_of(rng));
      }
      std::vector<uint8_t> codes(nd * d);
      for (auto& v : codes) v = static_cast<uint8_t>(128 + byte(rng) % spread);
      compare(w, codes, nq, nd, d, 10, spread == 4);
    }
}

void check_exact_score() {
  const double w[3] = {0.5, -2.0, 1.0};
  const uint8_t row[3] = {0, 128, 255};
  LF_CHECK(lf::int8_exact_score(w, row, 3, false) == 0.0 - 256.0 + 255.0, "uint8 score");
  LF_CHECK(lf::int8_exact_score(w, row, 3, true) == 64.0 - 0.0 + 127.0, "int8 score (byte ^ 0x80)");
}

// Scores of chosen rows: equal rows score bitwise equal wherever they stand among the candidates, and codes
// score exactly as int8_exact_score.
void check_score_rows(std::mt19937& rng, int64_t d) {
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> byte(0, 255);
  const int64_t nd = 3, nq = 2, nr = 37;
  std::vector<double> w(nq * d);
  for (auto& v : w) v = normal(rng);
  std::vector<uint8_t> codes(nd * d);
  std::vector<float> vecs(nd * d);
  for (auto& v : codes) v = static_cast<uint8_t>(byte(rng));
  for (auto& v : vecs) v = static_cast<float>(normal(rng));
  std::vector<int64_t> rows(nq * nr);
  for (auto& r : rows) r = byte(rng) % nd;
  std::vector<double> s8(nq * nr), sf(nq * nr);
  lf::int8_score_rows(w.data(), nq, d, codes.data(), true, rows.data(), nr, s8.data(), 2);
  lf::float_score_rows(w.data(), nq, d, vecs.data(), rows.data(), nr, sf.data(), 2);
  bool ok8 = true, okf = true;
  for (int64_t q = 0; q < nq; ++q)
    for (int64_t c = 0; c < nr; ++c) {
      const int64_t r = rows[q * nr + c];
      ok8 = ok8 && s8[q * nr + c] == lf::int8_exact_score(&w[q * d], &codes[r * d], d, true);
      double one;
      lf::float_score_rows(&w[q * d], 1, d, vecs.data(), &r, 1, &one, 1);
      okf = okf && sf[q * nr + c] == one;
    }
  LF_CHECK(ok8, "int8_score_rows differs from int8_exact_score");
  LF_CHECK(okf, "float_score_rows depends on the row's position among the candidates");
}

}  // namespace

int main() {
  std::mt19937 rng(11);
  check_exact_score();
  const lf::Simd top = lf::simd_detected();
  for (int level = 0; level <= static_cast<int>(top); ++level) {
    lf::set_simd_cap(static_cast<lf::Simd>(level));
    std::printf("int8 kernel: %s\n", lf::int8_kernel_name());
    for (int64_t d : {1, 7, 31, 32, 33, 63, 64, 65, 95, 100, 128, 383, 390, 1024}) {
      check_case(rng, 3, 41, d, 5, true, 256, 1.0);
      check_case(rng, 2, 23, d, 23, false, 3, 1e-3);  // k == nd, many ties
    }
    check_case(rng, 4, 6000, 96, 10, true, 256, 1.0);    // split over rows, frequent flushes avoided
    check_case(rng, 3, 5000, 64, 7, false, 2, 1.0);      // heavy ties: candidate lists flushed many times
    check_case(rng, 2, 300, 1024, 300, true, 256, 1e6);  // k == nd, large weights
    check_near_ties(rng, true);
    for (int64_t d : {32, 33, 64, 96, 1024, 1030})
      for (bool sc : {true, false}) check_extremes(rng, d, sc);
    check_near_ties(rng, false);
    check_rounding_ties(rng);
    for (int64_t d : {1, 15, 16, 100, 1024}) check_score_rows(rng, d);
    // Tiny and huge weights: the error bounds must neither underflow (||w - s a||^2 below the smallest
    // double) nor overflow; every output must be filled with the brute-force ranking.
    for (double wscale : {1e-160, 1e-200, 1e-300, 1e-315, 1e150, 1e200, 1e300}) {
      check_case(rng, 3, 50, 64, 5, true, 256, wscale);
      check_case(rng, 2, 40, 7, 40, false, 3, wscale);
    }
    check_case(rng, 2, 5000, 64, 7, true, 256, 1e-200);  // split over rows
    check_case(rng, 2, 5000, 64, 7, true, 256, 1e300);
    check_case(rng, 3, 60, 7, 5, true, 256, 1e304);  // past the bounds' range: ranked by exact scores alone
    check_case(rng, 2, 5000, 7, 9, false, 3, 1e304);
  }
  return lf_test::finish("test_int8_search");
}
