#!/usr/bin/env bash
# One GPU call for the decode kernels: build, correctness against the torch reference (fresh random
# inputs, poisoned outputs), compute-sanitizer, CUDA-graph timings of this tree's kernels side by side
# with a baseline tree's (BASE_TREE, e.g. `git archive` of the previous commit in .device-carry/old,
# with this bench/decode_attention.py copied in), and an Nsight Compute profile of the goal case.
# At most 8 files land in $OUT.
#
#   device run: bash bench/gpu_decode_run.sh      (carry .device-carry when BASE_TREE is used)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export SPECTRALQUANT_HOME=${SPECTRALQUANT_HOME:-/tmp/spectralquant-home}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
BASE_TREE=${BASE_TREE:-.device-carry/old}
STAGES=${STAGES:-check,pytest,sanitize,bench,base,ncu}
GRID=${GRID:---batches 32,8,1,64 --contexts 32768,4096,16384,131072 --head-dims 128,64 --presets sq2_5bit,sq3bit,sq4bit,tq3bit}
stage() { [[ ",$STAGES," == *",$1,"* ]]; }
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | tail -1; } 2>&1 | tee "$OUT/check.log"
# Build both extensions in parallel (the baseline tree has other sources, so another cache key).
if stage base && [ -d "$BASE_TREE" ]; then
  (cd "$BASE_TREE" && PYTHONPATH=$PWD $PY -m vllm_spectralquant.ops.cuda_ext --build > /tmp/base_build.log 2>&1) &
fi
PYTHONPATH=$PWD $PY -m vllm_spectralquant.ops.cuda_ext --build 2>&1 | tail -3 | tee -a "$OUT/check.log"
wait
el "built" | tee -a "$OUT/check.log"

if stage check; then
  PYTHONPATH=$PWD timeout 240 $PY bench/gpu_kernels_check.py --check --impls "${CHECK_IMPLS:-cuda}" --out "$OUT" 2>&1 | tail -40 | tee -a "$OUT/check.log"
  if ! $PY -c "import json,sys; s=json.load(open('$OUT/kernels_check.json'))['summary']; sys.exit(0 if s.get('cuda',{}).get('decode_ok') else 1)"; then
    el "CUDA decode not correct: no timing" | tee -a "$OUT/check.log"; STAGES=${STAGES//bench/}; STAGES=${STAGES//ncu/}
  fi
  el "checked" | tee -a "$OUT/check.log"
fi
if stage pytest; then
  # The test suite's CUDA cases (tests/kernel_cases.py, shared with the Triton CPU tests).
  PYTHONPATH=$PWD timeout 180 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_ops_cuda.py 2>&1 | tail -15 | tee -a "$OUT/check.log"
  el "pytest -m gpu done" | tee -a "$OUT/check.log"
fi
if stage sanitize; then
  for tool in memcheck racecheck; do
    PYTHONPATH=$PWD timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
      $PY bench/gpu_kernels_check.py --sanitize > /tmp/$tool.log 2>&1
    echo "$tool exit $?" >> /tmp/$tool.log
    { echo "== $tool"; tail -8 /tmp/$tool.log; } >> "$OUT/sanitize.log"
  done
  el "sanitized" | tee -a "$OUT/check.log"
fi
if stage bench; then
  PYTHONPATH=$PWD timeout ${BENCH_TIMEOUT:-200} $PY bench/decode_attention.py --impls cuda --codecs sorted --label new \
    $GRID --out "$OUT/decode_sorted.json" 2>&1 | grep -v "^d[0-9]" | tee -a "$OUT/bench.log"
  PYTHONPATH=$PWD timeout 90 $PY bench/decode_attention.py --impls cuda --codecs random --label new \
    ${RANDOM_GRID:---batches 32 --contexts 32768 --head-dims 128,64} --out "$OUT/decode_random.json" 2>&1 | grep -v "^d[0-9]" | tee -a "$OUT/bench.log"
  PYTHONPATH=$PWD timeout 90 $PY bench/decode_attention.py --impls cuda --codecs sorted --label new --block-size 16 \
    ${BLOCK16_GRID:---batches 32,8 --contexts 32768,4096 --head-dims 128,64 --presets sq2_5bit,sq3bit,sq4bit,tq3bit} \
    --out "$OUT/decode_block16.json" 2>&1 | grep -v "^d[0-9]" | tee -a "$OUT/bench.log"
  el "benched" | tee -a "$OUT/check.log"
fi
if stage base && [ -d "$BASE_TREE" ]; then
  (cd "$BASE_TREE" && PYTHONPATH=$PWD timeout ${BASE_TIMEOUT:-120} $PY bench/decode_attention.py --impls cuda --codecs sorted \
    --label base ${BASE_GRID:---batches 32,8,1 --contexts 32768,4096 --head-dims 128,64 --presets sq2_5bit,sq4bit} \
    --out /tmp/decode_base.json) 2>&1 | grep -v "^d[0-9]" | tee -a "$OUT/bench.log"
  el "baseline benched" | tee -a "$OUT/check.log"
fi
if stage ncu; then
  PYTHONPATH=$PWD timeout 100 ncu --kernel-name regex:split_kernel --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section InstructionStats --section WarpStateStats --section Occupancy --section LaunchStats \
    $PY bench/decode_attention.py --eager --batches 32 --contexts 32768 --head-dims 128 --presets sq2_5bit \
    --codecs sorted --impls cuda --no-baseline --out /tmp/ncu_bench.json > "$OUT/ncu_goal.txt" 2>&1
  el "profiled" | tee -a "$OUT/check.log"
fi
PYTHONPATH=$PWD $PY bench/gpu_kernels_check.py --summarize --out "$OUT" 2>&1 | tail -30
