#!/usr/bin/env bash
# One-call GPU run (for a lent H100/H200 with torch, triton and nvcc, no network):
#   bash benchmarks/run_gpu_suite.sh [suite args...]      e.g. --only pooling contrastive
# Builds the CUDA extension (quant ops; for the visible GPU's architecture only), then runs
# benchmarks/gpu_suite.py (correctness first, then timings) and leaves the log and JSON in $OUT (or ./out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
# The extension build is optional: the suite falls back to plain-torch GPU paths for quant when it is missing.
if [ "${LLMEMBED_FAST_BUILD_EXT:-1}" = "1" ]; then
  cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  ( time TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" MAX_JOBS="${MAX_JOBS:-16}" timeout "${EXT_BUILD_TIMEOUT_S:-240}" \
      python3 -m pip install -q --no-deps --no-build-isolation -e . ) > "$OUT/build.log" 2>&1 \
    || echo "extension build failed or timed out (see $OUT/build.log); quant falls back to torch paths"
else
  LLMEMBED_FAST_NO_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1
fi
python3 benchmarks/gpu_suite.py --budget-s "${BUDGET_S:-420}" --json "$OUT/gpu_suite.json" "$@" 2>&1 \
  | tee "$OUT/gpu_suite.log"
exit "${PIPESTATUS[0]}"
