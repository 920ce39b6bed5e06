"""Paged reference attention == dense attention over the decoded K/V, for mixed batches."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_spectralquant.format import PRESETS, CacheGeometry, paged_attention, store_kv
from vllm_spectralquant.format.paged import read_sinks
from vllm_spectralquant.format.reference_attention import decode_context, dense_causal_attention
from vllm_spectralquant.format.synthetic import random_codec, random_paged_batch


def _check_against_dense(batch, codec, tol=1e-5):
    d = codec.head_dim
    out = torch.full(batch.query.shape, float("nan"))
    paged_attention(batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, batch.geometry, out=out)
    qsl = batch.query_start_loc.tolist()
    for b, n in enumerate(batch.seq_lens.tolist()):
        k, v = decode_context(batch.kv_cache, batch.block_table[b], n, codec, batch.geometry)
        ref = dense_causal_attention(batch.query[qsl[b] : qsl[b + 1]], k, v, d**-0.5)
        got = out[qsl[b] : qsl[b + 1]]
        rel = ((got - ref).norm() / ref.norm()).item()
        assert rel < tol, f"sequence {b}: relative error {rel:.2e}"
    # Padding rows past the last query token are never written.
    assert torch.isnan(out[batch.num_tokens :]).all()


@pytest.mark.parametrize("name", list(PRESETS))
def test_mixed_batch_matches_dense(name):
    codec = random_codec(PRESETS[name], 64, 3, seed=3)
    batch = random_paged_batch(
        codec,
        seq_lens=[1, 17, 40, 5, 33, 70],
        query_lens=[1, 1, 1, 5, 12, 70],  # decodes, a short prefill, a continuation chunk, a first chunk
        num_query_heads=9,
        padding_tokens=4,
        seed=11,
    )
    _check_against_dense(batch, codec)


def test_mixed_batch_with_key_gain_matches_dense():
    """The reference's rotated-frame scores use the keys' decode gain exactly as decoding does."""
    codec = random_codec(PRESETS["sq2_5bit"], 64, 3, seed=4, key_gain=True)
    batch = random_paged_batch(codec, seq_lens=[1, 40, 33], query_lens=[1, 1, 12], num_query_heads=6, padding_tokens=2, seed=12)
    _check_against_dense(batch, codec)


@pytest.mark.parametrize("sink_tokens", [0, 1, 4])
def test_sinks_are_exact_and_count_in_geometry(sink_tokens):
    codec = random_codec(PRESETS["sq2_5bit"], 64, 2, seed=5)
    batch = random_paged_batch(codec, [20, 3], [20, 3], block_size=16, sink_tokens=sink_tokens, seed=2)
    geo = batch.geometry
    assert geo.page_slot_bytes == codec.slot_bytes + -(-sink_tokens * 256 // 16)
    if sink_tokens:
        k, v = read_sinks(batch.kv_cache, batch.block_table[:, 0], geo)
        for b in range(2):
            n = min(sink_tokens, batch.seq_lens[b].item())
            assert torch.equal(k[b, :n], batch.keys[b][:n].bfloat16().float())
            assert torch.equal(v[b, :n], batch.values[b][:n].bfloat16().float())
    _check_against_dense(batch, codec)


def test_store_skips_padding_slots():
    codec = random_codec(PRESETS["tq3bit"], 64, 1)
    geo = CacheGeometry.for_codec(codec, 16)
    cache = torch.zeros(2, 1, 16, geo.page_slot_bytes, dtype=torch.uint8)
    k = torch.randn(3, 1, 64)
    store_kv(k, k, cache, torch.tensor([5, -1, 17]), codec, geo)
    written = (cache != 0).any(-1).flatten().nonzero().flatten().tolist()
    assert written == [5, 17]  # neither token sits at block offset 0, so no sink spill is written


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(list(PRESETS)),
    head_dim=st.sampled_from([32, 64, 128]),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4, 7]),
    block_size=st.sampled_from([8, 16, 32]),
    seqs=st.lists(st.tuples(st.integers(1, 50), st.integers(0, 100)), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_property_paged_equals_dense(name, head_dim, kv_heads, group, block_size, seqs, seed):
    codec = random_codec(PRESETS[name], head_dim, kv_heads, seed=seed)
    seq_lens = [n for n, _ in seqs]
    # Query lengths 1..seq_len: decodes, chunks and whole prefills.
    query_lens = [1 + (r % n) for n, r in seqs]
    batch = random_paged_batch(
        codec, seq_lens, query_lens, block_size=block_size, num_query_heads=kv_heads * group, padding_tokens=seed % 3, seed=seed
    )
    _check_against_dense(batch, codec)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(list(PRESETS)),
    block_size=st.sampled_from([4, 8, 16]),
    sink_tokens=st.integers(0, 2),
    slots=st.lists(st.integers(-1, 47), min_size=1, max_size=24),
    seed=st.integers(0, 2**16),
)
def test_property_store_writes_exactly_the_given_slots(name, block_size, sink_tokens, slots, seed):
    """Random slot mappings with -1 padding: -1 writes nothing; every other slot decodes as encoded."""
    from vllm_spectralquant.format import encode_slots

    codec = random_codec(PRESETS[name], 32, 2, seed=seed)
    geo = CacheGeometry.for_codec(codec, block_size, sink_tokens)
    num_blocks = 48 // block_size
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randint(0, 256, (num_blocks, 2, block_size, geo.page_slot_bytes), dtype=torch.uint8, generator=gen)
    before = cache.clone()
    # Distinct targets (vLLM never writes one slot twice in a step); keep the -1 entries.
    seen, mapping = set(), []
    for s in slots:
        mapping.append(-1 if s in seen else s)
        if s >= 0:
            seen.add(s)
    k = torch.randn(len(mapping), 2, 32, generator=gen)
    v = torch.randn(len(mapping), 2, 32, generator=gen)
    store_kv(k, v, cache, torch.tensor(mapping), codec, geo)
    written = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    expect = encode_slots(k, v, codec)
    for i, s in enumerate(mapping):
        if s < 0:
            continue
        blk, off = divmod(s, block_size)
        written[blk, off] = True
        assert torch.equal(cache[blk, :, off, : geo.slot_bytes], expect[i])
    untouched = ~written[:, None, :].expand(num_blocks, 2, block_size)
    # Slot bytes of unwritten entries are unchanged (spill bytes may change: blocks' offsets < sinks).
    assert torch.equal(cache[..., : geo.slot_bytes][untouched], before[..., : geo.slot_bytes][untouched])


@pytest.mark.parametrize("window", [1, 7, 30, 1000])
def test_windowed_batch_matches_dense(window):
    """With a sliding window every query attends only its last ``window`` positions (itself included)."""
    codec = random_codec(PRESETS["sq3bit"], 64, 3, seed=5)
    batch = random_paged_batch(
        codec, seq_lens=[1, 17, 40, 5, 33, 70], query_lens=[1, 1, 1, 5, 12, 70], num_query_heads=9, padding_tokens=4,
        sink_tokens=2, seed=13,
    )  # fmt: skip
    d = codec.head_dim
    out = torch.full(batch.query.shape, float("nan"))
    paged_attention(
        batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, batch.geometry,
        out=out, window=window,
    )  # fmt: skip
    qsl = batch.query_start_loc.tolist()
    for b, n in enumerate(batch.seq_lens.tolist()):
        k, v = decode_context(batch.kv_cache, batch.block_table[b], n, codec, batch.geometry)
        ref = dense_causal_attention(batch.query[qsl[b] : qsl[b + 1]], k, v, d**-0.5, window=window)
        rel = ((out[qsl[b] : qsl[b + 1]] - ref).norm() / ref.norm()).item()
        assert rel < 1e-5, f"sequence {b}: relative error {rel:.2e}"
    assert torch.isnan(out[batch.num_tokens :]).all()
