// Unit tests of the portable core's pack_bits (no torch): run by ctest.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include <stdexcept>

#include "../core/pack_bits.h"
#include "../core/parallel.h"
#include "test_util.h"

namespace {

// Straightforward bit-by-bit reference, as numpy.packbits(x > 0, axis=-1).
std::vector<uint8_t> reference(const std::vector<float>& x, int64_t n, int64_t d) {
  const int64_t nb = lf::packed_bytes(d);
  std::vector<uint8_t> out(n * nb, 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < d; ++j)
      if (x[r * d + j] > 0.0f) out[r * nb + j / 8] |= static_cast<uint8_t>(0x80u >> (j % 8));
  return out;
}

uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);  // truncation keeps the sign and zero/NaN classes
}

void test_random_shapes() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  const int64_t dims[] = {1, 7, 8, 9, 13, 64, 123, 1024};
  for (int64_t d : dims) {
    for (int64_t n : {1, 3, 50}) {
      std::vector<float> x(n * d);
      for (auto& v : x) v = normal(rng);
      x[0] = 0.0f;                                          // zero is not positive
      if (n * d > 1) x[1] = std::numeric_limits<float>::quiet_NaN();  // NaN is not positive
      auto want = reference(x, n, d);
      for (int threads : {1, 2}) {
        std::vector<uint8_t> got(n * lf::packed_bytes(d), 0xAB);
        lf::pack_bits(x.data(), lf::FloatKind::F32, n, d, d, got.data(), threads);
        LF_CHECK(got == want, "f32 pack_bits mismatch");
      }
      std::vector<double> xd(x.begin(), x.end());
      std::vector<uint8_t> got(n * lf::packed_bytes(d), 0xAB);
      lf::pack_bits(xd.data(), lf::FloatKind::F64, n, d, d, got.data(), 2);
      LF_CHECK(got == want, "f64 pack_bits mismatch");
      std::vector<uint16_t> xb(x.size());
      for (size_t i = 0; i < x.size(); ++i) xb[i] = to_bf16_bits(x[i]);
      std::fill(got.begin(), got.end(), 0xAB);
      lf::pack_bits(xb.data(), lf::FloatKind::BF16, n, d, d, got.data(), 2);
      LF_CHECK(got == want, "bf16 pack_bits mismatch");
    }
  }
}

void test_strided_rows() {
  // Rows 10 elements apart, 5 used: the gap must be ignored.
  std::vector<float> x(3 * 10, 1.0f);
  for (int r = 0; r < 3; ++r)
    for (int j = 5; j < 10; ++j) x[r * 10 + j] = -1.0f;  // ignored
  x[1 * 10 + 2] = -3.0f;
  std::vector<uint8_t> got(3, 0);
  lf::pack_bits(x.data(), lf::FloatKind::F32, 3, 5, 10, got.data(), 1);
  LF_CHECK(got[0] == 0xF8 && got[1] == 0xD8 && got[2] == 0xF8, "strided rows");
}

void test_half_specials() {
  // fp16: +0, -0, +inf, -inf, NaN, smallest subnormal, -1.
  const uint16_t v[] = {0x0000, 0x8000, 0x7c00, 0xfc00, 0x7e00, 0x0001, 0xbc00, 0x3c00};
  uint8_t got = 0;
  lf::pack_bits(v, lf::FloatKind::F16, 1, 8, 8, &got, 1);
  LF_CHECK(got == 0x25, "fp16 special values");  // bits for +inf (2), subnormal (5), 1.0 (7)
}

// An exception thrown in a worker comes back to the caller (escaping an OpenMP region would terminate).
void test_parallel_for_rethrows() {
  bool caught = false;
  try {
    lf::parallel_for(0, 1000, 1, 3, [](int64_t b, int64_t) {
      if (b > 0) throw std::runtime_error("worker failed");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  LF_CHECK(caught, "parallel_for rethrows a worker's exception");
  int64_t sum = 0;  // and still runs normally afterwards
  lf::parallel_for(0, 100, 1, 1, [&](int64_t b, int64_t e) { sum += e - b; });
  LF_CHECK(sum == 100, "parallel_for after an exception");
}

}  // namespace

int main() {
  test_random_shapes();
  test_strided_rows();
  test_half_specials();
  test_parallel_for_rethrows();
  return lf_test::finish("test_pack_bits");
}
