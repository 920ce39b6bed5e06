"""vLLM's own compressed KV caches as quantise→dequantise round trips, and the bytes vLLM allocates for them.

The CPU vLLM (0.32) cannot serve these cache dtypes (their kernels are Triton/CUDA only), so our backend
emulates them on a dense cache (``emulated_dense.py``): each new K/V is rounded here, at store time,
exactly as vLLM's store would quantise it, and attention reads the dequantised values. Attention on the
dequantised values equals attention on vLLM's packed cache up to float rounding (vLLM's kernels dequantise
inside the dot products and keep some intermediates in fp16). Where vLLM's code is plain torch it is
called (TurboQuant's centroids, Hadamard matrix and boundary-layer rule; int4_per_token_head's RHT);
where it is Triton only, the functions below re-implement it in torch and name the kernel they mirror.

Every round trip maps ``x [tokens, kv_heads, head_dim]`` (any float dtype) to a tensor of the same shape
and dtype. Bytes per head-token (K and V together) come from vLLM's own ``customize_spec`` of the backend
that would serve the format (TurboQuant slot sizes, TRITON_ATTN's inline fp32 scales, fp8's 1 B/coord).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm_spectralquant.emulation import EmulatedMethod, get_emulated

def full_precision_bytes(head_dim: int) -> int:
    """Bytes per head-token of an uncompressed layer (bf16 K and V), the reference's byte convention."""
    return 4 * head_dim


# --------------------------------------------------------------------------- bf16 / fp8


def bf16_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and back: the noise floor (what a bf16 cache does to an fp32 model's K/V)."""
    return x.to(torch.bfloat16).to(x.dtype)


def fp8_e4m3_roundtrip(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """vLLM's ``fp8`` cache (e4m3): ``x / scale`` saturated to ±448, cast to float8_e4m3fn, times ``scale``.

    Mirrors the store of ``vllm/v1/attention/ops/triton_reshape_and_cache_flash.py`` (and CUDA's
    ``scaled_fp8_conversion``, which saturates to the finite range); vLLM's scale is 1.0 when no
    scales are calibrated.
    """
    fp8 = torch.float8_e4m3fn
    limit = torch.finfo(fp8).max
    y = (x.float() / scale).clamp(-limit, limit).to(fp8)
    return (y.float() * scale).to(x.dtype)


# --------------------------------------------------------------------------- int4_per_token_head


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # Triton's ``where(x >= 0, (x + 0.5).to(int32), (x - 0.5).to(int32))``: round half away from zero.
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def int4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [.., D] (float, 0..15) and the packed fp32 scale [..] of already-rotated ``x``.

    Torch mirror of ``_reshape_cache_int4_kernel`` (vllm/v1/attention/ops/int4_per_token_head.py):
    asymmetric int4 over the head's coordinates, scale = max((max - min) / 15, 1e-6), zero point
    round(-min / scale) clamped to 0..15 and hidden in the scale's 4 low mantissa bits.
    """
    x = x.float()
    lo, hi = x.amin(-1), x.amax(-1)
    scale = torch.clamp((hi - lo) / 15.0, min=1e-6)
    zp = _round_half_away(-lo / scale).clamp(0, 15)
    codes = _round_half_away(x * (1.0 / scale)[..., None] + zp[..., None]).clamp(0, 15)
    packed = ((scale.view(torch.int32) & -16) | (zp.to(torch.int32) & 0xF)).view(torch.float32)
    return codes, packed


def int4_dequantize(codes: torch.Tensor, packed_scale: torch.Tensor) -> torch.Tensor:
    """Rotated values back from codes and the packed scale, as ``_attn_packed`` reads them:
    zero point = low 4 bits, scale = the scale with those bits cleared, value = (code - zp) * scale."""
    bits = packed_scale.view(torch.int32)
    zp = (bits & 0xF).float()
    scale = (bits & -16).view(torch.float32)
    return (codes - zp[..., None]) * scale[..., None]


def int4_per_token_head_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """vLLM's ``int4_per_token_head``: ``single_rht`` (vLLM's own), int4 round trip, inverse RHT.

    ``reshape_and_cache_int4`` rotates with ``single_rht(x.float()).to(x.dtype)`` before quantising and
    ``unified_attention_int4`` rotates the query the same way, dividing by the RHT norm ``b`` (the largest
    power-of-2 divisor of D): attention on ``single_rht(x̂, inverse=True) / b`` is the same attention.
    """
    from vllm.utils.math_utils import largest_power_of_2_divisor
    from vllm.v1.attention.ops.int4_per_token_head import single_rht

    rotated = single_rht(x.float()).to(x.dtype)
    codes, scale = int4_quantize(rotated)
    back = single_rht(int4_dequantize(codes, scale), inverse=True) / largest_power_of_2_divisor(x.shape[-1])
    return back.to(x.dtype)


# --------------------------------------------------------------------------- TurboQuant


@dataclass(frozen=True)
class TurboQuantTables:
    """vLLM's TurboQuant tables for one head dim and preset (as ``TurboQuantAttentionImpl._ensure_on_device``)."""

    hadamard: torch.Tensor  # [D, D] float32, orthonormal and symmetric (Pi = PiT)
    centroids: torch.Tensor  # [2**key_bits] float32, Lloyd-Max for N(0, 1/D)
    midpoints: torch.Tensor  # [2**key_bits - 1] float32
    key_bits: int
    value_bits: int
    norm_correction: bool


@functools.cache
def turboquant_tables(preset: str, head_dim: int) -> TurboQuantTables:
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.attention.backends.turboquant_attn import _build_hadamard

    cfg = TurboQuantConfig.from_cache_dtype(preset, head_dim)
    if cfg.key_fp8:
        raise NotImplementedError(f"{preset}: FP8 TurboQuant keys are not emulated (only the MSE-key presets)")
    centroids = get_centroids(head_dim, cfg.centroid_bits).float()
    c_sorted, _ = centroids.sort()
    return TurboQuantTables(
        _build_hadamard(head_dim, "cpu").float(), centroids, (c_sorted[:-1] + c_sorted[1:]) / 2,
        cfg.key_mse_bits, cfg.effective_value_quant_bits, cfg.norm_correction,
    )


def turboquant_key_roundtrip(k: torch.Tensor, t: TurboQuantTables) -> torch.Tensor:
    """TurboQuant keys: the store's normalise + rotate (``triton_turboquant_store``), the bucketize of
    ``_tq_fused_store_mse`` (index = number of midpoints <= y) with the norm kept in fp16, and the
    dequant of ``_tq_full_dequant_kv`` (centroids, re-normalised when norm_correction, times the fp16
    norm) followed by the inverse rotation of ``_continuation_prefill`` (``@ Pi``)."""
    h = t.hadamard.to(k.device)
    flat = k.float().reshape(-1, k.shape[-1])
    norms = flat.norm(dim=1, keepdim=True)
    y = (flat / (norms + 1e-8)) @ h
    idx = torch.searchsorted(t.midpoints.to(k.device), y.contiguous(), right=True)
    c = t.centroids.to(k.device)[idx]
    if t.norm_correction:
        c = c / torch.sqrt((c * c).sum(dim=1, keepdim=True) + 1e-16)
    recon = (norms.half().float() * c) @ h
    return recon.reshape(k.shape).to(k.dtype)


def turboquant_value_roundtrip(v: torch.Tensor, bits: int) -> torch.Tensor:
    """TurboQuant values: uniform ``bits``-bit quantisation over the head's coordinates, as
    ``_store_quantized_value`` (scale = max((max - min) / (2**bits - 1), 1e-8), code = trunc((v - min) /
    scale + 0.5) clamped), dequantised with the fp16 scale and fp16 minimum it stores."""
    x = v.float()
    levels = 2**bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 1e-8, scale, torch.full_like(scale, 1e-8))
    codes = torch.trunc((x - lo) / scale + 0.5).clamp(0, levels)
    return (codes * scale.half().float() + lo.half().float()).to(v.dtype)


