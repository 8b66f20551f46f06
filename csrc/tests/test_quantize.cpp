// Unit tests of the scalar quantization core (no torch): float32/float64/bfloat16/float16 inputs in every
// compute precision and SIMD level against a plain formula; half rounding against known values.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "../core/quantize.h"
#include "../core/simd.h"
#include "test_util.h"

namespace {

// The output byte of v = (x - start) / step already rounded to the compute precision: code ^ 0x80 for int8;
// NaN gives 0 for either (as numpy's NaN -> integer casts in sentence-transformers).
uint8_t ref_byte(double v, bool sgn) {
  if (std::isnan(v)) return 0;
  v = std::floor(v);
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v)) ^ (sgn ? 0x80 : 0);
}

void test_round_to_half() {
  LF_CHECK(lf::round_to_half(1.0f) == 1.0f, "1.0");
  LF_CHECK(lf::round_to_half(1.0f + 1.0f / 4096) == 1.0f, "tie to even (down)");
  LF_CHECK(lf::round_to_half(1.0f + 6.0f / 4096) == 1.0f + 1.0f / 512, "tie to even (up)");
  LF_CHECK(lf::round_to_half(65504.0f) == 65504.0f, "max half");
  LF_CHECK(lf::round_to_half(65519.0f) == 65504.0f, "rounds down to max");
  LF_CHECK(std::isinf(lf::round_to_half(65520.0f)), "rounds up to inf");
  LF_CHECK(lf::round_to_half(std::ldexp(1.0f, -24)) == std::ldexp(1.0f, -24), "smallest subnormal");
  LF_CHECK(lf::round_to_half(std::ldexp(1.0f, -25)) == 0.0f, "half of smallest subnormal ties to 0");
  LF_CHECK(lf::round_to_half(std::ldexp(3.0f, -26)) == std::ldexp(1.0f, -24), "0.75 ulp rounds up");
  LF_CHECK(lf::round_to_half(-3.14159f) == -3.140625f, "negative");
}

void test_f32_and_f64(std::mt19937& rng) {
  std::normal_distribution<float> normal;
  for (int64_t d : {1, 7, 8, 9, 33, 384}) {
    const int64_t n = 5;
    std::vector<float> x(n * d), s(d), t(d);
    for (auto& v : x) v = normal(rng);
    for (int64_t j = 0; j < d; ++j) s[j] = -2.0f + 0.01f * j, t[j] = (j % 5 == 0) ? 1.0f : 4.0f / 255.0f;
    x[0] = std::numeric_limits<float>::quiet_NaN();
    if (n * d > 2) x[1] = 1e30f, x[2] = -1e30f;
    for (bool sgn : {false, true}) {
      std::vector<uint8_t> want(n * d);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j)
          want[i * d + j] = ref_byte(static_cast<float>((x[i * d + j] - s[j]) / t[j]), sgn);
      std::vector<uint8_t> got(n * d, 0x5a);
      lf::quantize_scalar(x.data(), lf::FloatKind::F32, n, d, d, s.data(), t.data(), lf::ComputeKind::F32, sgn,
                          got.data(), 2);
      LF_CHECK(got == want, "float32 codes");
      // float64 arithmetic on the same data
      std::vector<double> xd(x.begin(), x.end()), sd(s.begin(), s.end()), td(t.begin(), t.end());
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j) want[i * d + j] = ref_byte((xd[i * d + j] - sd[j]) / td[j], sgn);
      lf::quantize_scalar(xd.data(), lf::FloatKind::F64, n, d, d, sd.data(), td.data(), lf::ComputeKind::F64, sgn,
                          got.data(), 1);
      LF_CHECK(got == want, "float64 codes");
      // bfloat16 input in float32 arithmetic
      std::vector<uint16_t> xb(x.size());
      std::vector<float> xr(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        uint32_t u;
        std::memcpy(&u, &x[i], 4);
        xb[i] = static_cast<uint16_t>(u >> 16);
        u = static_cast<uint32_t>(xb[i]) << 16;
        std::memcpy(&xr[i], &u, 4);
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < d; ++j)
          want[i * d + j] = ref_byte(static_cast<float>((xr[i * d + j] - s[j]) / t[j]), sgn);
      lf::quantize_scalar(xb.data(), lf::FloatKind::BF16, n, d, d, s.data(), t.data(), lf::ComputeKind::F32, sgn,
                          got.data(), 2);
      LF_CHECK(got == want, "bfloat16 codes");
    }
  }
}

void test_f16_arithmetic() {
  // x = 1.0 (0x3c00), start = 0.0999755859375 (half), step = 0.0035266876220703125 (half):
  // half: (x - start) = 0.900390625 -> / step = 255.3... -> rounded to half 255.375 -> 255
  const uint16_t x[1] = {0x3c00};
  const float s[1] = {0.0999755859375f}, t[1] = {lf::round_to_half(0.9f / 255.0f)};
  uint8_t got = 0;
  lf::quantize_scalar(x, lf::FloatKind::F16, 1, 1, 1, s, t, lf::ComputeKind::F16, false, &got, 1);
  const float want = std::floor(lf::round_to_half(lf::round_to_half(1.0f - s[0]) / t[0]));
  LF_CHECK(got == static_cast<uint8_t>(std::min(255.0f, want)), "float16 arithmetic");
}

}  // namespace

int main() {
  std::mt19937 rng(3);
  test_round_to_half();
  const lf::Simd top = lf::simd_detected();
  for (int level = 0; level <= static_cast<int>(top); ++level) {
    lf::set_simd_cap(static_cast<lf::Simd>(level));
    test_f32_and_f64(rng);
  }
  test_f16_arithmetic();
  return lf_test::finish("test_quantize");
}
