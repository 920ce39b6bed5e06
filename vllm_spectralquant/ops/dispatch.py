"""Pick the implementation of each packed-cache op for the tensors at hand.

Order: the CUDA extension (csrc/, CUDA tensors, shapes it is built for) > Triton (CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``) > the torch reference (any device). ``SPECTRALQUANT_OPS``
forces one (``torch``, ``triton``, ``cuda``); forcing one that cannot run the call raises.
"""

from __future__ import annotations

import os

import torch

from vllm_spectralquant.format import reference_attention
from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.paged import store_kv as _store_kv_reference
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.ops.workspace import DecodeWorkspace

BACKENDS = ("cuda", "triton", "torch")


def available_backends(device: torch.device) -> list[str]:
    """Implementations usable for tensors on ``device``, best first."""
    device = torch.device(device)
    out = []
    if device.type == "cuda":
        from vllm_spectralquant.ops import cuda_ext

        if cuda_ext.is_available():
            out.append("cuda")
    from vllm_spectralquant.ops import triton_kernels

    if triton_kernels.is_available(device):
        out.append("triton")
    out.append("torch")
    return out


def backend_for(device: torch.device, cuda_supported: bool = True) -> str:
    """The implementation a call on ``device`` takes (``cuda_supported``: the CUDA kernels cover its shape)."""
    forced = os.environ.get("SPECTRALQUANT_OPS")
    have = [b for b in available_backends(device) if b != "cuda" or cuda_supported]
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"SPECTRALQUANT_OPS={forced!r}: choose one of {', '.join(BACKENDS)}")
        if forced not in have:
            raise RuntimeError(f"SPECTRALQUANT_OPS={forced} cannot run this call on {device} (available: {', '.join(have)})")
        return forced
    return have[0]


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
    impl = backend_for(kv_cache.device)
    if impl == "torch":
        _store_kv_reference(key, value, kv_cache, slot_mapping, codec, geometry, strict=False)
    elif impl == "triton":
        from vllm_spectralquant.ops import triton_kernels

        triton_kernels.store_kv(key, value, kv_cache, slot_mapping, codec, geometry)
    else:
        from vllm_spectralquant.ops import cuda_ext

        cuda_ext.store_kv(key, value, kv_cache, slot_mapping, codec, geometry)


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
) -> None:
    """One query token per sequence (at position seq_len-1) over its packed context.

    query [B, Hq, D]; block_table int32 [>= B, max_blocks]; seq_lens int32 [B]; out [B, Hq, D] (written).
    ``workspace``: a :class:`~vllm_spectralquant.ops.workspace.DecodeWorkspace` preallocated for the
    largest batch; with it the CUDA path allocates nothing and is CUDA-graph safe.
    """
    from vllm_spectralquant.ops import cuda_ext

    impl = backend_for(kv_cache.device, cuda_ext.decode_supported(codec, geometry, query.shape[1]))
    if impl == "torch":
        b = seq_lens.shape[0]
        qsl = torch.arange(b + 1, device=query.device, dtype=torch.int32)
        res = reference_attention.paged_attention(
            query[:b], kv_cache, block_table[:b], seq_lens, qsl, codec, geometry, softmax_scale, validate=False
        )
        out[:b] = res.to(out.dtype)
    elif impl == "triton":
        from vllm_spectralquant.ops import triton_kernels

        triton_kernels.decode_attention(query, kv_cache, block_table, seq_lens, codec, geometry, softmax_scale, out, workspace)
    else:
        cuda_ext.decode_attention(query, kv_cache, block_table, seq_lens, codec, geometry, softmax_scale, out, workspace)


def gather_context(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised context K, V float32 [B, max(seq_lens), H, D] (exact sinks; zero padding)."""
    impl = backend_for(kv_cache.device)
    if impl == "torch":
        return reference_attention.gather_context(kv_cache, block_table, seq_lens, codec, geometry)
    if impl == "triton":
        from vllm_spectralquant.ops import triton_kernels

        return triton_kernels.gather_context(kv_cache, block_table, seq_lens, codec, geometry)
    from vllm_spectralquant.ops import cuda_ext

    return cuda_ext.gather_context(kv_cache, block_table, seq_lens, codec, geometry)
