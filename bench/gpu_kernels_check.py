"""Correctness of the CUDA and Triton packed-cache kernels against the torch reference (run on the GPU).

    python bench/gpu_kernels_check.py --check --out DIR     # build, check every case, CUDA-graph capture
    python bench/gpu_kernels_check.py --sanitize            # a few small CUDA calls (under compute-sanitizer)
    TRITON_INTERPRET=1 python bench/gpu_kernels_check.py --check --dry-run   # CPU rehearsal: Triton only, tiny

Every check draws fresh random inputs (seeds printed), poisons outputs with NaN first and reports the
relative error ||out - ref|| / ||ref|| against the fp32 torch reference. Writes DIR/kernels_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_spectralquant.format import PRESETS, paged_attention  # noqa: E402
from vllm_spectralquant.format.paged import store_kv as reference_store  # noqa: E402
from vllm_spectralquant.format.reference_attention import gather_context as reference_gather  # noqa: E402
from vllm_spectralquant.format.synthetic import named_random_codec, random_codec, random_paged_batch  # noqa: E402
from vllm_spectralquant.ops.workspace import DecodeWorkspace  # noqa: E402

#: fp16 levels and queries feed fp32-accumulated MMAs: ~1e-3 of the output norm is expected.
DECODE_TOL = 5e-3
GATHER_TOL = 1e-5
STORE_MISMATCH_TOL = 2e-3  # fraction of cache bytes (codes flip only at fp32 midpoint ties)

# (preset, head_dim, kv_heads, group, block_size, sink_tokens, seq_lens)
GPU_CASES = [
    ("sq2_5bit", 128, 8, 4, 16, 1, [1, 17, 300, 1025, 64]),
    ("sq3bit", 128, 2, 8, 32, 0, [1, 33, 513]),
    ("sq4bit", 64, 3, 7, 16, 1, [2, 129, 47]),
    ("tq2_5bit", 128, 4, 1, 32, 1, [1, 100, 31]),
    ("tq3bit", 64, 2, 4, 16, 0, [15, 16, 17, 700]),
    ("tq4bit", 128, 2, 7, 16, 1, [5, 250]),
    ("sq2_5bit", 64, 3, 1, 32, 1, [1, 2, 3, 999]),
    ("sq3bit", 64, 1, 8, 16, 1, [1]),
    ("tq3bit", 128, 8, 4, 16, 1, [4000, 1]),
    ("sq4bit", 128, 1, 16, 32, 1, [77, 1]),
    ("tq2_5bit", 64, 2, 4, 16, 4, [3, 90]),
    ("sq3bit", 256, 1, 4, 16, 1, [40, 3]),
    ("sq3bit:sorted", 256, 2, 4, 64, 1, [130, 5]),  # Gemma 3's head_dim at its block size
    # ":sorted": bits widest first per head, as calibrated (whole pair-table stripes + a wide stripe)
    ("sq2_5bit:sorted", 128, 8, 4, 128, 1, [1, 300, 4097, 128]),
    ("sq4bit:sorted", 64, 3, 3, 128, 1, [129, 2000, 7]),
    ("sq3bit:sorted", 96, 2, 6, 64, 2, [65, 1000]),
    # "@N": a layer's own slot size (calibration moves bytes between layers), small and large
    ("sq2_5bit:sorted@43", 128, 8, 4, 128, 2, [1, 300, 4097]),
    ("sq2_5bit:sorted@129", 128, 2, 6, 128, 2, [129, 2000]),
    # "+gain": keys with decode gains (the store divides by the encoding scale, decode/gather multiply by the decoding one)
    ("sq2_5bit:sorted+gain", 128, 8, 4, 128, 1, [1, 300, 4097]),
    ("sq3bit+gain", 64, 2, 4, 16, 1, [33, 700]),
]
DRY_CASES = [
    ("sq2_5bit", 64, 2, 4, 16, 1, [1, 17, 40]),
    ("tq3bit", 32, 1, 1, 32, 0, [5, 33]),
]


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def token_major(cache: torch.Tensor) -> torch.Tensor:
    """The same cache in vLLM's default token-major layout: logical [N, H, bs, C], physical [N, bs, H, C]."""
    n, h, bs, c = cache.shape
    out = torch.empty(n, bs, h, c, dtype=cache.dtype, device=cache.device).permute(0, 2, 1, 3)
    out.copy_(cache)
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float(), ref.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def impl_module(impl: str):
    from vllm_spectralquant.ops import get_impl

    return get_impl(impl)


