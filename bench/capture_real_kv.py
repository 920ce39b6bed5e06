#!/usr/bin/env python3
"""Post-RoPE K/V of a real model on the eval's held-out windows, saved for GPU checks that cannot load the model.

The GPU machine takes at most 64 MiB per call and has no model weights, so checks of vLLM's own kernels on
real K/V (``bench/gpu_emulation_check.py --kv-file``) get them from this file: per layer ``layer{i}.w{j}.key``
/ ``.value``, bf16 [T, H_kv, D], for held-out window j (the windows ``spectralquant eval`` scores, cut the same
way: second half of the corpus, ``--window-tokens`` each, the tokenizer's leading special token first).

    python bench/capture_real_kv.py --model $M --windows 0 3 --tokens 512 --out /tmp/qwen_kv.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import save_file

    from vllm_spectralquant.corpus import held_out, read_corpus
    from vllm_spectralquant.models.capture import load_model, run_with_capture

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--windows", type=int, nargs="+", default=[0])
    ap.add_argument("--window-tokens", type=int, default=512, help="eval window length (its --quick default)")
    ap.add_argument("--tokens", type=int, default=512, help="leading tokens of each window to keep")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)

    model, tok = load_model(args.model, dtype=torch.float32, device=torch.device("cpu"))
    windows = held_out(tok, read_corpus(None)).windows(args.window_tokens, max(args.windows) + 1)
    tensors: dict[str, torch.Tensor] = {}
    for j in args.windows:
        x = torch.tensor(windows[j])[: args.tokens][None]

        def keep(layer, q, k, v, j=j):
            tensors[f"layer{layer}.w{j}.key"] = k[0].to(torch.bfloat16).contiguous()
            tensors[f"layer{layer}.w{j}.value"] = v[0].to(torch.bfloat16).contiguous()

        run_with_capture(model, x, keep, return_logits=False)
    meta = {"model": args.model.name, "windows": json.dumps(args.windows), "tokens": str(args.tokens),
            "window_tokens": str(args.window_tokens)}
    tmp = args.out.with_name(args.out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(args.out)
    mib = args.out.stat().st_size / 2**20
    print(f"wrote {args.out}: {len(tensors) // 2} layer-windows, {mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
