#!/usr/bin/env bash
# One-call GPU run (for a lent H100/H200 with torch, triton and nvcc, no network):
#   bash benchmarks/run_gpu_suite.sh [section ...]     e.g. contrastive grad_cache
# Wheels to carry in .whl/ (the device tool's carry: [".whl"]): pip download --no-deps -d .whl inf-cl setuptools
# Default sections: contrastive grad_cache embedder quant (quant last), the ones with figures still open;
# name pooling to run it too. About 9 minutes in all with the defaults (timeout_s 580 for one device call).
# Builds the CUDA extension in the background while the sections that do not need it run; then runs quant
# (which uses the extension's CUDA kernels when the build succeeded). Each stage prints as it goes and is
# capped by `timeout`, so a run cut short still leaves its log and JSON in $OUT (or ./out).
# Knobs: BUDGET_S (suite seconds for the first stage, default 400), QUANT_BUDGET_S (default 90),
# SUITE_ARGS (more gpu_suite.py arguments for the first stage, e.g. "--full" or "--checks contrastive"),
# MAX_JOBS (default 8: leaves cores for the timings), LLMEMBED_FAST_BUILD_EXT=0 skips the build,
# LLMEMBED_FAST_COMMIT (the commit under test, recorded in the JSON: the machine's copy has no .git).
# Budget (one device call is at most 600 s): stage 1 400 s (+ 40 s timeout slack) + quant 90 s (+ 30 s)
# + start-up ~20 s: ~510 s wall typically; the timeouts cap the two stages at 560 s. Stage 1: checks <= 0.3 x 400 = 120 s, timings
# the remaining 280-300 s split by gpu_suite.TIME_WEIGHTS (contrastive 2.0, grad_cache 2.0, embedder 1.5:
# ~102 / ~102 / ~76 s at 280 s; the arithmetic is in gpu_suite.py beside TIME_WEIGHTS).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# no network on the GPU machine: nothing should contact the Hub, and a lookup must fail at once, not hang
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# the commit under test, for the JSON's env record (the machine's copy of the tree has no .git): call as
# LLMEMBED_FAST_COMMIT=$(git rev-parse HEAD) bash benchmarks/run_gpu_suite.sh
if [ -n "${LLMEMBED_FAST_COMMIT:-}" ]; then export LLMEMBED_FAST_COMMIT; fi
echo "commit: ${LLMEMBED_FAST_COMMIT:-not given (LLMEMBED_FAST_COMMIT unset)}"
# Inf-CL (pure Python + Triton) travels as a wheel in .whl/ when the caller carries it. So may a setuptools
# wheel: pyproject.toml's SPDX license needs setuptools >= 77 to build the extension, and the machine's own is
# used when new enough; a carried one goes on the build's path only.
wheels=(); for w in .whl/*.whl; do [ -e "$w" ] && case "$(basename "$w")" in setuptools-*) ;; *) wheels+=("$w") ;; esac; done
if [ ${#wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
build_path="${PYTHONPATH:-}"
st_version=$(python3 -c "import setuptools; print(setuptools.__version__)" 2>/dev/null || echo none)
if ! python3 -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
  if ls .whl/setuptools-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile \
       --no-cache-dir --target /tmp/build-site .whl/setuptools-*.whl; then
    build_path=/tmp/build-site${build_path:+:$build_path}
    st_version="$st_version (too old; the carried wheel builds)"
  else
    st_version="$st_version (too old for pyproject.toml's license field; carry a setuptools wheel in .whl/)"
  fi
fi
echo "setuptools for the extension build: $st_version"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(contrastive grad_cache embedder quant)
first=(); want_quant=0
for s in "${sections[@]}"; do [ "$s" = quant ] && want_quant=1 || first+=("$s"); done
build_pid=""
if [ "${LLMEMBED_FAST_BUILD_EXT:-1}" = "1" ] && [ "$want_quant" = 1 ]; then
  # nvidia-smi answers in well under a second; importing torch and starting CUDA for this took ~5 s in the
  # foreground before stage 1. The python query only when this nvidia-smi lacks the field.
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '[:space:]')
  if ! [[ "$cap" =~ ^[0-9]+\.[0-9]+$ ]]; then
    cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  fi
  ( echo "setuptools: $st_version"
    time PYTHONPATH="$build_path" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" MAX_JOBS="${MAX_JOBS:-8}" \
      timeout "${EXT_BUILD_TIMEOUT_S:-300}" python3 -m pip install -q --no-deps --no-build-isolation -e . ) \
    > "$OUT/build.log" 2>&1 &
  build_pid=$!
fi
rc=0
if [ ${#first[@]} -gt 0 ]; then
  # shellcheck disable=SC2086  # SUITE_ARGS is split into words on purpose
  timeout $(( ${BUDGET_S:-400} + 40 )) python3 benchmarks/gpu_suite.py --budget-s "${BUDGET_S:-400}" \
    --check-share "${CHECK_SHARE:-0.3}" --json "$OUT/gpu_suite.json" --only "${first[@]}" ${SUITE_ARGS:-} \
    2>&1 | tee "$OUT/gpu_suite.log"
  rc=${PIPESTATUS[0]}
fi
if [ "$want_quant" = 1 ]; then
  if [ -n "$build_pid" ]; then
    wait "$build_pid" || echo "extension build failed or timed out (see $OUT/build.log); quant uses torch paths"
    tail -5 "$OUT/build.log"
  fi
  timeout $(( ${QUANT_BUDGET_S:-90} + 30 )) python3 benchmarks/gpu_suite.py --budget-s "${QUANT_BUDGET_S:-90}" \
    --json "$OUT/gpu_suite_quant.json" --only quant 2>&1 | tee "$OUT/gpu_suite_quant.log"
  q=${PIPESTATUS[0]}; [ "$rc" = 0 ] && rc=$q
fi
exit "$rc"
