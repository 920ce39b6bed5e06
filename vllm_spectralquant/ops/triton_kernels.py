"""Triton twins of the packed-cache kernels: the fallback when the CUDA extension is unavailable.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter; it is
read when the kernels are defined, so set it before the first call). The kernel modules are
imported lazily: importing this one never imports Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

NAME = "triton"


def decode_supported(codec, geometry, num_query_heads: int, window: int | None = None) -> bool:
    """The Triton decode covers every shape the format allows, sliding windows included."""
    return True


def is_available(device: torch.device | str) -> bool:
    """True for CUDA tensors with Triton importable, or CPU tensors when TRITON_INTERPRET=1."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def store_kv(key, value, kv_cache, slot_mapping, codec, geometry) -> None:
    """See ``ops.dispatch.store_kv``."""
    from vllm_spectralquant.ops import triton_store

    triton_store.store_kv(key, value, kv_cache, slot_mapping, codec, geometry)


def decode_attention(
    query, kv_cache, block_table, seq_lens, codec, geometry, softmax_scale, out, workspace=None, window=None
) -> None:
    """See ``ops.dispatch.decode_attention``."""
    from vllm_spectralquant.ops import triton_decode

    triton_decode.decode_attention(
        query, kv_cache, block_table, seq_lens, codec, geometry, softmax_scale, out, workspace, window
    )


def gather_context(kv_cache, block_table, seq_lens, codec, geometry):
    """See ``ops.dispatch.gather_context``."""
    from vllm_spectralquant.ops import triton_gather

    return triton_gather.gather_context(kv_cache, block_table, seq_lens, codec, geometry)
