#!/usr/bin/env python3
"""Attention fidelity on a real model: SpectralQuant presets vs the TurboQuant layout at equal bytes.

Captures post-RoPE Q/K/V with transformers on the corpus (default: lee_background), fits the
SpectralQuant parameters on windows of the first half, and measures on windows of the held-out
second half: the relative error and cosine of every layer's attention output with the model's
real queries, K/V decoded from the packed format (first ``--sink-tokens`` positions exact, as
in the paged cache) against exact K/V. The TQ layout's K/V byte split is chosen per budget on
calibration windows (the best of a few splits: generous to the baseline).

    python bench/attention_fidelity.py [--model DIR] [--corpus FILE] [--out JSON]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from vllm_spectralquant.calibrate.fit import DEFAULT_KEY_WEIGHT
from vllm_spectralquant.calibrate.pipeline import collect_in_process, fit_model
from vllm_spectralquant.corpus import read_corpus, split_halves, split_windows, tokenize_corpus
from vllm_spectralquant.files import write_atomic
from vllm_spectralquant.fidelity import FidelityAccumulator, causal_attention, roundtrip_kv
from vllm_spectralquant.format import PRESETS, turboquant_codec
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.models.capture import load_model, run_with_capture
from vllm_spectralquant.models.example_model import ensure_example_model
from vllm_spectralquant.models.shape import ModelShape

TIERS = ("2_5bit", "3bit", "4bit")


def evaluate(model, windows, configs: dict[str, tuple[list[LayerCodec], int]], shape: ModelShape, batch_size=2):
    """Accumulate fidelity of every config {key: (codec per layer, sink_tokens)} over windows [N, T]."""
    acc = {key: FidelityAccumulator(shape.num_layers, shape.num_kv_heads) for key in configs}

    def on_qkv(layer, q, k, v):
        for b in range(q.shape[0]):
            ref = causal_attention(q[b], k[b], v[b], shape.softmax_scale)
            for key, (codecs, sinks) in configs.items():
                kh, vh = roundtrip_kv(k[b], v[b], codecs[layer], sinks)
                acc[key].add(layer, ref, causal_attention(q[b], kh, vh, shape.softmax_scale))

    for start in range(0, windows.shape[0], batch_size):
        run_with_capture(model, windows[start : start + batch_size], on_qkv)
    return acc


def best_tq_split(model, windows, tier, shape, sinks) -> int:
    """Key bytes of the TQ layout at this tier with the lowest mean attention error on ``windows``."""
    preset = PRESETS[f"tq{tier}"]
    data = preset.data_bytes(shape.head_dim)
    groups = shape.head_dim // 8
    candidates = sorted({min(max(data // 2 + delta, groups), data - groups) for delta in (-groups, -groups // 2, 0, groups // 2, groups)})
    configs = {kb: ([turboquant_codec(preset, shape.head_dim, shape.num_kv_heads, key_bytes=kb)] * shape.num_layers, sinks) for kb in candidates}
    acc = evaluate(model, windows, configs, shape)
    return min(candidates, key=lambda kb: acc[kb].rel_err().mean().item())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--corpus", type=Path, help="UTF-8 text file or folder (default: lee_background)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention_fidelity.json")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--sink-tokens", type=int, default=1, help="exact tokens at the start of each sequence")
    ap.add_argument("--key-weight", type=float, default=DEFAULT_KEY_WEIGHT,
                    help=f"keys' bit-allocation weight vs values (default: {DEFAULT_KEY_WEIGHT}, as `spectralquant calibrate`)")
    ap.add_argument("--ablations", action="store_true", help="also report every method without sink protection")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.manual_seed(0)
    model_dir = args.model or ensure_example_model()
    model, tok = load_model(model_dir)
    shape = ModelShape.from_config(model.config)
    ids = tokenize_corpus(tok, read_corpus(args.corpus))
    calib_ids, eval_ids = split_halves(ids)
    calib = split_windows(calib_ids, args.window, args.calib_windows)
    held_out = split_windows(eval_ids, args.window, args.eval_windows)
    print(f"model {model_dir.name}: {shape.num_layers} layers, {shape.num_heads}/{shape.num_kv_heads} heads, head_dim {shape.head_dim}")
    print(f"corpus {ids.numel()} tokens; calibration {calib.numel()} tokens, held-out {held_out.numel()} tokens")

    sq_presets = [PRESETS[f"sq{t}"] for t in TIERS]
    stats = collect_in_process(model, calib, [0] * calib.shape[0], sample_stride=1)
    fit = fit_model(stats, shape, sq_presets, key_weight_scale=args.key_weight)
    t_fit = time.time() - t0
    print(f"fitted {len(sq_presets)} presets in {t_fit:.0f}s")

    sink_variants = [args.sink_tokens] + ([0] if args.ablations and args.sink_tokens else [])
    configs: dict[tuple, tuple[list[LayerCodec], int]] = {}
    tq_split = {}
    for tier in TIERS:
        tq = PRESETS[f"tq{tier}"]
        tq_split[tier] = best_tq_split(model, calib[:4], tier, shape, args.sink_tokens)
        tq_codecs = [turboquant_codec(tq, shape.head_dim, shape.num_kv_heads, key_bytes=tq_split[tier])] * shape.num_layers
        for sinks in sink_variants:
            configs[("spectralquant", f"sq{tier}", sinks)] = (fit.codecs[f"sq{tier}"], sinks)
            configs[("turboquant", tq.name, sinks)] = (tq_codecs, sinks)
    acc = evaluate(model, held_out, configs, shape)

    results = []
    for (method, name, sinks), a in acc.items():
        p = PRESETS[name]
        rel, cos = a.rel_err(), a.mean_cos()
        row = {
            "method": method,
            "preset": name,
            "bytes_per_head_token": p.slot_bytes(shape.head_dim),
            "compression_vs_bf16": round(p.compression_vs_bf16(shape.head_dim), 3),
            "sink_tokens": sinks,
            "attn_rel_err": round(rel.mean().item(), 5),
            "attn_cos": round(cos.mean().item(), 5),
            "per_layer": {"attn_rel_err": [round(x, 5) for x in rel.mean(1).tolist()], "attn_cos": [round(x, 5) for x in cos.mean(1).tolist()]},
        }
        if method == "turboquant":
            row["key_code_bytes"] = tq_split[p.tier]
        results.append(row)

    print(f"\n{'method':<14} {'preset':<9} {'bytes':>5} {'sinks':>5} {'attn rel err':>12} {'attn cos':>9}")
    for r in sorted(results, key=lambda r: (r["bytes_per_head_token"], -r["sink_tokens"], r["method"])):
        print(f"{r['method']:<14} {r['preset']:<9} {r['bytes_per_head_token']:>5} {r['sink_tokens']:>5} {r['attn_rel_err']:>12.4f} {r['attn_cos']:>9.4f}")
    out = {
        "model": model_dir.name,
        "date": datetime.date.today().isoformat(),
        "corpus": str(args.corpus or "lee_background"),
        "window": args.window,
        "calib_tokens": int(calib.numel()),
        "eval_tokens": int(held_out.numel()),
        "head_dim": shape.head_dim,
        "key_weight": args.key_weight,
        "sink_tokens": args.sink_tokens,
        "seconds": round(time.time() - t0, 1),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(out, indent=2).encode())
    print(f"\nwrote {args.out} ({out['seconds']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
