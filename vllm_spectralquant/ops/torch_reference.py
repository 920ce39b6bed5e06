"""The torch reference as a kernel implementation (any device; what the other implementations must equal)."""

from __future__ import annotations

import torch

from vllm_spectralquant.format import reference_attention
from vllm_spectralquant.format.paged import store_kv as _reference_store

NAME = "torch"


def is_available(device: torch.device | str) -> bool:
    return True


def decode_supported(codec, geometry, num_query_heads: int, window: int | None = None) -> bool:
    return True


def store_kv(key, value, kv_cache, slot_mapping, codec, geometry) -> None:
    """Runtime semantics: non-finite K/V map to defined finite codes (no exceptions on the hot path)."""
    _reference_store(key, value, kv_cache, slot_mapping, codec, geometry, strict=False)


def decode_attention(
    query, kv_cache, block_table, seq_lens, codec, geometry, softmax_scale, out, workspace=None, window=None
) -> None:
    b = seq_lens.shape[0]
    qsl = torch.arange(b + 1, device=query.device, dtype=torch.int32)
    res = reference_attention.paged_attention(
        query[:b], kv_cache, block_table[:b], seq_lens, qsl, codec, geometry, softmax_scale, validate=False, window=window
    )
    out[:b] = res.to(out.dtype)


def gather_context(kv_cache, block_table, seq_lens, codec, geometry):
    return reference_attention.gather_context(kv_cache, block_table, seq_lens, codec, geometry)
