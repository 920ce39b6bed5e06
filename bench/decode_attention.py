"""Decode-attention speed on the packed paged cache vs bf16 SDPA-flash (GPU).

    python bench/decode_attention.py --out bench/results/decode_attention.json
    TRITON_INTERPRET=1 python bench/decode_attention.py --dry-run      # CPU rehearsal (tiny, Triton only)

Grid: batch {1, 8, 32, 64} x context {1k, 4k, 16k, 32k} x (head_dim 128, 32 query / 8 KV heads) and
(head_dim 64, 9 / 3 heads); one query token per sequence. For every preset (SpectralQuant and the
TQ layout at equal bytes) our CUDA and Triton decode; the baseline is torch SDPA with the flash
backend on bf16 K/V [B, H, L, D] (``enable_gqa=True``: native GQA, no expanded copies). Also times
``store_kv`` of one new token per sequence (what each decode step adds).

Times: ``triton.testing.do_bench`` median (CUDA events; it flushes L2 before every run), inputs
rotated over several sets when one set is smaller than ~256 MB. By default every call is captured
once per input set as a CUDA graph and the graphs are replayed, as vLLM replays decode (``--eager``
times the Python calls instead, host overhead included). ``--codecs sorted`` gives each head's key and
value groups the same random bit multiset sorted widest first, as a calibration's importance order
does. Achieved bandwidth is also given as a fraction of the device-to-device copy bandwidth measured
at the start of the same run.
Caches hold random codes with valid fp16 token fields and a zeroed sink spill (speed does not depend
on the values; correctness is bench/gpu_kernels_check.py).
achieved_gbps counts the packed slot bytes read, B*H*L*S (page_gbps: whole entries, B*H*L*C).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_spectralquant.format import PRESETS, CacheGeometry  # noqa: E402
from vllm_spectralquant.format.synthetic import random_codec  # noqa: E402
from vllm_spectralquant.ops.workspace import DecodeWorkspace  # noqa: E402

HEAD_CONFIGS = [(128, 32, 8), (64, 9, 3)]  # (head_dim, query heads, KV heads)
BATCHES = [32, 64, 8, 1]  # the goal case (B=32, 32k) first
CONTEXTS = [32768, 16384, 4096, 1024]
ROTATE_BYTES = 256 << 20


def timer(dry: bool, eager: bool = True):
    """bench(fn) -> milliseconds; with ``eager=False`` fn is a list of callables (one per input set),
    each captured once as a CUDA graph, and the graphs are replayed in rotation."""
    if not dry and not eager:
        from triton.testing import do_bench

        def run_graphs(fns, **kw):
            for f in fns:  # warm-up outside capture: workspaces, extension load, lazy init
                f()
            torch.cuda.synchronize()
            graphs = []
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for f in fns:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, stream=stream):
                        f()
                    graphs.append(g)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            pick = rotating(graphs)
            return do_bench(lambda: pick().replay(), warmup=kw.get("warmup", 10), rep=kw.get("rep", 40), return_mode="median")

        return run_graphs
    if dry:

        def run(fns, **_):
            fns[0]()
            t0 = time.perf_counter()
            fns[0]()
            return (time.perf_counter() - t0) * 1e3

        return run
    from triton.testing import do_bench

    def run_eager(fns, **kw):
        pick = rotating(fns)
        return do_bench(lambda: pick()(), warmup=kw.get("warmup", 10), rep=kw.get("rep", 40), return_mode="median")

    return run_eager


def copy_bandwidth_gbps(device) -> float:
    """Device-to-device copy of 1 GiB (bytes read + written per second), median of CUDA-event timings."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * (1 << 30) / ms / 1e6


def rotating(sets: list):
    """A function returning the next item of ``sets`` on every call."""
    state = {"i": 0}

    def pick():
        state["i"] = (state["i"] + 1) % len(sets)
        return sets[state["i"]]

    return pick


def n_sets(bytes_per_set: int, dry: bool) -> int:
    return 1 if dry else max(1, min(8, math.ceil(ROTATE_BYTES / max(bytes_per_set, 1))))


def bf16_case(b, hq, h, d, L, device, bench, dry) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv_bytes = 2 * b * h * L * d * 2
    sets = []
    for _ in range(n_sets(kv_bytes, dry)):
        q = torch.randn(b, hq, 1, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(b, h, L, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(b, h, L, d, device=device, dtype=torch.bfloat16)
        sets.append((q, k, v))
    backend = SDPBackend.MATH if dry else SDPBackend.FLASH_ATTENTION
    outs = [torch.empty_like(q) for q, _, _ in sets]

    def call(q, k, v, o):
        def fn():
            with sdpa_kernel(backend):
                o.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))

        return fn

    ms = bench([call(*qkv, o) for qkv, o in zip(sets, outs)])
    del sets
    return {"time_us": ms * 1e3, "bytes": kv_bytes}


