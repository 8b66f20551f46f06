"""The AVX-512 kernels of the C++ core, run on any x86-64 CPU through SIMDe's emulated intrinsics.

The development and CI machines have no AVX-512, so ``ctest`` and the quant tests never reach the VNNI int8
dot or the VPOPCNTDQ Hamming row kernel. Here each kernel's source is cut from its ``.cpp`` file, its
``_mm512_*`` intrinsics are renamed to SIMDe's portable ones, and it is compiled into a small harness that
compares it with a scalar loop on random and extreme inputs (odd widths, masked tails). This checks the
kernels' logic, not the hardware instructions. Needs ``g++`` and the SIMDe headers
(``apt-get install libsimde-dev``; ``.ci/run`` installs them); skipped otherwise.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIMDE_DIR = os.environ.get("SIMDE_INCLUDE", "/usr/include")
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(os.path.join(SIMDE_DIR, "simde", "x86", "avx512.h")),
        reason="SIMDe headers not installed (apt-get install libsimde-dev)",
    ),
    pytest.mark.skipif(CXX is None, reason="no C++ compiler"),
    pytest.mark.skipif(
        platform.machine() not in ("x86_64", "AMD64"), reason="the harness uses AVX2 natively"
    ),
]

PRELUDE = """#include <simde/x86/avx512.h>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
// masked byte load (not in every SIMDe release): lanes outside the mask read nothing and are 0
static inline simde__m512i lf_maskz_loadu_epi8(simde__mmask64 k, const void* p) {
  alignas(64) uint8_t b[64];
  for (int i = 0; i < 64; ++i) b[i] = ((k >> i) & 1) ? static_cast<const uint8_t*>(p)[i] : 0;
  return simde_mm512_load_si512(b);
}
#include <algorithm>
#include <utility>
#include "csrc/core/topk.h"
using lf::TopK;
using ScanFn = void (*)(const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, TopK<int32_t>&);
struct IntQuery { const int8_t* a; const uint8_t* a_off; int32_t head_sum; };
"""

VNNI_MAIN = """
int main() {
  std::mt19937 g(5);
  long bad = 0, rows = 0;
  for (int d : {1, 7, 31, 32, 63, 64, 65, 100, 128, 191, 255, 256, 257, 320, 383, 1024, 1030, 4096})
    for (int flip : {0, 0x80})
      for (int trial = 0; trial < 3; ++trial) {  // trial 2: extreme bytes and |a| = 127
        const int n = 1 + g() % 9;
        std::vector<int8_t> a(d);
        std::vector<uint8_t> u(n * d);
        for (auto& x : a) x = trial == 2 ? (g() & 1 ? 127 : -127) : int8_t(int(g() % 255) - 127);
        for (auto& x : u) x = trial == 2 ? (g() & 1 ? 0xff : 0x00) : uint8_t(g());
        IntQuery q{a.data(), nullptr, 0};
        std::vector<int32_t> out(n, -7);
        dots_vnni(q, u.data(), n, d, uint8_t(flip), nullptr, out.data());
        for (int r = 0; r < n; ++r) {
          int32_t want = 0;
          for (int j = 0; j < d; ++j) want += int32_t(a[j]) * int32_t(u[r * d + j] ^ flip);
          bad += want != out[r];
          ++rows;
        }
      }
  std::printf("%ld rows, %ld wrong\\n", rows, bad);
  return bad != 0;
}
"""

HAMMING_MAIN = """
// the fused top-k scan against a sorted brute force, ties by lower index: every length class (whole
// 64-byte chunks, masked tails, under one chunk, the unrolled forms up to 8 chunks and the loop form
// beyond), document counts around the 8-document groups, duplicates, selections larger than the corpus
long check_scan(std::mt19937& g) {
  long bad = 0;
  for (int nb : {1, 7, 16, 31, 33, 48, 63, 64, 65, 96, 112, 128, 160, 192, 256, 320, 448, 512, 520, 575,
                 576, 1100})
    for (int trial = 0; trial < 4; ++trial) {  // trial 2: duplicate documents; trial 3: many equal distances
      const int nd = 1 + g() % 300, k = trial == 2 ? nd + 5 : 1 + g() % 12;
      std::vector<uint8_t> q(nb), d(nd * nb);
      for (auto& x : q) x = uint8_t(g());
      for (auto& x : d) x = trial == 3 ? uint8_t(g() & 0x3) : uint8_t(g());
      if (trial == 2)
        for (int j = 1; j < nd; ++j)
          if (g() % 3 == 0) std::copy_n(&d[(g() % j) * nb], nb, &d[j * nb]);
      std::vector<std::pair<int, int64_t>> want;
      for (int j = 0; j < nd; ++j) {
        int s = 0;
        for (int b = 0; b < nb; ++b) s += __builtin_popcount(q[b] ^ d[j * nb + b]);
        want.push_back({s, j});
      }
      std::sort(want.begin(), want.end());
      const int kk = std::min(k, nd);
      lf::TopK<int32_t> h(k);
      avx512_scan_for(nb)(q.data(), d.data(), 0, nd, nb, h);
      std::vector<int32_t> dist(kk);
      std::vector<int64_t> idx(kk);
      lf::merge_topk<int32_t, int32_t>({&h}, k, dist.data(), idx.data());
      bad += h.size() != kk;
      for (int i = 0; i < kk; ++i) bad += dist[i] != want[i].first || idx[i] != want[i].second;
    }
  return bad;
}