def check_case(case, impl: str, layout: str, device: torch.device) -> dict:
    name, d, h, g, bs, sink, lens = case
    mod = impl_module(impl)
    seed = fresh_seed()
    codec = named_random_codec(name, d, h, seed).to(device)
    cpu_codec = codec.to("cpu")
    batch = random_paged_batch(cpu_codec, lens, [1] * len(lens), block_size=bs, num_query_heads=h * g, sink_tokens=sink, padding_tokens=2, seed=seed, device=device)
    geo = batch.geometry
    cache = batch.kv_cache if layout == "contiguous" else token_major(batch.kv_cache)
    row = {"impl": impl, "layout": layout, "preset": name, "head_dim": d, "kv_heads": h, "group": g, "block_size": bs,
           "sink_tokens": sink, "seq_lens": lens, "seed": seed}  # fmt: skip
    if impl == "cuda" and not mod.decode_supported(codec, geo, h * g):
        row["skipped"] = "shape not covered by the CUDA decode kernel"
        return row

    # store: fresh tokens (every 7th slot -1, some on sink offsets) into a copy of the cache
    gen = torch.Generator().manual_seed(seed)
    n = 41
    key = (torch.randn(n + 3, h, d, generator=gen) * 3 + 1).to(device)
    value = torch.randn(n + 3, h, d, generator=gen).to(device)
    slots = torch.randperm(cache.shape[0] * bs, generator=gen)[:n]
    slots[::7] = -1
    slots = slots.to(device)
    expected = batch.kv_cache.clone()
    reference_store(key, value, expected, slots, codec, geo, strict=False)
    written = cache.clone()
    mod.store_kv(key, value, written, slots, codec, geo)
    row["store_mismatch"] = (written != expected).float().mean().item()
    if row["store_mismatch"] > 0:
        row["store_diagnosis"] = store_diagnosis(written, expected, key, value, slots, batch.kv_cache, codec, geo)

    # decode (fp32 and bf16 query/output)
    scale = d**-0.5
    ref = paged_attention(batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, geo, scale)
    b = len(lens)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((b + 2, h * g, d), float("nan"), dtype=dtype, device=device)
        mod.decode_attention(batch.query.to(dtype), cache, batch.block_table, batch.seq_lens, codec, geo, scale, out)
        key_ = "decode_rel" if dtype == torch.float32 else "decode_rel_bf16"
        row[key_] = rel_err(out[:b], ref[:b])
        row.setdefault("padding_rows_untouched", True)
        row["padding_rows_untouched"] &= bool(torch.isnan(out[b:].float()).all())
    if impl == "cuda" and row["decode_rel"] > DECODE_TOL:
        row["diagnosis"] = diagnose(batch, cache, codec, geo, scale, h * g)

    # gather
    k, v = mod.gather_context(cache, batch.block_table, batch.seq_lens, codec, geo)
    k_ref, v_ref = reference_gather(batch.kv_cache, batch.block_table, batch.seq_lens, codec, geo)
    row["gather_rel"] = max(rel_err(k, k_ref), rel_err(v, v_ref))
    row["ok"] = (
        row["store_mismatch"] < STORE_MISMATCH_TOL
        and row["decode_rel"] < DECODE_TOL
        and row["decode_rel_bf16"] < 2e-2
        and row["padding_rows_untouched"]
        and row["gather_rel"] < GATHER_TOL
    )
    return row


def store_diagnosis(written, expected, key, value, slots, original, codec, geo) -> dict:
    """Where a kernel's store differs from the reference: byte columns, a sample, the CPU reference, decoded values."""
    from vllm_spectralquant.format.codec import decode_slots

    diff = written != expected
    cols = torch.nonzero(diff)[:, 3].bincount(minlength=geo.page_slot_bytes)
    top = [(int(c), int(cols[c])) for c in cols.argsort(descending=True)[:10] if cols[c] > 0]
    sel = slots[slots >= 0]
    blk, off = sel // geo.block_size, sel % geo.block_size
    got, want = written[blk, :, off, : geo.slot_bytes], expected[blk, :, off, : geo.slot_bytes]
    first = torch.nonzero((got != want).any(-1))
    sample = {}
    if len(first):
        i, h = (int(x) for x in first[0])
        sample = {"got": got[i, h, :12].tolist(), "want": want[i, h, :12].tolist()}
    cpu_expected = original.cpu().clone()
    reference_store(key.cpu(), value.cpu(), cpu_expected, slots.cpu(), codec.to("cpu"), geo, strict=False)
    k_got, v_got = decode_slots(got.contiguous(), codec)
    k_want, v_want = decode_slots(want.contiguous(), codec)
    return {
        "differing_columns": top,
        "sample_head_token": sample,
        "mismatch_vs_cpu_reference": (written.cpu() != cpu_expected).float().mean().item(),
        "gpu_vs_cpu_reference": (expected.cpu() != cpu_expected).float().mean().item(),
        "decoded_rel_k": rel_err(k_got, k_want),
        "decoded_rel_v": rel_err(v_got, v_want),
    }


