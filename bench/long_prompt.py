#!/usr/bin/env python3
"""One long prompt per cache config: peak GPU memory and time to first token (issue 13).

For each kv-cache dtype, one `vllm serve` with the same options and the same KV-cache size in bytes
(``--kv-cache-memory-bytes``: the cache is allocated up front, so the peak shows only what the
prefill adds), then one streaming completion of ``--prompt-tokens`` token ids. GPU memory is polled
with nvidia-smi (what the process holds, the caching allocator's reserve included: what an
out-of-memory depends on) every 50 ms from before the request to its end.

    python bench/long_prompt.py --model DIR --configs auto spectralquant_sq3bit --prompt-tokens 130000 \\
        --kv-cache-bytes 17179869184 --out long_prompt.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from pathlib import Path

from vllm_spectralquant.serving import ServerOptions, VllmServer

GRAPHS = ["--compilation-config", json.dumps({"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"})]


def gpu_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(out.split()[0])


class MemoryPoll:
    """Max of nvidia-smi's used memory while running."""

    def __init__(self, period: float = 0.05):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def __enter__(self):
        self.start_mib = gpu_used_mib()
        self.peak = self.start_mib
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, gpu_used_mib())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, gpu_used_mib())


def one_config(model: Path, kv: str, prompt: list[int], kv_bytes: int, chunk: int, max_len: int, output_tokens: int,
               log_dir: Path) -> dict:
    extra = GRAPHS + ["--kv-cache-memory-bytes", str(kv_bytes)]
    opts = ServerOptions(model, kv, dtype="bfloat16", max_model_len=max_len, max_num_batched_tokens=chunk, max_num_seqs=4,
                         enforce_eager=False, enable_prefix_caching=False, extra_args=extra)  # fmt: skip
    row: dict = {"kv_cache_dtype": kv}
    srv = VllmServer(opts, startup_timeout=900, log_path=log_dir / f"serve-long-{kv}.log")
    try:
        with srv:
            row["kv_capacity_tokens"] = srv.kv_capacity_tokens()
            client = srv.client(timeout=3600)
            with MemoryPoll() as mem:
                start = time.perf_counter()
                stamps = []
                stream = client.completions.create(model="model", prompt=prompt, max_tokens=output_tokens, temperature=0.0, stream=True,
                                                   extra_body={"ignore_eos": True})  # fmt: skip
                for ch in stream:
                    if ch.choices and ch.choices[0].text is not None:
                        stamps.append(time.perf_counter())
            row.update(
                ttft_s=round(stamps[0] - start, 2) if stamps else None,
                tokens=len(stamps),
                tpot_ms=round((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3, 2) if len(stamps) > 1 else None,
                gpu_mib_before=mem.start_mib,
                gpu_mib_peak=mem.peak,
                prefill_extra_mib=mem.peak - mem.start_mib,
                ok=bool(stamps) and srv.healthy(),
            )
    except Exception as e:  # a crash or OOM is a result here, reported next to the others
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-400:]}", server_log_tail=srv.log_tail(60))
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=130000)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=2048, help="--max-num-batched-tokens (the prefill chunk)")
    ap.add_argument("--kv-cache-bytes", type=int, default=16 << 30)
    ap.add_argument("--out", type=Path, default=Path("long_prompt.json"))
    args = ap.parse_args(argv)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    # Deterministic ids away from special tokens; no repeats that prefix caching could share.
    prompt = [(1000 + 7919 * j) % (vocab - 2000) + 1000 for j in range(args.prompt_tokens)]
    max_len = args.prompt_tokens + args.output_tokens + 16
    rows = [one_config(args.model, kv, prompt, args.kv_cache_bytes, args.chunk, max_len, args.output_tokens, args.out.parent)
            for kv in args.configs]
    args.out.write_text(json.dumps({"model": str(args.model), "prompt_tokens": args.prompt_tokens, "chunk": args.chunk,
                                    "kv_cache_bytes": args.kv_cache_bytes, "rows": rows}, indent=1))  # fmt: skip
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