int main() {
  std::mt19937 g(3);
  long bad = check_scan(g), rows = 0;
  for (int nb : {1, 8, 13, 48, 63, 64, 65, 128, 129, 200, 512})
    for (int trial = 0; trial < 3; ++trial) {  // trial 2: every bit differs
      const int nd = 1 + g() % 20;
      std::vector<uint8_t> q(nb), d(nd * nb);
      for (auto& x : q) x = trial == 2 ? 0xff : uint8_t(g());
      for (auto& x : d) x = trial == 2 ? 0x00 : uint8_t(g());
      std::vector<int32_t> out(nd, -1);
      row_avx512(q.data(), d.data(), nd, nb, out.data());
      for (int j = 0; j < nd; ++j) {
        int want = 0;
        for (int b = 0; b < nb; ++b) want += __builtin_popcount(q[b] ^ d[j * nb + b]);
        bad += want != out[j];
        ++rows;
      }
    }
  std::printf("%ld rows, %ld wrong\\n", rows, bad);
  return bad != 0;
}
"""

# (source file, the kernel's first line, the text that ends it, its target-attribute macro, harness main,
#  AVX2 helpers it calls from earlier in the file: (first line, the text that ends it, their macro) each)
KERNELS = {
    "int8 dot (VNNI)": (
        "csrc/core/int8_search.cpp",
        "LF_VNNI inline __m256i fold512(",  # its helper, then dots_vnni
        "#endif  // LF_X86",
        "LF_VNNI",
        VNNI_MAIN,
        (),
    ),
    "hamming row and fused scan (VPOPCNTDQ)": (
        "csrc/core/hamming.cpp",
        "LF_AVX512 void row_avx512(",
        "#endif  // LF_X86",
        "LF_AVX512",
        HAMMING_MAIN,
        (("LF_AVX2 __attribute__((always_inline)) inline void select8(",
          "// The fused scans pack distances", "LF_AVX2"),),
    ),
}


def emulated_source(path: str, start: str, end: str, attr: str) -> str:
    """The kernel's text with every AVX-512 name mapped to SIMDe (AVX2 and SSE intrinsics stay native)."""
    with open(os.path.join(ROOT, path)) as f:
        src = f.read()
    i = src.index(start)
    body = src[i : src.index(end, i)]
    body = body.replace("_mm512_maskz_loadu_epi8", "lf_maskz_loadu_epi8")
    body = re.sub(r"\b_mm512_", "simde_mm512_", body)
    body = re.sub(r"\b__m512i\b", "simde__m512i", body)
    body = re.sub(r"\b__mmask64\b", "simde__mmask64", body)
    return re.sub(rf"\b{attr}\b", "", body)


@pytest.mark.parametrize("name", list(KERNELS))
def test_avx512_kernel_matches_scalar(name, tmp_path):
    path, start, end, attr, main, helpers = KERNELS[name]
    body = "".join(emulated_source(path, *h) for h in helpers) + emulated_source(path, start, end, attr)
    assert "_mm512_" not in re.sub(r"simde_mm512_", "", body), "an AVX-512 name escaped the renaming"
    cpp, exe = tmp_path / "kernel.cpp", tmp_path / "kernel"
    cpp.write_text(PRELUDE + body + main)
    build = subprocess.run(
        [CXX, "-O1", "-std=c++17", "-mavx2", "-w", f"-I{SIMDE_DIR}", f"-I{ROOT}", str(cpp), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.endswith(" 0 wrong\n"), run.stdout + run.stderr