def diagnose(batch, cache, codec, geo, scale, hq) -> dict:
    """Compare the CUDA and Triton intermediates (same workspace layout) to find the failing stage."""
    from vllm_spectralquant.ops import cuda_ext, triton_kernels
    from vllm_spectralquant.ops.workspace import num_splits

    b, d, h = batch.seq_lens.shape[0], codec.head_dim, codec.num_kv_heads
    g = hq // h
    splits = num_splits(b, h, batch.block_table.shape[1] * geo.block_size, cache.device)
    views = {}
    for impl, mod in (("cuda", cuda_ext), ("triton", triton_kernels)):
        ws = DecodeWorkspace.for_shapes(cache.device, b, hq, h, d)
        out = torch.zeros(b, hq, d, device=cache.device)
        mod.decode_attention(batch.query, cache, batch.block_table, batch.seq_lens, codec, geo, scale, out, ws)
        views[impl] = ws.views(b, hq, h, d, splits, grow=False)
    cv, tv = views["cuda"], views["triton"]
    return {
        "w16_maxdiff": (cv.w16.float() - tv.w16.float()).abs().max().item(),
        "wpar_maxdiff": (cv.wpar - tv.wpar).abs().max().item(),
        "part_m_maxdiff": (cv.part_ml[..., :g, 0] - tv.part_ml[..., :g, 0]).abs().max().item(),
        "part_l_rel": rel_err(cv.part_ml[..., :g, 1], tv.part_ml[..., :g, 1]),
        "part_o_rel": rel_err(cv.part_o[..., :g, :d], tv.part_o[..., :g, :d]),
    }


def nonfinite_store_check(impl: str, device: torch.device) -> dict:
    """Non-finite K/V are saturated first (NaN -> 0, +-inf -> +-65504): bytes equal the reference's, sinks included."""
    from vllm_spectralquant.format import CacheGeometry

    mod = impl_module(impl)
    out = {}
    for name in ("sq3bit", "tq3bit"):
        seed = fresh_seed()
        codec = random_codec(PRESETS[name], 64, 2, seed=seed).to(device)
        geo = CacheGeometry.for_codec(codec, 16, 1)
        key = torch.randn(4, 2, 64, device=device)
        key[0, 0, 3], key[1, 1, 0], key[2, 0, 5] = float("nan"), float("inf"), float("-inf")
        value = torch.randn(4, 2, 64, device=device)
        value[3, 1, 7] = float("nan")
        slots = torch.tensor([16, 2, 0, 5], device=device)
        expected = torch.zeros(2, 2, 16, geo.page_slot_bytes, dtype=torch.uint8, device=device)
        written = expected.clone()
        reference_store(key, value, expected, slots, codec, geo, strict=False)
        mod.store_kv(key, value, written, slots, codec, geo)
        out[name] = {"seed": seed, "bytes_differing": int((written != expected).sum())}
    return out