# --------------------------------------------------------------------------- dispatch and bytes


def roundtrip(method: str | EmulatedMethod, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) after the emulated method's store; both ``[tokens, kv_heads, head_dim]``, dtype kept."""
    m = get_emulated(method) if isinstance(method, str) else method
    if m.name == "bf16_rounded":
        return bf16_roundtrip(key), bf16_roundtrip(value)
    if m.name == "fp8":
        return fp8_e4m3_roundtrip(key), fp8_e4m3_roundtrip(value)
    if m.name == "int4_per_token_head":
        return int4_per_token_head_roundtrip(key), int4_per_token_head_roundtrip(value)
    if m.name.startswith("turboquant_"):
        t = turboquant_tables(m.name, key.shape[-1])
        return turboquant_key_roundtrip(key, t), turboquant_value_roundtrip(value, t.value_bits)
    raise NotImplementedError(f"no round trip for emulated method {m.name!r}")


def vllm_bytes_per_head_token(method: str | EmulatedMethod, head_dim: int) -> int:
    """Bytes per head-token (K and V) that vLLM allocates for a compressed layer of this format:
    the page size of its backend's ``customize_spec`` for one KV head, divided by the block size."""
    import torch as _torch
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

    m = get_emulated(method) if isinstance(method, str) else method
    if m.vllm_name is None:  # the noise floor: a bf16 cache
        return full_precision_bytes(head_dim)
    if m.vllm_name.startswith("turboquant_"):
        from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend as Backend
    else:
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend as Backend
    block = 16
    spec = FullAttentionSpec(
        block_size=block, num_kv_heads=1, head_size=head_dim,
        dtype=STR_DTYPE_TO_TORCH_DTYPE.get(m.vllm_name, _torch.uint8), kv_quant_mode=get_kv_quant_mode(m.vllm_name),
    )
    page = Backend.customize_spec(spec).page_size_bytes
    if page % block:
        raise ValueError(f"{m.vllm_name}: vLLM's page of {page} B is not a whole number of bytes per token")
    return page // block


def full_precision_layers(method: str | EmulatedMethod, model_config) -> list[int]:
    """Layers vLLM keeps uncompressed for this format: TurboQuant's boundary skip (first and last 2
    attention layers of a dense model, ``TurboQuantConfig.get_boundary_skip_layers``), else none."""
    m = get_emulated(method) if isinstance(method, str) else method
    if m.vllm_name is None or not m.vllm_name.startswith("turboquant_"):
        return []
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig

    return sorted(int(i) for i in TurboQuantConfig.get_boundary_skip_layers(model_config))


def mean_bytes_per_head_token(method: str | EmulatedMethod, head_dim: int, num_layers: int, skipped: list[int]) -> float:
    """Bytes per head-token averaged over the model's layers, full-precision layers at 4 * head_dim (bf16)."""
    compressed = vllm_bytes_per_head_token(method, head_dim)
    return (len(skipped) * full_precision_bytes(head_dim) + (num_layers - len(skipped)) * compressed) / num_layers
