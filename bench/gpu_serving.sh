#!/usr/bin/env bash
# One GPU session for issue 6: vLLM 0.33 (python-only build, ../shared/gpu-vllm) + our wheel + CUDA
# kernels; synthetic models calibrated in the same run; the serving check; the serving benchmark.
#
#   STAGES=install,models,check bash bench/gpu_serving.sh     (results in $OUT)
#   STAGES=install,models,serving SERVING_ARGS="..." bash bench/gpu_serving.sh
#
# Needs (carried, git-ignored): gpu-vllm-dist/ (bash ../shared/gpu-vllm/build.sh gpu-vllm-dist) and
# .device-carry/wheel/vllm_spectralquant-*.whl (pip wheel . from a clean export of HEAD);
# optionally .device-carry/cuda-ext/ (a build of the extension from an earlier run, reused).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export SPECTRALQUANT_HOME=${SPECTRALQUANT_HOME:-/tmp/spectralquant-home}
export GPU_VLLM_SITE=${GPU_VLLM_SITE:-/tmp/gpu-vllm-site}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
MODELS=${MODELS:-/tmp/sq-models}
STAGES=${STAGES:-install,models,check}
stage() { [[ ",$STAGES," == *",$1,"* ]]; }
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_serving.log"; }

if stage install; then
  log "install vLLM 0.33 (python-only) + vllm-spectralquant"
  bash gpu-vllm-dist/install.sh "$GPU_VLLM_SITE" > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$GPU_VLLM_SITE" .device-carry/wheel/*.whl
fi
# shellcheck disable=SC1091
source gpu-vllm-dist/env.sh
if stage install; then
  if [ -d .device-carry/cuda-ext ]; then mkdir -p "$SPECTRALQUANT_HOME" && cp -r .device-carry/cuda-ext "$SPECTRALQUANT_HOME/"; fi
  t0=$(date +%s)
  python3 -m vllm_spectralquant.ops.cuda_ext --build >> "$OUT/gpu_serving.log" 2>&1 || { log "CUDA extension build FAILED"; tail -30 "$OUT/gpu_serving.log"; }
  log "CUDA extension ready in $(( $(date +%s) - t0 ))s"
  tar -C "$SPECTRALQUANT_HOME" -czf "$OUT/cuda-ext.tgz" cuda-ext 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/gpu_serving.log"
fi

if stage models; then
  log "synthetic models + calibration"
  timeout 600 python3 bench/gpu_models.py "$MODELS" --shapes ${SHAPES:-smollm2 llama8b} --layers "${LLAMA_LAYERS:-8}" \
    >> "$OUT/gpu_serving.log" 2>&1 || log "models FAILED"
fi

if stage check; then
  log "serving check"
  # shellcheck disable=SC2086
  timeout "${CHECK_TIMEOUT:-420}" python3 bench/gpu_check.py "$MODELS/smollm2-L30-random" --out "$OUT/gpu_check.json" ${CHECK_ARGS:-} \
    2>&1 | grep -v "it/s\]" | tee -a "$OUT/gpu_serving.log"
fi

if stage serving; then
  log "serving benchmark"
  # shellcheck disable=SC2086
  timeout "${SERVING_TIMEOUT:-480}" python3 bench/serving.py --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
    --dtype bfloat16 --out "$OUT/serving.json" ${SERVING_ARGS:-} 2>&1 | grep -v "it/s\]" | tee -a "$OUT/gpu_serving.log"
fi
log "done"