def graph_capture_check(device: torch.device) -> dict:
    """decode_attention and store_kv inside a CUDA graph: replays with new inputs equal eager runs."""
    from vllm_spectralquant.ops import cuda_ext

    seed = fresh_seed()
    codec = random_codec(PRESETS["sq2_5bit"], 128, 2, seed=seed)
    batch = random_paged_batch(codec, [300, 1, 77, 1000], [1] * 4, block_size=16, num_query_heads=8, seed=seed, device=device)
    codec = codec.to(device)
    geo = batch.geometry
    ws = DecodeWorkspace.for_shapes(device, 4, 8, 2, 128)
    q = batch.query[:4].clone()
    lens = batch.seq_lens.clone()
    out = torch.zeros(4, 8, 128, device=device)
    key = torch.randn(4, 2, 128, device=device)
    slots = torch.tensor([5, -1, 40, 1], device=device)
    cache = batch.kv_cache.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (builds the KernelCodec, cudaFuncSetAttribute)
        cuda_ext.decode_attention(q, cache, batch.block_table, lens, codec, geo, 0.1, out, ws)
        cuda_ext.store_kv(key, key, cache, slots, codec, geo)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ext.store_kv(key, key, cache, slots, codec, geo)
        cuda_ext.decode_attention(q, cache, batch.block_table, lens, codec, geo, 0.1, out, ws)
    q.copy_(torch.randn_like(q))
    key.copy_(torch.randn_like(key))
    lens.copy_(torch.tensor([250, 2, 77, 999], device=device, dtype=lens.dtype))
    graph.replay()
    torch.cuda.synchronize()
    eager_cache = cache.clone()
    cuda_ext.store_kv(key, key, eager_cache, slots, codec, geo)
    eager = torch.zeros_like(out)
    cuda_ext.decode_attention(q, eager_cache, batch.block_table, lens, codec, geo, 0.1, eager, ws)
    return {"seed": seed, "graph_vs_eager_rel": rel_err(out, eager), "cache_equal": bool(torch.equal(cache, eager_cache))}


def sanitize(device: torch.device) -> None:
    """Small CUDA calls for compute-sanitizer: every load mode, both head-dim paths, both GQA tiles."""
    from vllm_spectralquant.ops import cuda_ext

    assert cuda_ext.is_available(), cuda_ext.load_error()
    for name, d, h, g, bs, sink, lens in [
        ("sq2_5bit", 128, 2, 4, 16, 1, [1, 40, 70]),
        ("tq3bit", 64, 1, 16, 32, 2, [33, 2]),
        ("sq4bit", 64, 2, 1, 16, 0, [17]),
        ("sq2_5bit:sorted", 128, 2, 4, 128, 1, [1, 200]),
    ]:
        codec = named_random_codec(name, d, h, seed=1)
        batch = random_paged_batch(codec, lens, [1] * len(lens), block_size=bs, num_query_heads=h * g, sink_tokens=sink, seed=1, device=device)
        codec = codec.to(device)
        for cache in (batch.kv_cache, token_major(batch.kv_cache)):
            out = torch.zeros(len(lens), h * g, d, device=device, dtype=torch.bfloat16)
            cuda_ext.decode_attention(batch.query.bfloat16(), cache, batch.block_table, batch.seq_lens, codec, batch.geometry, 0.1, out)
            key = torch.randn(5, h, d, device=device)
            cuda_ext.store_kv(key, key, cache, torch.tensor([0, 3, -1, 17, 30], device=device), codec, batch.geometry)
            cuda_ext.gather_context(cache, batch.block_table, batch.seq_lens, codec, batch.geometry)
    torch.cuda.synchronize()
    print("sanitize calls done")


