"""Bad input gets a FormatError that names the problem."""

import pytest
import torch

from vllm_spectralquant.format import PRESETS, CacheGeometry, FormatError, encode_slots, get_preset, paged_attention, store_kv
from vllm_spectralquant.format.synthetic import random_codec, random_paged_batch
from vllm_spectralquant.format.turboquant import turboquant_codec


@pytest.fixture(scope="module")
def codec():
    return random_codec(PRESETS["sq3bit"], 64, 2)


def test_nan_and_inf_rejected(codec):
    k = torch.randn(3, 2, 64)
    k[1, 1, 5] = float("nan")
    with pytest.raises(FormatError, match="key contains NaN or inf"):
        encode_slots(k, torch.randn(3, 2, 64), codec)
    v = torch.randn(3, 2, 64)
    v[0, 0, 0] = float("inf")
    with pytest.raises(FormatError, match="value contains NaN or inf"):
        encode_slots(torch.randn(3, 2, 64), v, codec)


def test_wrong_dtype_and_shape(codec):
    with pytest.raises(FormatError, match="floating-point"):
        encode_slots(torch.zeros(3, 2, 64, dtype=torch.int32), torch.randn(3, 2, 64), codec)
    with pytest.raises(FormatError, match=r"shape \[num_tokens, 2, 64\]"):
        encode_slots(torch.randn(3, 3, 64), torch.randn(3, 3, 64), codec)
    with pytest.raises(FormatError, match="3 tokens but value has 4"):
        encode_slots(torch.randn(3, 2, 64), torch.randn(4, 2, 64), codec)


@pytest.mark.parametrize("head_dim", [12, 100, 512])
def test_unsupported_head_dim(head_dim):
    with pytest.raises(FormatError, match=f"unsupported head_dim {head_dim}"):
        PRESETS["sq3bit"].slot_bytes(head_dim)


def test_turboquant_needs_power_of_two():
    with pytest.raises(FormatError, match="power of 2"):
        turboquant_codec(PRESETS["tq3bit"], 96, 1)


def test_unknown_preset():
    with pytest.raises(FormatError, match="unknown preset 'spectralquant_sq9bit'.*sq3bit"):
        get_preset("spectralquant_sq9bit")


def test_block_table_out_of_range(codec):
    batch = random_paged_batch(codec, [20, 9], [1, 1], block_size=8)
    batch.block_table[1, 1] = batch.kv_cache.shape[0] + 7
    with pytest.raises(FormatError, match=r"block_table\[1, 1\] = .* out of range"):
        paged_attention(batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, batch.geometry)


def test_block_table_too_narrow(codec):
    batch = random_paged_batch(codec, [20], [1], block_size=8)
    with pytest.raises(FormatError, match="needs 3 blocks, but the block table has 2 columns"):
        paged_attention(batch.query, batch.kv_cache, batch.block_table[:, :2], batch.seq_lens, batch.query_start_loc, codec, batch.geometry)


def test_query_longer_than_sequence(codec):
    batch = random_paged_batch(codec, [4], [4], block_size=8)
    with pytest.raises(FormatError, match="query length <= seq_len"):
        paged_attention(batch.query, batch.kv_cache, batch.block_table, torch.tensor([3]), batch.query_start_loc, codec, batch.geometry)


def test_cache_shape_and_slot_range(codec):
    geo = CacheGeometry.for_codec(codec, 16)
    bad = torch.zeros(2, 2, 16, geo.page_slot_bytes + 1, dtype=torch.uint8)
    with pytest.raises(FormatError, match="kv_cache must have shape"):
        store_kv(torch.randn(1, 2, 64), torch.randn(1, 2, 64), bad, torch.tensor([0]), codec, geo)
    cache = torch.zeros(2, 2, 16, geo.page_slot_bytes, dtype=torch.uint8)
    with pytest.raises(FormatError, match="slot_mapping entry 40 is out of range"):
        store_kv(torch.randn(1, 2, 64), torch.randn(1, 2, 64), cache, torch.tensor([40]), codec, geo)
    with pytest.raises(FormatError, match="kv_cache must be a uint8"):
        store_kv(torch.randn(1, 2, 64), torch.randn(1, 2, 64), cache.float(), torch.tensor([0]), codec, geo)


def test_sinks_bounded_by_block_size():
    with pytest.raises(FormatError, match="sink_tokens"):
        CacheGeometry(64, 43, block_size=4, sink_tokens=5)


def test_codec_validation_catches_bad_parameters(codec):
    import dataclasses

    bad_basis = dataclasses.replace(codec.key, basis=codec.key.basis * 2)
    with pytest.raises(FormatError, match="not orthonormal"):
        dataclasses.replace(codec, key=bad_basis).validate()
    too_many_bits = dataclasses.replace(codec.key, bits=torch.full_like(codec.key.bits, 8))
    with pytest.raises(FormatError, match="code bytes per head-token"):
        dataclasses.replace(codec, key=too_many_bits).validate()
    nan_mean = dataclasses.replace(codec.value, mean=codec.value.mean.clone().fill_(float("nan")))
    with pytest.raises(FormatError, match="value.mean contains NaN"):
        dataclasses.replace(codec, value=nan_mean).validate()
