#!/usr/bin/env python3
"""The calibration-time key-gain choice (calibrate/key_gain.py) on an existing artifact's codes.

Runs ``choose_key_gains`` on the windows ``spectralquant calibrate`` would choose on (the calibration text
cut into ``--window-tokens`` windows at position 0, ``--windows`` of them evenly spaced, in calibration's
order; ``--window-tokens 0``: the calibration's own windows at their offsets, as before the fifteenth
session) with the artifact's codecs (their recorded gains ignored), prints each preset's per-candidate
paired loss change and the gain chosen, and writes JSON.

    python bench/key_gain_choice.py --model DIR [--windows 4] [--window-tokens 1024] [--tokens 16384] [--every-window] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from vllm_spectralquant.artifact.store import default_artifact_dir, load_artifact
from vllm_spectralquant.calibrate.job import CalibrationConfig, gain_windows, model_context, prepare_windows, spread_pick
from vllm_spectralquant.calibrate.key_gain import GAIN_WINDOW_TOKENS, GAIN_WINDOWS, LOOK_EVERY, choose_key_gains
from vllm_spectralquant.corpus import leading_special_token
from vllm_spectralquant.files import write_atomic
from vllm_spectralquant.models.capture import load_model
from vllm_spectralquant.models.shape import ModelShape


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--artifact", type=Path)
    ap.add_argument("--tokens", type=int, default=16384, help="the calibration's --tokens (which windows it reads)")
    ap.add_argument("--windows", type=int, default=GAIN_WINDOWS)
    ap.add_argument("--presets", nargs="+", default=["sq2_5bit", "sq3bit", "sq4bit"])
    ap.add_argument("--at-position-zero", action="store_true", help="run every window at positions 0..T-1 (as the eval's)")
    ap.add_argument("--window-tokens", type=int, default=GAIN_WINDOW_TOKENS,
                    help="the calibration text cut into windows this long, each at positions 0..T-1, as calibration "
                         "does (default: %(default)s); 0: the calibration's own windows at their offsets")
    ap.add_argument("--every-window", action="store_true",
                    help="score every candidate on every window (calibration drops clear losers every %d)" % LOOK_EVERY)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    t0 = time.time()
    model, tok = load_model(args.model, dtype=torch.float32)
    shape = ModelShape.from_config(model.config)
    windows, offsets, _ = prepare_windows(CalibrationConfig(model_dir=args.model, tokens=args.tokens), tok, model_context(shape))
    if args.window_tokens:  # what calibration now does: the text cut again, each window from position 0
        w = gain_windows(windows, args.windows, args.window_tokens, leading_special_token(tok))
        o = [0] * w.shape[0]
    else:  # the calibration's own windows at their offsets (the thirteenth and fourteenth sessions' choice)
        pick = spread_pick(windows.shape[0], args.windows)
        w, o = windows[pick], [offsets[i] for i in pick]
    if args.at_position_zero:
        o = [0] * len(o)
    art = load_artifact(args.artifact or default_artifact_dir(args.model), presets=args.presets)
    codecs = {p: [art.layer_codec(p, i) for i in range(shape.num_layers)] for p in args.presets}
    sinks = art.manifest.sinks.tokens if art.manifest.sinks else 1
    choices = choose_key_gains(model, w, o, codecs, sink_tokens=sinks, look_every=0 if args.every_window else LOOK_EVERY)
    out = {"model": args.model.name, "date": datetime.date.today().isoformat(), "windows": len(w), "window_tokens": w.shape[1], "offsets": o, "sink_tokens": sinks,
           "presets": {}}
    for name, c in choices.items():
        print(f"{name}: {c.describe()}", flush=True)
        out["presets"][name] = {"gains": c.gains, "loss": c.loss, "chosen": c.gain,
                                "paired_mean_se": [c.paired(i) for i in range(1, len(c.gains))]}
    out["seconds"] = round(time.time() - t0, 1)
    print(f"{out['seconds']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_atomic(args.out, json.dumps(out, indent=1).encode())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
