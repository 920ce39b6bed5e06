#!/usr/bin/env python3
"""Serving throughput side by side: vLLM's own cache vs TURBOQUANT vs every SpectralQuant preset.

For each config a `vllm serve` is started on 127.0.0.1 and a workload of concurrent streaming
requests is sent (fixed prompt length, fixed output length, EOS ignored). Per config and workload:
vLLM's KV capacity (tokens, from its startup log), output tokens/s, TPOT p50/p99 and TTFT p50.

    python bench/serving.py --model DIR --configs auto spectralquant_sq3bit ... \
        --workload chat:8:64:128 [--workload long:32:8192:256] [--server-arg=--load-format=dummy]

A workload is NAME:BATCH:PROMPT_TOKENS:OUTPUT_TOKENS (BATCH 0 = the largest batch the cache holds).
Writes bench/results/serving.json (merged with earlier rows of other model shapes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_spectralquant.serving import ServerOptions, VllmServer

def backend_name(kv_cache_dtype: str, platform: str) -> str:
    if kv_cache_dtype.startswith("spectralquant_"):
        return "SPECTRALQUANT"
    if kv_cache_dtype.startswith("turboquant_"):
        return "TURBOQUANT"
    return "CPU_ATTN" if platform == "cpu" else "TRITON_ATTN"


def stream_one(client, prompt_ids: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps = []
    stream = client.completions.create(
        model="model", prompt=prompt_ids, max_tokens=max_tokens, temperature=0.0, stream=True,
        extra_body={"ignore_eos": True, "min_tokens": max_tokens},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text is not None:
            stamps.append(time.perf_counter())
    ttft = stamps[0] - start if stamps else float("nan")
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {"tokens": len(stamps), "ttft": ttft, "tpot": tpot, "end": stamps[-1] if stamps else start, "start": start}


def run_workload(server: VllmServer, batch: int, prompt_tokens: int, output_tokens: int, vocab: int) -> dict:
    client = server.client(timeout=3600)
    # Distinct prompts (no prefix sharing), deterministic token ids away from special tokens.
    prompts = [[(1000 + 7919 * (i * prompt_tokens + j)) % (vocab - 2000) + 1000 for j in range(prompt_tokens)] for i in range(batch)]
    stream_one(client, prompts[0][:16], 4)  # warm-up
    with ThreadPoolExecutor(max_workers=batch) as pool:
        rows = list(pool.map(lambda p: stream_one(client, p, output_tokens), prompts))
    wall = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    tpots = sorted(r["tpot"] * 1e3 for r in rows)
    return {
        "batch": batch,
        "output_tokens_per_s": round(sum(r["tokens"] for r in rows) / wall, 2),
        "tpot_p50_ms": round(statistics.median(tpots), 2),
        "tpot_p99_ms": round(tpots[min(len(tpots) - 1, int(0.99 * len(tpots)))], 2),
        "ttft_p50_ms": round(statistics.median(r["ttft"] for r in rows) * 1e3, 1),
        "wall_s": round(wall, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--model-shape", help="label for the results (default: the model folder's name)")
    ap.add_argument("--configs", nargs="+", required=True, help="kv-cache dtypes: auto, turboquant_*, spectralquant_*")
    ap.add_argument("--workload", action="append", required=True, help="NAME:BATCH:PROMPT:OUTPUT")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="CPU only (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serving.json")
    ap.add_argument("--device", default="cpu", help="label: cpu, or the GPU's name")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="FULL decode CUDA graphs, no torch.compile (default: --enforce-eager)")
    args = ap.parse_args(argv)
    platform = "cpu" if args.device == "cpu" else "cuda"
    config = json.loads((args.model / "config.json").read_text())
    vocab = config.get("vocab_size", 32000)
    shape = args.model_shape or args.model.name
    rows = []
    for kv in args.configs:
        extra = list(args.server_arg)
        if args.cuda_graphs:
            extra += ["--compilation-config", json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})]
        opts = ServerOptions(args.model, kv, dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                             enable_prefix_caching=False, enforce_eager=not args.cuda_graphs, extra_args=extra)
        with VllmServer(opts) as server:
            capacity = server.kv_capacity_tokens()
            for spec in args.workload:
                name, batch, prompt, output = spec.split(":")
                batch, prompt, output = int(batch), int(prompt), int(output)
                if batch == 0:  # the largest batch this cache holds at this sequence length
                    batch = max(1, min(256, capacity // (prompt + output)))
                res = run_workload(server, batch, prompt, output, vocab)
                row = {"backend": backend_name(kv, platform), "kv_cache_dtype": kv, "model_shape": shape, "workload": name,
                       "prompt_tokens": prompt, "output_tokens": output, "kv_capacity_tokens": capacity, **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
    old = json.loads(args.out.read_text()).get("results", []) if args.out.exists() else []
    keep = [r for r in old if not (r.get("model_shape") == shape and r.get("device", args.device) == args.device)]
    out = {"device": args.device, "date": datetime.date.today().isoformat(), "results": keep + [dict(r, device=args.device) for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\n{'kv cache':<26} {'workload':<8} {'batch':>5} {'capacity':>9} {'tok/s':>8} {'TPOT p50':>9} {'TPOT p99':>9} {'TTFT p50':>9}")
    for r in rows:
        print(f"{r['kv_cache_dtype']:<26} {r['workload']:<8} {r['batch']:>5} {r['kv_capacity_tokens']:>9} {r['output_tokens_per_s']:>8.1f} "
              f"{r['tpot_p50_ms']:>9.1f} {r['tpot_p99_ms']:>9.1f} {r['ttft_p50_ms']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
