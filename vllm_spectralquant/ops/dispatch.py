"""Pick the implementation of each packed-cache op for the tensors at hand: one registry, one loop.

Order: the CUDA extension (csrc/, CUDA tensors, shapes it is built for) > Triton (CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``) > the torch reference (any device). ``SPECTRALQUANT_OPS``
forces one (``torch``, ``triton``, ``cuda``); forcing one that cannot run the call raises. Each
implementation is a module with the :class:`~vllm_spectralquant.ops.kernel_impl.KernelImpl` names.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.ops.kernel_impl import KernelImpl
from vllm_spectralquant.ops.workspace import DecodeWorkspace

#: Registered implementations, best first: name -> module.
IMPLEMENTATIONS: dict[str, str] = {
    "cuda": "vllm_spectralquant.ops.cuda_ext",
    "triton": "vllm_spectralquant.ops.triton_kernels",
    "torch": "vllm_spectralquant.ops.torch_reference",
}
BACKENDS = tuple(IMPLEMENTATIONS)


def get_impl(name: str) -> KernelImpl:
    """The implementation registered as ``name`` (imported on first use)."""
    try:
        return importlib.import_module(IMPLEMENTATIONS[name])  # type: ignore[return-value]
    except KeyError:
        raise ValueError(f"unknown kernel implementation {name!r}: choose one of {', '.join(BACKENDS)}") from None


def available_backends(device: torch.device) -> list[str]:
    """Implementations usable for tensors on ``device``, best first."""
    return [name for name in IMPLEMENTATIONS if get_impl(name).is_available(device)]


def _choose(device: torch.device, covers: Callable[[str], bool]) -> str:
    forced = os.environ.get("SPECTRALQUANT_OPS")
    if forced and forced not in IMPLEMENTATIONS:
        raise ValueError(f"SPECTRALQUANT_OPS={forced!r}: choose one of {', '.join(BACKENDS)}")
    have = [name for name in available_backends(device) if covers(name)]
    if forced:
        if forced not in have:
            raise RuntimeError(f"SPECTRALQUANT_OPS={forced} cannot run this call on {device} (available: {', '.join(have)})")
        return forced
    return have[0]


def backend_for(device: torch.device, cuda_supported: bool = True) -> str:
    """The implementation a call on ``device`` takes (``cuda_supported``: the CUDA kernels cover its shape)."""
    return _choose(torch.device(device), lambda name: name != "cuda" or cuda_supported)


def impl_for(
    device: torch.device, decode_shape: tuple[LayerCodec, CacheGeometry, int, int | None] | None = None
) -> KernelImpl:
    """The implementation for a call on ``device``; ``decode_shape`` (codec, geometry, query heads, window) for decode."""
    if decode_shape is None:
        return get_impl(_choose(torch.device(device), lambda name: True))
    return get_impl(_choose(torch.device(device), lambda name: get_impl(name).decode_supported(*decode_shape)))


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
) -> None:
    """Quantise, pack and write new tokens (``slot_mapping`` -1 = skip); see ``format.paged.store_kv``.

    Runtime semantics (no exceptions on the hot path): non-finite K/V map to defined finite codes.
    """
    impl_for(kv_cache.device).store_kv(key, value, kv_cache, slot_mapping, codec, geometry)


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
    softmax_scale: float,
    out: torch.Tensor,
    workspace: DecodeWorkspace | None = None,
    window: int | None = None,
) -> None:
    """One query token per sequence (at position seq_len-1) over its packed context.

    query [B, Hq, D]; block_table int32 [>= B, max_blocks]; seq_lens int32 [B]; out [B, Hq, D] (written).
    ``workspace``: a :class:`~vllm_spectralquant.ops.workspace.DecodeWorkspace` preallocated for the
    largest batch; with it the CUDA path allocates nothing and is CUDA-graph safe.
    ``window``: a sliding window of that many tokens (vLLM's convention, the query token included): only
    positions ``seq_len - window .. seq_len - 1`` are read, so earlier block-table entries may point at
    freed or reused blocks. None: the whole context.
    """
    impl = impl_for(kv_cache.device, (codec, geometry, query.shape[1], window))
    impl.decode_attention(
        query, kv_cache, block_table, seq_lens, codec, geometry, softmax_scale, out, workspace, window=window
    )


def gather_context(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised context K, V float32 [B, max(seq_lens), H, D] (exact sinks; zero padding)."""
    return impl_for(kv_cache.device).gather_context(kv_cache, block_table, seq_lens, codec, geometry)
