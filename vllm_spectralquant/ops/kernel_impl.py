"""The interface every packed-cache kernel implementation provides (torch reference, Triton, CUDA).

An implementation is a module with these names (``ops.torch_reference``, ``ops.triton_kernels``,
``ops.cuda_ext``); ``ops.dispatch`` holds the registry, picks one per call with a single loop, and
``ops.get_impl(name)`` hands one to benches and tests by name. All of them compute what the torch
reference in ``vllm_spectralquant.format`` computes (docs/FORMAT.md) and differ only in speed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec


@runtime_checkable
class KernelImpl(Protocol):
    NAME: str

    def is_available(self, device: torch.device | str) -> bool:
        """Whether this implementation runs on tensors of ``device`` in this process."""

    def decode_supported(
        self, codec: LayerCodec, geometry: CacheGeometry, num_query_heads: int, window: int | None = None
    ) -> bool:
        """Whether its decode kernel covers this shape and window (store and gather cover every shape)."""

    def store_kv(self, key, value, kv_cache, slot_mapping, codec: LayerCodec, geometry: CacheGeometry) -> None:
        """Quantise, pack and write new tokens (``slot_mapping`` -1 = skip)."""

    def decode_attention(
        self, query, kv_cache, block_table, seq_lens, codec: LayerCodec, geometry: CacheGeometry, softmax_scale: float,
        out, workspace=None, window: int | None = None,
    ) -> None:  # fmt: skip
        """One query token per sequence over its packed context (``window``: only its last ``window`` tokens)."""

    def gather_context(self, kv_cache, block_table, seq_lens, codec: LayerCodec, geometry: CacheGeometry):
        """Dequantised context K, V float32 [B, max(seq_lens), H, D]."""


__all__ = ["KernelImpl"]
