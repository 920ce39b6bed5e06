#!/usr/bin/env bash
# One GPU session: build the CUDA extension, check CUDA + Triton against the torch reference,
# compute-sanitizer memcheck + racecheck on small shapes, the decode benchmark, and an Nsight Compute
# profile of the goal case. Results land in $OUT (default bench/results); at most 8 files.
#
#   bash bench/gpu_kernels_check.sh                       # everything
#   STAGES=check,sanitize bash bench/gpu_kernels_check.sh  # a subset (check, sanitize, bench, ncu)
#   BENCH_ARGS="--batches 32 --contexts 32768" ...         # a smaller benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export SPECTRALQUANT_HOME=${SPECTRALQUANT_HOME:-/tmp/spectralquant-home}
PY=${PYTHON:-python3}
STAGES=${STAGES:-check,sanitize,bench,ncu}
stage() { [[ ",$STAGES," == *",$1,"* ]]; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -2
} 2>&1 | tee "$OUT/check.log"

if stage check; then
  timeout "${CHECK_TIMEOUT:-330}" $PY bench/gpu_kernels_check.py --check --impls "${CHECK_IMPLS:-cuda,triton}" --only "${CHECK_ONLY:-}" --out "$OUT" 2>&1 | tee -a "$OUT/check.log"
  echo "check exit ${PIPESTATUS[0]}" | tee -a "$OUT/check.log"
  # Timing a wrong decode wastes device time: unless the CUDA decode is right, skip the benchmark and profile.
  if ! $PY -c "import json,sys; s=json.load(open('$OUT/kernels_check.json'))['summary']; sys.exit(0 if s.get('cuda',{}).get('decode_ok') else 1)"; then
    echo "CUDA decode not correct: skipping bench and ncu" | tee -a "$OUT/check.log"
    STAGES=${STAGES//bench/}
    STAGES=${STAGES//ncu/}
  fi
fi

if stage sanitize; then
  # The extension is already in $SPECTRALQUANT_HOME from the check stage (or is built here, uninstrumented).
  $PY -c "from vllm_spectralquant.ops import cuda_ext; assert cuda_ext.is_available(), cuda_ext.load_error()"
  for tool in memcheck racecheck; do
    timeout "${SANITIZE_TIMEOUT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
      $PY bench/gpu_kernels_check.py --sanitize > "$OUT/$tool.log" 2>&1
    echo "$tool exit $?" | tee -a "$OUT/$tool.log"
    tail -5 "$OUT/$tool.log"
  done
fi

if stage bench; then
  timeout "${BENCH_TIMEOUT:-330}" $PY bench/decode_attention.py --out "$OUT/decode_attention.json" ${BENCH_ARGS:-} \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
fi

if stage ncu; then
  # The goal case (sq2_5bit, B=32, 32k, head_dim 128): one launch of the split kernel, the sections that
  # say where the time goes (throughput vs peak, memory, instruction mix, stall reasons, occupancy).
  timeout "${NCU_TIMEOUT:-150}" ncu --kernel-name regex:split_kernel --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section InstructionStats --section WarpStateStats --section Occupancy --section LaunchStats \
    $PY bench/decode_attention.py --batches 32 --contexts 32768 --head-dims 128 --presets sq2_5bit \
    --impls cuda --no-baseline --out /tmp/ncu_bench.json > "$OUT/ncu_goal.txt" 2>&1
  echo "ncu exit $?"
fi

$PY bench/gpu_kernels_check.py --summarize --out "$OUT"
