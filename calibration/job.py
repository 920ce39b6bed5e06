#!/usr/bin/env python3
"""Calibration as a Ray job. The library does the work; this file only reads a config.

    ray job submit --working-dir calibration -- python job.py --config sample_config.yaml
    python calibration/job.py --config calibration/sample_config.yaml --ray-address local   # without a cluster

The cluster's Python environment needs vllm-spectralquant with its calibrate extra installed (e.g.
`pip install "vllm-spectralquant[calibrate]"` in the image, or
`--runtime-env-json '{"pip": ["vllm-spectralquant[calibrate]"]}'`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate

FIELDS = {"model_dir", "out_dir", "corpus", "tokens", "window", "max_position", "presets", "num_workers", "overwrite", "device", "batch_size"}


def load_config(path: Path, overrides: dict) -> CalibrationConfig:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise SystemExit(f"{path}: expected a mapping of options, got {type(raw).__name__}")
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        raise SystemExit(f"{path}: unknown options {unknown}; known: {sorted(FIELDS)}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if "model_dir" not in raw:
        raise SystemExit(f"{path}: model_dir is required")
    return CalibrationConfig(**raw)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=Path(__file__).with_name("sample_config.yaml"))
    ap.add_argument("--model-dir", help="override model_dir")
    ap.add_argument("--out-dir", help="override out_dir")
    ap.add_argument("--num-workers", type=int, help="override num_workers")
    ap.add_argument("--ray-address", default="auto", help="auto (inside `ray job submit`, the default), local, or HOST:PORT")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, {"model_dir": args.model_dir, "out_dir": args.out_dir, "num_workers": args.num_workers})
    cfg.ray_address = None if args.ray_address == "local" else args.ray_address
    if cfg.ray_address is None and cfg.num_workers < 2:
        cfg.num_workers = 2  # `local` means a local Ray cluster, so use at least two workers
    last = [0.0]

    def reporter(what: str, unit: str):
        def report(done: int, total: int) -> None:
            if time.monotonic() - last[0] > 10 or done == total:  # job logs: a line every 10 s
                last[0] = time.monotonic()
                print(f"{what}: {done}/{total} {unit}", flush=True)

        return report

    result = calibrate(cfg, progress=reporter("calibration", "tokens"), gain_progress=reporter("key gains", "forward passes"))
    print(f"artifact: {result.artifact} ({result.tokens} tokens, {result.seconds['total']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
