"""The kernel cases and the check every packed-cache kernel implementation must pass, defined once.

``tests/test_ops_triton.py`` runs them on the Triton kernels (CPU, TRITON_INTERPRET=1) and
``tests/test_ops_cuda.py`` on the CUDA extension (GPU machine, ``gpu`` marker). Each call draws a
fresh seed (printed in every failure), poisons the outputs with NaN and compares with the fp32 torch
reference by relative error.
"""

from __future__ import annotations

import os

import torch

from vllm_spectralquant.format import paged_attention
from vllm_spectralquant.format.paged import store_kv as reference_store
from vllm_spectralquant.format.reference_attention import gather_context as reference_gather
from vllm_spectralquant.format.synthetic import named_random_codec, random_paged_batch

#: fp16 levels and queries feed the decode dots (fp32 accumulation): errors ~1e-3 of the output norm.
DECODE_TOL = 5e-3
#: store and gather are fp32 throughout.
GATHER_TOL = 1e-5
#: Codes can differ only where fp32 summation order moves a coordinate across a midpoint.
STORE_MISMATCH_TOL = 2e-3

# (preset[:sorted][@slot], head_dim, kv_heads, group, block_size, sink_tokens, seq_lens). ":sorted" gives each
# head's groups their random bits widest first, as a calibration does (the CUDA decode then takes its
# pair-table path on whole stripes and the wide-code path on the first ones). "@N": the layer's own slot
# of N bytes, as a calibration that moves bytes between layers gives (SmolLM2's sq2_5bit: 22 .. 69 B).
CASES = [
    ("sq2_5bit", 64, 2, 4, 16, 1, [1, 17, 40, 33]),
    ("sq3bit", 32, 1, 1, 32, 0, [5, 64, 1]),
    ("sq4bit", 64, 1, 4, 32, 1, [70, 1, 31]),
    ("tq2_5bit", 64, 2, 1, 16, 0, [16, 3, 49]),
    ("tq3bit", 32, 2, 4, 16, 1, [1, 2, 47]),
    ("tq4bit", 64, 1, 4, 16, 1, [33, 18]),
    ("sq2_5bit", 32, 3, 1, 32, 1, [100, 9]),
    ("sq2_5bit:sorted", 64, 3, 3, 32, 1, [65, 2, 130]),
    ("sq4bit:sorted", 32, 2, 8, 16, 2, [40, 3]),
    ("sq2_5bit:sorted@22", 64, 2, 4, 16, 1, [37, 1, 18]),
    ("sq3bit:sorted@75", 64, 3, 3, 32, 1, [66, 5]),
    # "+gain": keys with decode gains (calibrate/fit.py key_gain): the store must divide by the encoding
    # scale, decode and gather multiply by the decoding one.
    ("sq2_5bit:sorted+gain", 64, 2, 4, 16, 1, [37, 1, 18]),
    ("sq3bit+gain", 32, 1, 2, 32, 0, [5, 64]),
    # Gemma 3's head_dim: the Triton store and gather rotate in dots of 64 basis rows (triton_common).
    ("sq3bit", 256, 1, 2, 16, 1, [20, 3]),
]


def case_id(case) -> str:
    name, d, h, g, bs, sink, lens = case
    return f"{name.replace(':', '-').replace('@', '-slot').replace('+', '-')}-d{d}-h{h}-g{g}-bs{bs}-sink{sink}"


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


def case_codec(name: str, head_dim: int, kv_heads: int, seed: int):
    return named_random_codec(name, head_dim, kv_heads, seed)


def token_major(cache: torch.Tensor) -> torch.Tensor:
    """The same cache in vLLM's default token-major layout: logical [N, H, bs, C], physical [N, bs, H, C]."""
    n, h, bs, c = cache.shape
    out = torch.empty(n, bs, h, c, dtype=cache.dtype, device=cache.device).permute(0, 2, 1, 3)
    out.copy_(cache)
    return out


def case_batch(case, device: torch.device):
    """(fresh seed, codec on ``device``, one-token-decode PagedBatch on ``device``) for a CASES entry."""
    name, d, h, g, bs, sink, lens = case
    seed = fresh_seed()
    codec = case_codec(name, d, h, seed)
    batch = random_paged_batch(
        codec, lens, [1] * len(lens), block_size=bs, num_query_heads=h * g, sink_tokens=sink, padding_tokens=2,
        seed=seed, device=device,
    )  # fmt: skip
    return seed, codec.to(device), batch


