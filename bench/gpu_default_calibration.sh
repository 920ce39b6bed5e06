#!/usr/bin/env bash
# The default calibration (the key-gain choice included, calibrate/key_gain.py) on the GPU machine, on
# the synthetic models of bench/gpu_models.py (random weights: a check of the CUDA path and its time,
# never a quality claim). Needs no vLLM; the wheels the machine lacks (pydantic, rich, matplotlib and
# their dependencies) are carried in .device-carry/pywheels/ (pip download for CPython 3.12, x86_64).
#
#   bash bench/gpu_default_calibration.sh          (results in $OUT: log, reports, JSON summary)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-default-calibration}
mkdir -p "$OUT"
SITE=/tmp/sq-calib-site
python3 -m pip install -q --no-index --no-deps --target "$SITE" .device-carry/pywheels/*.whl > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 3; }
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 SPECTRALQUANT_HOME=/tmp/spectralquant-home
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/log.txt"
timeout "${CALIB_TIMEOUT:-480}" python3 bench/gpu_models.py /tmp/sq-models --shapes ${SHAPES:-smollm2 llama8b} --layers 8 \
  2>&1 | grep -v "it/s\]" | tee -a "$OUT/log.txt"
python3 - "$OUT" <<'PY'
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1]); rows = {}
for m in sorted(pathlib.Path("/tmp/sq-models").glob("*-random")):
    rep = (m / "spectralquant" / "report.md").read_text()
    (out / f"report-{m.name}.md").write_text(rep)
    man = json.loads((m / "spectralquant" / "manifest.json").read_text())
    rows[m.name] = {"timings": re.search(r"\*\*Timings\*\*: (.*)", rep).group(1),
                    "gains": {p["name"]: [p["key_gain"], p["key_gain_chosen_on"]] for p in man["presets"]},
                    "choices": re.findall(r"^- `(sq\w+)`: (gain .*)$", rep, re.M)}
    print(m.name, json.dumps(rows[m.name], indent=1))
(out / "summary.json").write_text(json.dumps(rows, indent=1))
PY
