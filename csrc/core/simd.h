// Run-time choice of SIMD kernels by CPU feature (no -march=native in the build).
// Kernels for every level are compiled into the same translation units with
// __attribute__((target(...))); the level is picked once from __builtin_cpu_supports and can be capped
// (never raised above what the CPU has) with LLMEMBED_FAST_SIMD=scalar|avx2|avx512 or set_simd_cap().
#pragma once
#include <string>

namespace lf {

enum class Simd : int {
  Scalar = 0,  // portable C++ (the compiler's baseline vectorization)
  AVX2 = 1,    // x86-64 AVX2 + POPCNT (+FMA)
  AVX512 = 2,  // AVX-512 F/BW + VPOPCNTDQ (+VNNI where present)
};

Simd simd_detected();                 // best level this CPU supports
Simd simd_active();                   // level in use: detected, capped by the env var / set_simd_cap
Simd set_simd_cap(Simd cap);          // cap the active level (tests, benchmarks); returns the new active level
bool cpu_has_avx512_vnni();           // whether the AVX-512 int8 kernel can use vpdpbusd
const char* simd_name(Simd s);        // "scalar" | "avx2" | "avx512"
bool parse_simd(const std::string& name, Simd* out);

// Names of the kernels the dispatchers pick at the active level (for lf.info()).
const char* hamming_kernel_name();
const char* int8_kernel_name();
const char* pack_bits_kernel_name();
const char* quantize_kernel_name();

}  // namespace lf