def packed_cache(codec, geo: CacheGeometry, b: int, L: int, device, gen) -> tuple:
    """Random bytes with valid fp16 fields, a shuffled block table and full-length sequences."""
    blocks_per_seq = -(-L // geo.block_size)
    n_blocks = b * blocks_per_seq + 1
    h = codec.num_kv_heads
    cache = torch.randint(0, 256, (n_blocks, h, geo.block_size, geo.page_slot_bytes), dtype=torch.uint8, device=device, generator=gen)
    fields = codec.preset.meta_bytes // 2
    if fields:  # s in [0.5, 1.5], z in [-1, 0]: finite like anything store_kv writes
        vals = torch.rand(n_blocks, h, geo.block_size, fields, device=device, generator=gen)
        vals[..., 0::2] += 0.5
        vals[..., 1::2] -= 1.0 if fields > 1 else 0.0
        cache[..., : 2 * fields] = vals.to(torch.float16).view(torch.uint8)
    # The sink spill is read as exact bf16 (first block): zeros, not random bits that decode to NaN/inf.
    cache[..., geo.slot_bytes :] = 0
    perm = torch.randperm(n_blocks, device=device, generator=gen)[: b * blocks_per_seq]
    table = perm.view(b, blocks_per_seq).to(torch.int32)
    lens = torch.full((b,), L, dtype=torch.int32, device=device)
    return cache, table, lens


def packed_case(preset, b, hq, h, d, L, block_size, impls, device, bench, dry, codecs="random") -> list[dict]:
    from vllm_spectralquant.ops import get_impl

    codec = random_codec(PRESETS[preset], d, h, seed=7, widest_first=codecs == "sorted").to(device)
    geo = CacheGeometry.for_codec(codec, block_size)
    gen = torch.Generator(device=device).manual_seed(11)
    slot_bytes = b * h * L * geo.slot_bytes
    page_bytes = b * h * L * geo.page_slot_bytes
    sets = [packed_cache(codec, geo, b, L, device, gen) for _ in range(n_sets(page_bytes, dry))]
    queries = [torch.randn(b, hq, d, device=device, dtype=torch.bfloat16) for _ in sets]
    out = torch.empty(b, hq, d, device=device, dtype=torch.bfloat16)
    ws = DecodeWorkspace.for_shapes(device, b, hq, h, d)
    key = torch.randn(b, h, d, device=device, dtype=torch.bfloat16)
    rows = []
    for impl in impls:
        mod = get_impl(impl)
        if not mod.decode_supported(codec, geo, hq):
            continue

        def decode(cache, table, lens, q, mod=mod):
            return lambda: mod.decode_attention(q, cache, table, lens, codec, geo, d**-0.5, out, ws)

        slots = (sets[0][1][:, -1].long() * block_size + (L - 1) % block_size).contiguous()

        def store(mod=mod, slots=slots, cache=sets[0][0]):
            mod.store_kv(key, key, cache, slots, codec, geo)

        try:
            t_decode = bench([decode(*s, q) for s, q in zip(sets, queries)]) * 1e3
            t_store = bench([store]) * 1e3
        except Exception:  # noqa: BLE001 - record and go on
            rows.append({"impl": impl, "preset": preset, "error": traceback.format_exc()[-2000:]})
            continue
        if not torch.isfinite(out.float()).all():
            rows.append({"impl": impl, "preset": preset, "error": "non-finite output"})
        rows.append({
            "impl": impl, "preset": preset, "method": codec.preset.method, "codecs": codecs, "time_us": t_decode,
            "achieved_gbps": slot_bytes / t_decode / 1e3, "page_gbps": page_bytes / t_decode / 1e3,
            "store_time_us": t_store, "slot_bytes": geo.slot_bytes, "page_slot_bytes": geo.page_slot_bytes,
        })  # fmt: skip
    sets.clear()  # free the caches before the next shape
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/decode_attention.json")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--head-dims", default="128,64")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--impls", default="cuda,triton")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--eager", action="store_true", help="time eager calls instead of CUDA-graph replays")
    ap.add_argument("--codecs", default="random", choices=["random", "sorted"])
    ap.add_argument("--label", default="", help="a name for this build/variant, stored in every row")
    ap.add_argument("--time-budget-s", type=float, default=1e9, help="stop starting new shapes after this long")
    ap.add_argument("--no-baseline", action="store_true", help="skip bf16 SDPA (profiling runs)")
    ap.add_argument("--quiet-table", action="store_true", help="no final table (the JSON has everything)")
    args = ap.parse_args()
    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    bench = timer(dry, eager=args.eager)
    impls = [i for i in args.impls.split(",") if i]
    if dry:
        impls = [i for i in impls if i != "cuda"]
    elif "cuda" in impls:
        from vllm_spectralquant.ops import cuda_ext

        if not cuda_ext.is_available():
            print("CUDA extension unavailable:", cuda_ext.load_error())
            impls.remove("cuda")
    head_dims = [int(x) for x in args.head_dims.split(",")]
    configs = [c for c in HEAD_CONFIGS if c[0] in head_dims]
    report = {
        "device": torch.cuda.get_device_name() if not dry else "cpu (dry run)",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "block_size": args.block_size,
        "timing": "eager calls" if args.eager else "CUDA-graph replays",
        "codecs": args.codecs,
        "label": args.label,
        "copy_gbps": None if dry else copy_bandwidth_gbps(device),
        "baseline": "torch SDPA, FLASH_ATTENTION backend, bf16 K/V [B, H, L, D], enable_gqa=True",
        "results": [],
    }
    started = time.time()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for d, hq, h in configs:
        for L in [int(x) for x in args.contexts.split(",")]:
            for b in [int(x) for x in args.batches.split(",")]:
                if time.time() - started > args.time_budget_s:
                    print("time budget reached; stopping")
                    break
                common = {"batch": b, "context": L, "head_dim": d, "num_query_heads": hq, "num_kv_heads": h}
                try:
                    if args.no_baseline:
                        raise RuntimeError("baseline skipped (--no-baseline)")
                    base = bf16_case(b, hq, h, d, L, device, bench, dry)
                    t_bf16 = base["time_us"]
                    report["results"].append({"method": "bf16", "impl": "sdpa", "preset": "bf16", **common,
                                              "time_us": t_bf16, "achieved_gbps": base["bytes"] / t_bf16 / 1e3,
                                              "speedup_vs_bf16": 1.0})  # fmt: skip
                except Exception:  # noqa: BLE001
                    t_bf16 = float("nan")
                    report["results"].append({"method": "bf16", "impl": "sdpa", **common, "error": traceback.format_exc()[-1500:]})
                for preset in args.presets.split(","):
                    for row in packed_case(preset, b, hq, h, d, L, args.block_size, impls, device, bench, dry, args.codecs):
                        if "time_us" in row:
                            row["speedup_vs_bf16"] = t_bf16 / row["time_us"]
                            if report["copy_gbps"]:
                                row["page_bw_fraction"] = row["page_gbps"] / report["copy_gbps"]
                        report["results"].append({**row, **common})
                    torch.cuda.empty_cache() if not dry else None
                line = [f"d{d} B={b:<3d} L={L:<6d} bf16 {t_bf16:8.1f}us"]
                for r in report["results"]:
                    if r.get("batch") == b and r.get("context") == L and r.get("head_dim") == d and "time_us" in r and r["method"] != "bf16":
                        line.append(f"{r['preset']}/{r['impl']} {r['time_us']:.1f}us x{r['speedup_vs_bf16']:.2f}")
                print(" | ".join(line), flush=True)
                out_path.write_text(json.dumps(report, indent=1))
    out_path.write_text(json.dumps(report, indent=1))
    if not args.quiet_table:
        print_table(report)
    return 0


def print_table(report: dict) -> None:
    rows = sorted((r for r in report["results"] if "time_us" in r),
                  key=lambda r: (-r["head_dim"], r["batch"], r["context"], r["preset"], r["impl"]))  # fmt: skip
    print(f"\n{report['device']}, {report['timing']}, block {report['block_size']}, codecs {report['codecs']}, "
          f"copy {report['copy_gbps'] or float('nan'):.0f} GB/s {report['label']}")  # fmt: skip
    print(f"{'hd':>3} {'B':>3} {'ctx':>6} {'preset':>9} {'impl':>6} {'us':>9} {'GB/s':>7} {'of copy':>7} {'x bf16':>7} {'store us':>8}")
    for r in rows:
        print(f"{r['head_dim']:>3} {r['batch']:>3} {r['context']:>6} {r['preset']:>9} {r['impl']:>6} {r['time_us']:>9.1f} "
              f"{r['achieved_gbps']:>7.0f} {r.get('page_bw_fraction', float('nan')):>7.2f} {r['speedup_vs_bf16']:>7.2f} "
              f"{r.get('store_time_us', float('nan')):>8.1f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