def summarize(out: Path) -> None:
    """The lines worth reading from a finished run: check summary, sanitizer verdicts, goal rows, ncu highlights."""
    check = out / "kernels_check.json"
    if check.exists():
        rep = json.loads(check.read_text())
        print("CHECK", json.dumps(rep.get("summary")), "graph:", json.dumps(rep.get("graph_capture")))
        for row in rep.get("cases", []):
            if not row.get("ok", True) and "skipped" not in row:
                print("FAILED", json.dumps({k: v for k, v in row.items() if k != "error"})[:900], row.get("error", "")[-600:])
    for tool in ("memcheck", "racecheck", "sanitize"):
        log = out / f"{tool}.log"
        if log.exists():
            lines = log.read_text().splitlines()
            print(tool.upper(), *[x for x in lines if "ERROR SUMMARY" in x or "exit" in x or "Error" in x or "==" in x][:8])
    bench = out / "decode_attention.json"
    if bench.exists():
        rep = json.loads(bench.read_text())
        rows = [r for r in rep["results"] if "time_us" in r]
        print(f"BENCH {len(rows)} timings, {sum('error' in r for r in rep['results'])} errors")
        for r in rows:
            if r["batch"] == 32 and r["context"] == 32768:
                print(f"  d{r['head_dim']} {r['preset']:>9} {r['impl']:>6} {r['time_us']:9.1f} us  {r['achieved_gbps']:6.0f} GB/s"
                      f"  x{r['speedup_vs_bf16']:.2f}  store {r.get('store_time_us', float('nan')):.1f} us")  # fmt: skip
    ncu = out / "ncu_goal.txt"
    if ncu.exists():
        keys = ("Duration", "Memory Throughput", "DRAM Throughput", "Compute (SM) Throughput", "Achieved Occupancy",
                "Registers Per Thread", "Issue Slots Busy", "Executed Ipc Active", "L1/TEX Hit", "Mem Pipes Busy")  # fmt: skip
        for line in ncu.read_text().splitlines():
            if any(k in line for k in keys):
                print("NCU", line.strip())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sanitize", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal: Triton interpreter, tiny cases")
    ap.add_argument("--impls", default="cuda,triton", help="implementations to check")
    ap.add_argument("--only", default="", help="check only cases whose preset contains this string")
    ap.add_argument("--summarize", action="store_true", help="print the short summary of a finished run in --out")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.summarize:
        summarize(Path(args.out))
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.sanitize:
        sanitize(device)
        return 0
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
                    "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}  # fmt: skip
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    impls = ["triton"] if "triton" in args.impls else []
    if device.type == "cuda" and "cuda" in args.impls:
        from vllm_spectralquant.ops import cuda_ext

        t0 = time.time()
        try:
            report["cuda_build_dir"] = str(cuda_ext.build())
            impls.insert(0, "cuda")
        except Exception:  # noqa: BLE001 - report and still check Triton
            report["cuda_build_error"] = traceback.format_exc()[-4000:]
            print(report["cuda_build_error"])
        report["cuda_build_s"] = round(time.time() - t0, 1)
        print(f"cuda build: {report['cuda_build_s']} s, ok={'cuda' in impls}", flush=True)
    cases = [c for c in (DRY_CASES if args.dry_run else GPU_CASES) if args.only in c[0]]
    rows = []
    for case in cases:
        for impl in impls:
            for layout in ("contiguous", "token_major"):
                t0 = time.time()
                try:
                    row = check_case(case, impl, layout, device)
                except Exception:  # noqa: BLE001
                    row = {"impl": impl, "layout": layout, "preset": case[0], "case": str(case), "ok": False,
                           "error": traceback.format_exc()[-3000:]}  # fmt: skip
                row["seconds"] = round(time.time() - t0, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    report["cases"] = rows
    for impl in impls:
        try:
            report[f"nonfinite_store_{impl}"] = nonfinite_store_check(impl, device)
        except Exception:  # noqa: BLE001
            report[f"nonfinite_store_{impl}"] = {"error": traceback.format_exc()[-2000:]}
        print(f"non-finite store ({impl}):", json.dumps(report[f"nonfinite_store_{impl}"]), flush=True)
    if "cuda" in impls:
        try:
            report["graph_capture"] = graph_capture_check(device)
        except Exception:  # noqa: BLE001
            report["graph_capture"] = {"error": traceback.format_exc()[-3000:]}
        print("graph capture:", json.dumps(report["graph_capture"]), flush=True)
    summary = {}
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl and "skipped" not in r]
        summary[impl] = {
            "cases": len(mine),
            "failed": sum(not r.get("ok") for r in mine),
            "max_decode_rel": max((r.get("decode_rel", float("inf")) for r in mine), default=None),
            "max_decode_rel_bf16": max((r.get("decode_rel_bf16", float("inf")) for r in mine), default=None),
            "max_gather_rel": max((r.get("gather_rel", float("inf")) for r in mine), default=None),
            "max_store_mismatch": max((r.get("store_mismatch", float("inf")) for r in mine), default=None),
        }
        summary[impl]["decode_ok"] = all(r.get("decode_rel", float("inf")) < DECODE_TOL for r in mine)
        nonfinite = report.get(f"nonfinite_store_{impl}", {})
        summary[impl]["nonfinite_store_ok"] = all(v.get("bytes_differing", 1) == 0 for v in nonfinite.values()) if nonfinite else None
        summary[impl]["failed"] += 0 if summary[impl]["nonfinite_store_ok"] else 1
    report["summary"] = summary
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_check.json").write_text(json.dumps(report, indent=1))
    print("SUMMARY", json.dumps(summary, indent=1))
    return 0 if all(s["failed"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
