#!/usr/bin/env bash
# One GPU call for issue 13 (run from the repo root on the GPU machine; results in $OUT):
#   install  vLLM 0.33 python-only (gpu-vllm-dist/) + our wheel (.device-carry/wheel/) + CUDA extension
#   check    bench/gpu_prefill_check.py: verify rows through the CUDA decode, tiled prefill vs reference,
#            one 2048-token chunk over 32k / 128k packed tokens (time, peak memory) vs the old path
#   models   synthetic-weight models (bench/gpu_models.py, calibrated in the same run)
#   long     bench/long_prompt.py: one ~128k-token prompt, bf16 (TRITON_ATTN) vs ours, equal cache bytes
#   spec     bench/spec_decode.py: ngram speculation with FULL decode CUDA graphs, ours and bf16
#
#   STAGES=install,check,models,long SHAPES=llama8b_128k bash bench/gpu_issue13_run.sh
#   STAGES=install,models,spec SHAPES=smollm2 bash bench/gpu_issue13_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export SPECTRALQUANT_HOME=${SPECTRALQUANT_HOME:-/tmp/spectralquant-home}
export GPU_VLLM_SITE=${GPU_VLLM_SITE:-/tmp/gpu-vllm-site}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
MODELS=${MODELS:-/tmp/sq-models}
STAGES=${STAGES:-install,check}
PRESET=${PRESET:-spectralquant_sq3bit}
stage() { [[ ",$STAGES," == *",$1,"* ]]; }
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_issue13.log"; }
if stage install; then
  log "install"
  bash gpu-vllm-dist/install.sh "$GPU_VLLM_SITE" > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$GPU_VLLM_SITE" .device-carry/wheel/*.whl
fi
# shellcheck disable=SC1091
source gpu-vllm-dist/env.sh
if stage install; then
  t0=$(date +%s)
  python3 -m vllm_spectralquant.ops.cuda_ext --build >> "$OUT/gpu_issue13.log" 2>&1 || log "CUDA extension build FAILED"
  log "CUDA extension ready in $(( $(date +%s) - t0 ))s"
fi
if stage check; then
  log "kernel-level check"
  timeout 240 python3 bench/gpu_prefill_check.py --out "$OUT/gpu_prefill_check.json" 2>&1 | tee -a "$OUT/gpu_issue13.log"
fi
if stage models; then
  log "models: ${SHAPES:-llama8b_128k}"
  timeout 300 python3 bench/gpu_models.py "$MODELS" --shapes ${SHAPES:-llama8b_128k} --layers "${LLAMA_LAYERS:-8}" \
    >> "$OUT/gpu_issue13.log" 2>&1 || log "models FAILED"
  cat "$MODELS/models.json" >> "$OUT/gpu_issue13.log"
fi
if stage long; then
  log "long prompt"
  timeout "${LONG_TIMEOUT:-420}" python3 bench/long_prompt.py --model "$MODELS/llama8b_128k-L${LLAMA_LAYERS:-8}-random" \
    --configs auto "$PRESET" --prompt-tokens "${PROMPT_TOKENS:-130000}" --kv-cache-bytes "${KV_BYTES:-17179869184}" \
    --out "$OUT/long_prompt.json" 2>&1 | grep -v "it/s\]" | tail -40 | tee -a "$OUT/gpu_issue13.log"
fi
if stage spec; then
  log "speculative decoding"
  timeout "${SPEC_TIMEOUT:-420}" python3 bench/spec_decode.py --model "$MODELS/smollm2-L30-random" --configs "$PRESET" ${SPEC_BASELINE:-auto} \
    --prompts "${SPEC_PROMPTS:-32}" --out "$OUT/spec_decode.json" 2>&1 | grep -v "it/s\]" | tail -40 | tee -a "$OUT/gpu_issue13.log"
fi
log "done"