def check_kernels_against_reference(mod, case, layout: str, device: torch.device) -> None:
    """store_kv, decode_attention and gather_context of ``mod`` (ops.triton_kernels or ops.cuda_ext) vs the reference."""
    name, d, h, g, bs, sink, lens = case
    seed, codec, batch = case_batch(case, device)
    geo = batch.geometry
    cache = batch.kv_cache if layout == "contiguous" else token_major(batch.kv_cache)
    msg = f"seed {seed}"

    # store: new tokens (some skipped with -1, some landing on sink offsets) into a copy of the cache
    gen = torch.Generator().manual_seed(seed)
    n = 37
    key = (torch.randn(n + 3, h, d, generator=gen) * 3 + 1).to(device)  # 3 padding rows past len(slot_mapping)
    value = torch.randn(n + 3, h, d, generator=gen).to(device)
    slots = torch.randperm(cache.shape[0] * bs, generator=gen)[:n]
    slots[::7] = -1
    slots = slots.to(device)
    expected = batch.kv_cache.clone()
    reference_store(key, value, expected, slots, codec, geo, strict=False)
    written = cache.clone()
    mod.store_kv(key, value, written, slots, codec, geo)
    mismatch = (written != expected).float().mean().item()
    assert mismatch < STORE_MISMATCH_TOL, f"{msg}: {mismatch:.2%} of cache bytes differ from the reference store"

    # decode: one query token per sequence, fp32 and bf16, output poisoned; padding rows stay untouched
    scale = d**-0.5
    ref = paged_attention(batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, geo, scale)
    b = len(lens)
    for dtype, tol in ((torch.float32, DECODE_TOL), (torch.bfloat16, 2 * DECODE_TOL)):
        out = torch.full((b + 2, h * g, d), float("nan"), dtype=dtype, device=device)
        mod.decode_attention(batch.query.to(dtype), cache, batch.block_table, batch.seq_lens, codec, geo, scale, out)
        got = out[:b].float()
        assert torch.isfinite(got).all(), msg
        rel = ((got - ref[:b]).norm() / ref[:b].norm()).item()
        assert rel < tol, f"{msg}: {dtype} decode relative error {rel:.2e}"
        assert torch.isnan(out[b:].float()).all(), f"{msg}: rows past the batch were written"

    # gather: dense dequantised context
    k, v = mod.gather_context(cache, batch.block_table, batch.seq_lens, codec, geo)
    k_ref, v_ref = reference_gather(batch.kv_cache, batch.block_table, batch.seq_lens, codec, geo)
    for got_, want, what in ((k, k_ref, "K"), (v, v_ref, "V")):
        assert got_.shape == want.shape
        rel = ((got_ - want).norm() / want.norm()).item()
        assert rel < GATHER_TOL, f"{msg}: gather {what} relative error {rel:.2e}"


#: (a CASES entry, sliding window): windows shorter than some rows (whose first blocks then point at a
#: poisoned block, as vLLM's null block once the window passed them), a window of one token, one longer
#: than every row, and one long enough for several KV splits (>= 256 tokens each) that start mid-context.
WINDOW_CASES = [
    (CASES[0], 20), (CASES[2], 33), (CASES[7], 50), (CASES[8], 1), (CASES[3], 1000),
    (("sq3bit", 64, 1, 2, 32, 1, [700, 5]), 600),
]  # fmt: skip


def window_case_id(window_case) -> str:
    case, window = window_case
    return f"{case_id(case)}-w{window}"


def check_windowed_decode_against_reference(mod, window_case, layout: str, device: torch.device) -> None:
    """Windowed ``decode_attention`` of ``mod`` vs the windowed reference, with the blocks wholly before each
    row's window replaced by one block of 0xFF bytes (NaN in every fp16/bf16 field): a kernel that reads
    them, or a sink outside the window, returns NaN or a wrong result."""
    (name, d, h, g, bs, sink, lens), window = window_case
    seed, codec, batch = case_batch(window_case[0], device)
    geo = batch.geometry
    scale = d**-0.5
    ref = paged_attention(
        batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, geo, scale,
        window=window,
    )  # fmt: skip
    poison = torch.full_like(batch.kv_cache[:1], 0xFF)
    cache = torch.cat([batch.kv_cache, poison])
    cache = cache if layout == "contiguous" else token_major(cache)
    table = batch.block_table.clone()
    for b, n in enumerate(lens):
        table[b, : max(n - window, 0) // bs] = cache.shape[0] - 1  # blocks wholly before the window
    msg = f"seed {seed}, window {window}"
    b = len(lens)
    out = torch.full((b + 2, h * g, d), float("nan"), device=device)
    mod.decode_attention(batch.query, cache, table, batch.seq_lens, codec, geo, scale, out, window=window)
    got = out[:b]
    assert torch.isfinite(got).all(), f"{msg}: a token before the window was read"
    rel = ((got - ref[:b]).norm() / ref[:b].norm()).item()
    assert rel < DECODE_TOL, f"{msg}: windowed decode relative error {rel:.2e}"
    assert torch.isnan(out[b:]).all(), f"{msg}: rows past the batch were written"
