"""Bounded-memory prefill over packed context, and speculative verify rows through the decode path.

Both are checked against the fp32 torch reference on fresh random caches (outputs poisoned first).
"""

from __future__ import annotations

import pytest
import torch

from vllm_spectralquant import ops
from vllm_spectralquant.backend import prefill
from vllm_spectralquant.backend.decode_rows import expand_decode_rows
from vllm_spectralquant.format import PRESETS, paged_attention
from vllm_spectralquant.format.reference_attention import gather_context
from vllm_spectralquant.format.synthetic import random_codec, random_paged_batch

from kernel_cases import fresh_seed


def _windowed_reference(q, k, v, scale, window):
    """q [n, Hq, D] at the last n positions of k, v [L, H, D]; keys p - window + 1 .. p visible."""
    n, hq, _ = q.shape
    length, h, _ = k.shape
    g = hq // h
    s = torch.einsum("nhd,lhd->hnl", q.float(), k.float().repeat_interleave(g, dim=1)) * scale
    qpos = torch.arange(length - n, length)[:, None]
    kpos = torch.arange(length)[None, :]
    visible = (kpos <= qpos) & ((kpos > qpos - window) if window else True)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s, dim=-1), v.float().repeat_interleave(g, dim=1))


@pytest.mark.parametrize(
    "preset,head_dim,kv_heads,hq,block,sink,cached,chunk,window",
    [
        ("sq3bit", 32, 2, 4, 16, 1, 150, 37, None),  # several key tiles, several query tiles, sinks
        ("sq2_5bit", 64, 1, 3, 32, 2, 97, 64, None),
        ("sq4bit", 32, 2, 2, 16, 1, 200, 40, 50),  # sliding window: early tiles skipped, sinks not seen
        ("tq3bit", 32, 1, 4, 16, 0, 33, 70, 45),  # window reaching back into the packed context
        ("sq3bit", 32, 2, 4, 16, 1, 0, 90, 40),  # a windowed first chunk: band mask over raw K/V only
    ],
)
def test_tiled_prefill_matches_the_dense_reference(monkeypatch, preset, head_dim, kv_heads, hq, block, sink, cached, chunk, window):
    seed = fresh_seed()
    codec = random_codec(PRESETS[preset], head_dim, kv_heads, seed=seed)
    n_total = cached + chunk
    batch = random_paged_batch(codec, [n_total], [chunk], block_size=block, num_query_heads=hq, sink_tokens=sink, seed=seed)
    # Tiny tiles, so the walk covers many key tiles (one per two blocks) and query tiles.
    monkeypatch.setattr(prefill, "KEY_TILE_TOKENS", 2 * block)
    budget = 4 * hq * 2 * block * 7  # 7 queries per score tile
    tiles = []
    real_gather = ops.gather_context

    def recording_gather(kv_cache, block_table, seq_lens, codec_, geometry):
        tiles.append(int(seq_lens[0]))
        return real_gather(kv_cache, block_table, seq_lens, codec_, geometry)

    monkeypatch.setattr(prefill.ops, "gather_context", recording_gather)
    k_new, v_new = batch.keys[0][cached:], batch.values[0][cached:]
    got = prefill.prefill_attention(
        batch.query, k_new, v_new, batch.kv_cache, batch.block_table[0], cached, codec, batch.geometry,
        head_dim**-0.5, window=window, budget=budget,
    )  # fmt: skip
    if cached:
        k_ctx, v_ctx = gather_context(batch.kv_cache, batch.block_table, batch.seq_lens.new_tensor([cached]), codec, batch.geometry)
        k_ctx, v_ctx = k_ctx[0], v_ctx[0]
    else:
        k_ctx = v_ctx = torch.zeros(0, kv_heads, head_dim)
    # Each tile's first sink_tokens tokens come from its first block's exact (bf16) copy.
    first_needed = 0 if window is None else max(cached - window + 1, 0)
    for k0 in range((first_needed // block) * block, cached, 2 * block):
        exact = slice(k0, min(k0 + sink, cached))
        k_ctx[exact] = batch.keys[0][exact].to(torch.bfloat16).float()
        v_ctx[exact] = batch.values[0][exact].to(torch.bfloat16).float()
    k = torch.cat([k_ctx, k_new.float()])
    v = torch.cat([v_ctx, v_new.float()])
    ref = _windowed_reference(batch.query, k, v, head_dim**-0.5, window)
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-5, f"seed {seed}: rel err {err}"
    # Bounded memory: no gather is longer than a tile, and together they cover only what is needed.
    assert max(tiles, default=0) <= 2 * block, tiles
    assert sum(tiles) == cached - (first_needed // block) * block, (tiles, seed)


def test_key_tiles_are_whole_blocks():
    assert prefill.key_tile_tokens(16) % 16 == 0
    assert prefill.key_tile_tokens(5000) == 5000  # a block larger than the target tile: one block


@pytest.mark.parametrize("block_size", [16, 32])
def test_verify_rows_decode_like_plain_decoding(block_size):
    """Rows of 1 + k query tokens, expanded per token, equal causal attention over the packed cache."""
    seed = fresh_seed()
    codec = random_codec(PRESETS["sq2_5bit"], 32, 2, seed=seed)
    seq_lens, q_lens = [40, 4, 77, 19], [4, 4, 4, 4]  # uniform verify rows (k = 3), one fully new
    batch = random_paged_batch(codec, seq_lens, q_lens, block_size=block_size, num_query_heads=4, seed=seed)
    nd = batch.num_tokens
    rows = expand_decode_rows(batch.query_start_loc, batch.seq_lens, batch.block_table, len(seq_lens), nd)
    assert rows.seq_lens.tolist() == [37, 38, 39, 40, 1, 2, 3, 4, 74, 75, 76, 77, 16, 17, 18, 19]
    out = torch.full((nd, 4, 32), float("nan"))
    ops.get_impl("torch").decode_attention(
        batch.query, batch.kv_cache, rows.block_table, rows.seq_lens, codec, batch.geometry, 32**-0.5, out
    )
    ref = paged_attention(
        batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, batch.geometry, 32**-0.5
    )
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, f"seed {seed}: rel err {err}"


def test_verify_rows_of_unequal_length_and_padding():
    """Non-uniform rows (a request with fewer drafts) and vLLM's padded empty requests (length 0)."""
    qsl = torch.tensor([0, 3, 4, 6, 6], dtype=torch.int32)
    seq_lens = torch.tensor([10, 5, 2, 0], dtype=torch.int32)
    table = torch.arange(16, dtype=torch.int32).view(4, 4)
    rows = expand_decode_rows(qsl, seq_lens, table, 4, 6)
    assert rows.seq_lens.tolist() == [8, 9, 10, 5, 1, 2]
    assert rows.block_table[:, 0].tolist() == [0, 0, 0, 4, 8, 8]
