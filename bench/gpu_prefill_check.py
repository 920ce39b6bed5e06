#!/usr/bin/env python3
"""GPU check + timing for issue 13: verify rows through the CUDA decode, tiled prefill over packed context.

1. Speculative verify rows (1 + k tokens) expanded per token (backend/decode_rows.py) through the CUDA
   decode kernel, against the torch reference's multi-token paged attention (fresh seeds, outputs
   poisoned with NaN, relative error).
2. ``prefill_attention`` (fused flash tiles, and the plain float32 tiles) against the dense reference
   on a few thousand tokens, windowed and not.
3. One 2048-token chunk at the end of a long packed context (Llama-3.1-8B attention shape: 32 query /
   8 KV heads, D = 128): time and peak extra memory (torch.cuda.max_memory_allocated above the
   inputs) of the tiled prefill, against the previous whole-context path (gather everything in
   float32, concatenate, repeat K/V per query head, SDPA with a lower-right causal bias).

    python bench/gpu_prefill_check.py --out results.json [--contexts 32768 131072]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from vllm_spectralquant import ops
from vllm_spectralquant.backend import prefill
from vllm_spectralquant.backend.decode_rows import expand_decode_rows
from vllm_spectralquant.format import PRESETS, paged_attention
from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.reference_attention import gather_context
from vllm_spectralquant.format.synthetic import random_codec, random_paged_batch


def seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_verify_rows(results: list) -> None:
    for preset, d, h, hq, bs in [("sq2_5bit", 128, 8, 32, 128), ("sq3bit", 64, 3, 9, 16), ("sq4bit", 128, 2, 12, 128)]:
        s = seed()
        codec = random_codec(PRESETS[preset], d, h, seed=s, widest_first=True)
        lens = [700, 4, 1500, 33, 257, 96]
        batch = random_paged_batch(codec, lens, [4] * len(lens), block_size=bs, num_query_heads=hq, seed=s, device="cuda")
        q = batch.query.to(torch.bfloat16)
        nd = batch.num_tokens
        rows = expand_decode_rows(batch.query_start_loc, batch.seq_lens, batch.block_table, len(lens), nd)
        out = torch.full((nd, hq, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        impl = ops.backend_for(torch.device("cuda"))
        ops.decode_attention(q, batch.kv_cache, rows.block_table, rows.seq_lens, codec.to("cuda"), batch.geometry, d**-0.5, out)
        ref = paged_attention(q.float(), batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc,
                              codec.to("cuda"), batch.geometry, d**-0.5)  # fmt: skip
        err = rel(out, ref)
        ok = err < 5e-3 and not torch.isnan(out).any().item()
        results.append({"check": f"verify rows {preset} d{d} h{h}/{hq} bs{bs}", "impl": impl, "rel_err": err, "ok": ok, "seed": s})
        print(results[-1], flush=True)


def dense_windowed(q, k, v, scale, window):
    n, hq, _ = q.shape
    length, h, _ = k.shape
    g = hq // h
    s = torch.einsum("nhd,lhd->hnl", q.float(), k.float().repeat_interleave(g, dim=1)) * scale
    qpos = torch.arange(length - n, length, device=q.device)[:, None]
    kpos = torch.arange(length, device=q.device)[None, :]
    vis = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s.masked_fill(~vis, float("-inf")), -1), v.float().repeat_interleave(g, dim=1))


def check_prefill(results: list) -> None:
    for fused in (True, False):
        for preset, d, h, hq, bs, cached, chunk, window in [
            ("sq2_5bit", 128, 8, 32, 128, 5000, 600, None),
            ("sq3bit", 64, 3, 9, 16, 3001, 257, None),
            ("sq4bit", 128, 2, 12, 128, 4100, 300, 1024),
        ]:
            s = seed()
            cpu_codec = random_codec(PRESETS[preset], d, h, seed=s)
            batch = random_paged_batch(cpu_codec, [cached + chunk], [chunk], block_size=bs, num_query_heads=hq, seed=s, device="cuda")
            codec = cpu_codec.to("cuda")
            q = batch.query.to(torch.bfloat16)
            kn, vn = batch.keys[0][cached:].cuda(), batch.values[0][cached:].cuda()
            prefill.FUSED_TILES = fused
            got = prefill.prefill_attention(q, kn.bfloat16(), vn.bfloat16(), batch.kv_cache, batch.block_table[0], cached, codec,
                                            batch.geometry, d**-0.5, window=window)  # fmt: skip
            kc, vc = gather_context(batch.kv_cache, batch.block_table, batch.seq_lens.new_tensor([cached]), codec, batch.geometry)
            ref = dense_windowed(q, torch.cat([kc[0], kn.bfloat16().float()]), torch.cat([vc[0], vn.bfloat16().float()]), d**-0.5, window)
            err = rel(got, ref)
            results.append({"check": f"prefill {'fused' if fused else 'fp32'} {preset} d{d} ctx{cached}+{chunk} w{window}",
                            "rel_err": err, "ok": err < 1e-2, "seed": s})  # fmt: skip
            print(results[-1], flush=True)
    prefill.FUSED_TILES = True


def whole_context_prefill(q, k_new, v_new, kv_cache, block_row, cached, codec, geometry, scale):
    """The previous path (before issue 13): the whole context at once."""
    from torch.nn.attention.bias import causal_lower_right

    k_ctx, v_ctx = ops.gather_context(kv_cache, block_row[None], block_row.new_tensor([cached]), codec, geometry)
    k_all = torch.cat([k_ctx[0].to(k_new.dtype), k_new])
    v_all = torch.cat([v_ctx[0].to(v_new.dtype), v_new])
    n, hq, _ = q.shape
    g = hq // k_all.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0).contiguous()
    kh = k_all.repeat_interleave(g, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    vh = v_all.repeat_interleave(g, dim=1).transpose(0, 1).unsqueeze(0).contiguous()
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(n, k_all.shape[0]), scale=scale)
    return o[0].transpose(0, 1)


def _tiled(fused: bool):
    def run(*args):
        prefill.FUSED_TILES = fused
        try:
            return prefill.prefill_attention(*args)
        finally:
            prefill.FUSED_TILES = True

    return run


VARIANTS = {"tiled fused": _tiled(True), "tiled fp32": _tiled(False), "whole context (before)": whole_context_prefill}


def measure(fn, args) -> tuple[dict, torch.Tensor | None]:
    """(time in ms of the second call, peak memory above what was allocated before it), output."""
    try:
        fn(*args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        o = fn(*args)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) * 1e3
        return {"ms": round(ms, 2), "peak_extra_MiB": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}, o
    except torch.OutOfMemoryError as e:
        return {"error": f"OOM: {str(e)[:160]}"}, None
    finally:
        torch.cuda.empty_cache()


def long_context_chunk(cached: int) -> dict:
    d, h, hq, bs, chunk = 128, 8, 32, 128, 2048
    codec = random_codec(PRESETS["sq2_5bit"], d, h, seed=1, widest_first=True).to("cuda")
    geometry = CacheGeometry.for_codec(codec, bs)
    blocks = -(-(cached + chunk) // bs)
    cache = torch.empty(blocks, h, bs, geometry.page_slot_bytes, dtype=torch.uint8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    for t0 in range(0, cached + chunk, 16384):  # fill the cache with random K/V in pieces
        t1 = min(t0 + 16384, cached + chunk)
        k = torch.randn(t1 - t0, h, d, device="cuda", generator=gen)
        ops.store_kv(k, torch.randn_like(k), cache, torch.arange(t0, t1, device="cuda"), codec, geometry)
    row = torch.arange(blocks, device="cuda", dtype=torch.int32)
    q = torch.randn(chunk, hq, d, device="cuda", dtype=torch.bfloat16)
    kn = torch.randn(chunk, h, d, device="cuda", dtype=torch.bfloat16)
    args = (q, kn, torch.randn_like(kn), cache, row, cached, codec, geometry, d**-0.5)
    entry: dict = {"context": cached, "chunk": chunk, "cache_MiB": round(cache.numel() / 2**20, 1)}
    outs = {}
    for name, fn in VARIANTS.items():
        entry[name], outs[name] = measure(fn, args)
    before = outs["whole context (before)"]
    for name in ("tiled fused", "tiled fp32"):
        if outs[name] is not None and before is not None:
            entry[f"{name} vs before (rel)"] = rel(outs[name], before)
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_prefill_check.json")
    ap.add_argument("--contexts", type=int, nargs="+", default=[131072])
    args = ap.parse_args()
    checks: list = []
    check_verify_rows(checks)
    check_prefill(checks)
    timing: list = []
    for cached in args.contexts:
        timing.append(long_context_chunk(cached))
        print(timing[-1], flush=True)
    out = {"device": torch.cuda.get_device_name(), "checks": checks, "long_context": timing,
           "all_ok": all(c["ok"] for c in checks)}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("ALL OK" if out["all_ok"] else "SOME CHECKS FAILED", flush=True)
    return 0 if out["all_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
