#!/usr/bin/env python3
"""Synthetic models for GPU runs: real model shapes, seeded random weights, calibrated in the same run.

No model weights can reach the GPU machine (64 MiB per call), so performance runs there use models
with random weights saved as a normal Hugging Face folder (vLLM loads them like any checkpoint),
and the SpectralQuant artifact is calibrated from that same model, on the GPU, before serving.
These artifacts are for speed and functional checks only, never for quality claims.

    python bench/gpu_models.py OUT_DIR [--shapes smollm2 llama8b] [--layers 8] [--tokenizer DIR]

Shapes: ``smollm2`` (30 layers, 9/3 heads, head_dim 64, SmolLM2-135M's config) and ``llama8b``
(Llama-3.1-8B: 32/8 heads, head_dim 128, hidden 4096, MLP 14336; ``--layers`` of them).
The tokenizer (default: the SmolLM2 tokenizer files next to this script's repo, carried in
bench/assets/) sets the vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        num_hidden_layers=30, rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "llama8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        num_hidden_layers=32, rope_theta=500000.0, max_position_embeddings=40960, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}
# Llama-3.1-8B's own context (128k tokens) for long-prompt runs.
SHAPES["llama8b_128k"] = dict(SHAPES["llama8b"], max_position_embeddings=131072 + 4096)


def corpus_file(out: Path) -> Path:
    """English text with no download: Python's own documentation topics."""
    from pydoc_data.topics import topics

    path = out / "corpus.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


def make_model(name: str, out: Path, tokenizer_dir: Path, layers: int | None, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(SHAPES[name])
    if layers:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = out / f"{name}-L{shape['num_hidden_layers']}-random"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shapes", nargs="+", default=["smollm2", "llama8b"], choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=8, help="layers of the llama8b shape (default 8)")
    ap.add_argument("--tokenizer", type=Path, default=Path(__file__).parent / "assets" / "smollm2-tokenizer")
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens")
    args = ap.parse_args(argv)
    from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate

    args.out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_file(args.out)
    made = {}
    for name in args.shapes:
        t0 = time.time()
        path = make_model(name, args.out, args.tokenizer, args.layers if name.startswith("llama8b") else None)
        cfg = json.loads((path / "config.json").read_text())
        res = calibrate(CalibrationConfig(model_dir=path, corpus=corpus, tokens=args.tokens, window=512,
                                          max_position=min(cfg["max_position_embeddings"], 32768), overwrite=True))
        made[name] = str(path)
        print(f"{name}: {path} calibrated ({res.tokens} tokens) in {time.time() - t0:.0f}s", flush=True)
    (args.out / "models.json").write_text(json.dumps(made, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
