#!/usr/bin/env bash
# vLLM's own int4_per_token_head and TurboQuant stores on a real model's K/V (GPU machine).
#
# The GPU machine has no model weights; bench/capture_real_kv.py writes the K/V here first (CPU):
#   python bench/capture_real_kv.py --model $M --windows 0 3 --tokens 256 --out .device-carry/qwen_kv.safetensors
# then, carrying gpu-vllm-dist and that file:
#   OUT=$OUT bash bench/gpu_real_kv_check.sh [.device-carry/qwen_kv.safetensors]
# It installs the python-only vLLM 0.33 (gpu-vllm-dist), runs bench/gpu_emulation_check.py --kv-file
# (every layer-window through vLLM's store + dequant, compared with our emulation and with the input),
# and leaves the JSON and log in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
KV=${1:-.device-carry/qwen_kv.safetensors}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 VLLM_NO_USAGE_STATS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
bash gpu-vllm-dist/install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 3; }
source gpu-vllm-dist/env.sh
python3 bench/gpu_emulation_check.py --kv-file "$KV" --budget-s "${BUDGET_S:-240}" --out "$OUT/gpu_real_kv_check.json" 2>&1 \
    | tee "$OUT/gpu_real_kv_check.log"
exit "${PIPESTATUS[0]}"
