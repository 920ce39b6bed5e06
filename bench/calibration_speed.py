#!/usr/bin/env python3
"""Calibration speed: `spectralquant calibrate` on a model (default: the embedded SmolLM2-135M).

Prints the wall time split (model forward vs statistics vs fit vs writing) and writes
bench/results/calibration_speed.json. Goal (issue 3): SmolLM2-135M, 32k tokens, 2 CPU cores, <= 120 s.

    python bench/calibration_speed.py [--model DIR] [--tokens 32768] [--num-workers 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate
from vllm_spectralquant.models.example_model import ensure_example_model


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration_speed.json")
    args = ap.parse_args(argv)
    model_dir = args.model or ensure_example_model()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = calibrate(CalibrationConfig(model_dir=model_dir, out_dir=Path(tmp) / "art", tokens=args.tokens, num_workers=args.num_workers))
        wall = time.perf_counter() - started
    s = result.seconds
    row = {
        "model": model_dir.name,
        "tokens": result.tokens,
        "num_workers": args.num_workers,
        "wall_s": round(wall, 1),
        "load_s": round(s["load"], 1),
        "collect_s": round(s["collect"], 1),
        "forward_s": round(s["forward"], 1),
        "statistics_s": round(s["statistics"], 1),
        "fit_s": round(s["fit"], 1),
        "write_s": round(s["write"], 1),
        "tokens_per_s": round(result.tokens / s["collect"], 1),
    }
    print(f"{'stage':<12} {'seconds':>8}")
    for k in ("load_s", "forward_s", "statistics_s", "collect_s", "fit_s", "write_s", "wall_s"):
        print(f"{k[:-2]:<12} {row[k]:>8.1f}")
    print(f"{result.tokens} tokens, {row['tokens_per_s']} tokens/s during collection")
    out = {
        "device": f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "date": datetime.date.today().isoformat(),
        "results": [row],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
