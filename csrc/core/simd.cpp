#include "simd.h"

#include <atomic>
#include <cstdlib>

namespace lf {
namespace {

Simd detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") &&
                    __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vpopcntdq");
  if (avx512) return Simd::AVX512;
  if (avx2) return Simd::AVX2;
#endif
  return Simd::Scalar;
}

Simd env_cap() {
  const char* v = std::getenv("LLMEMBED_FAST_SIMD");
  Simd s;
  if (v && parse_simd(v, &s)) return s;
  return Simd::AVX512;
}

std::atomic<int>& cap_slot() {
  static std::atomic<int> cap(static_cast<int>(env_cap()));
  return cap;
}

}  // namespace

Simd simd_detected() {
  static const Simd d = detect();
  return d;
}

Simd simd_active() {
  const int cap = cap_slot().load(std::memory_order_relaxed);
  const int det = static_cast<int>(simd_detected());
  return static_cast<Simd>(cap < det ? cap : det);
}

Simd set_simd_cap(Simd cap) {
  cap_slot().store(static_cast<int>(cap));
  return simd_active();
}

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool v = (__builtin_cpu_init(), __builtin_cpu_supports("avx512vnni"));
  return v;
#else
  return false;
#endif
}

const char* simd_name(Simd s) {
  switch (s) {
    case Simd::Scalar: return "scalar";
    case Simd::AVX2: return "avx2";
    case Simd::AVX512: return "avx512";
  }
  return "scalar";
}

bool parse_simd(const std::string& name, Simd* out) {
  if (name == "scalar") *out = Simd::Scalar;
  else if (name == "avx2") *out = Simd::AVX2;
  else if (name == "avx512") *out = Simd::AVX512;
  else return false;
  return true;
}

const char* hamming_kernel_name() {
  switch (simd_active()) {
    case Simd::AVX512: return "avx512-vpopcntdq";
    case Simd::AVX2: return "avx2-pshufb-popcount";
    default: return "scalar-popcnt64";
  }
}

const char* int8_kernel_name() {
  switch (simd_active()) {
    case Simd::AVX512: return cpu_has_avx512_vnni() ? "avx512-vnni-vpdpbusd" : "avx2-vpmaddubsw";
    case Simd::AVX2: return "avx2-vpmaddubsw";
    default: return "scalar-int32";
  }
}

const char* pack_bits_kernel_name() { return simd_active() >= Simd::AVX2 ? "avx2-movemask" : "scalar"; }
const char* quantize_kernel_name() { return simd_active() >= Simd::AVX2 ? "avx2-divps" : "scalar"; }

}  // namespace lf
