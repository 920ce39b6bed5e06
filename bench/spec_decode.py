#!/usr/bin/env python3
"""Speculative decoding (ngram) on the GPU with FULL decode CUDA graphs: greedy equality + acceptance.

For each kv-cache dtype: one `vllm serve` without and one with ``--speculative-config`` (ngram,
``--k`` draft tokens), same options, CUDA graphs on (FULL_DECODE_ONLY); the same prompts, one
request at a time (so both runs see the same batch shapes), greedy. Reports identical outputs,
draft acceptance, the CUDA-graph mode vLLM chose and the wall time per request.

    python bench/spec_decode.py --model DIR --configs spectralquant_sq3bit auto --out spec_decode.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gpu_check import GRAPHS, cudagraph_mode

from vllm_spectralquant.evaluation.metrics import greedy_token_ids
from vllm_spectralquant.evaluation.speculation import acceptance, first_difference, speculation_prompts
from vllm_spectralquant.serving import ServerOptions, VllmServer


def run(model: Path, kv: str, prompts, tokens: int, spec: dict | None, log_dir: Path) -> dict:
    extra = list(GRAPHS) + (["--speculative-config", json.dumps(spec)] if spec else [])
    opts = ServerOptions(model, kv, dtype="bfloat16", max_model_len=2048, max_num_batched_tokens=512, max_num_seqs=8,
                         enforce_eager=False, extra_args=extra)  # fmt: skip
    log = log_dir / f"serve-{kv}-{'spec' if spec else 'plain'}.log"
    print(f"starting {kv} {'with' if spec else 'without'} speculation (log {log})", flush=True)
    with VllmServer(opts, startup_timeout=900, log_path=log) as srv:
        client = srv.client()
        greedy_token_ids(client, prompts[0], 4)  # warm-up
        t = time.perf_counter()
        outs = [greedy_token_ids(client, p, tokens) for p in prompts]
        wall = time.perf_counter() - t
        drafts, accepted = acceptance(srv)
        print(f"  {len(prompts)} requests in {wall:.1f}s, drafts {drafts:.0f}, accepted {accepted:.0f}", flush=True)
        return {"outputs": outs, "drafts": drafts, "accepted": accepted, "cudagraph_mode": cudagraph_mode(srv.log()),
                "s_per_request": round(wall / len(prompts), 3)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--configs", nargs="+", default=["spectralquant_sq3bit", "auto"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=3, help="draft tokens per step")
    ap.add_argument("--out", type=Path, default=Path("spec_decode.json"))
    args = ap.parse_args(argv)
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(" ".join(topics[k] for k in sorted(topics)), add_special_tokens=False)["input_ids"]
    prompts = speculation_prompts(ids[2000:], args.prompts)
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    rows = []
    for kv in args.configs:
        plain = run(args.model, kv, prompts, args.tokens, None, args.out.parent)
        spec_run = run(args.model, kv, prompts, args.tokens, spec, args.out.parent)
        diffs = [first_difference(a, b) for a, b in zip(plain["outputs"], spec_run["outputs"])]
        row = {
            "kv_cache_dtype": kv, "prompts": len(prompts), "tokens": args.tokens, "k": args.k,
            "identical": sum(d is None for d in diffs), "first_differences": [d for d in diffs if d is not None],
            "drafts": spec_run["drafts"], "accepted": spec_run["accepted"],
            "acceptance_rate": round(spec_run["accepted"] / spec_run["drafts"], 3) if spec_run["drafts"] else None,
            "cudagraph_mode_plain": plain["cudagraph_mode"], "cudagraph_mode_spec": spec_run["cudagraph_mode"],
            "s_per_request_plain": plain["s_per_request"], "s_per_request_spec": spec_run["s_per_request"],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=1))
    return 0 if all(r["identical"] == r["prompts"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
