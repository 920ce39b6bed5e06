"""Encode K/V head vectors into packed slots and decode them back (torch reference, any device).

Shapes follow vLLM: tokens first, then KV heads, then head_dim. Everything is computed in
float32 and vectorised over tokens, heads and groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_spectralquant.format.bitpack import pack_groups, unpack_groups
from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import GROUP_SIZE, TokenScale

#: Clamp for per-token fp16 fields (largest finite fp16).
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class RotatedCodes:
    """A component decoded into its rotated, sigma-normalised frame.

    ``levels`` [N, H, D] are codebook levels; the rotated vector is ``scale * (s * levels + z)``.
    """

    levels: torch.Tensor  # float32 [N, H, D]
    s: torch.Tensor  # float32 [N, H]
    z: torch.Tensor  # float32 [N, H]


def check_kv_input(x: torch.Tensor, num_kv_heads: int, head_dim: int, what: str, *, strict: bool) -> None:
    """Raise FormatError for a K/V tensor of the wrong shape or dtype, or (strict) with NaN/inf."""
    if not isinstance(x, torch.Tensor):
        raise FormatError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise FormatError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[1] != num_kv_heads or x.shape[2] != head_dim:
        raise FormatError(
            f"{what} must have shape [num_tokens, {num_kv_heads}, {head_dim}], got {tuple(x.shape)}"
        )
    if strict and not torch.isfinite(x).all():
        raise FormatError(f"{what} contains NaN or inf")


def _nearest_level(u: torch.Tensor, comp: ComponentCodec) -> torch.Tensor:
    """Index of the nearest codebook level. u: float32 [N, H, D] -> int64 codes [N, H, G, 8]."""
    n, h, d = u.shape
    g = d // GROUP_SIZE
    cb = comp.codebooks  # [H, G, L]
    levels = (1 << comp.bits.long())[..., None]  # [H, G, 1]
    mids = 0.5 * (cb[..., 1:] + cb[..., :-1])
    # Boundaries past the used levels are +inf, so searchsorted never returns an unused index.
    used = torch.arange(1, cb.shape[-1], device=cb.device).view(1, 1, -1) < levels
    mids = torch.where(used, mids, torch.full_like(mids, float("inf"))).contiguous()
    vals = u.reshape(n, h, g, GROUP_SIZE).permute(1, 2, 0, 3).reshape(h, g, n * GROUP_SIZE).contiguous()
    idx = torch.searchsorted(mids, vals, right=True)
    return idx.reshape(h, g, n, GROUP_SIZE).permute(2, 0, 1, 3)


def _lookup_levels(codes: torch.Tensor, comp: ComponentCodec) -> torch.Tensor:
    """Codebook levels of codes [N, H, G, 8] -> float32 [N, H, D]."""
    n, h, g, _ = codes.shape
    cb = comp.codebooks.unsqueeze(0).expand(n, -1, -1, -1)  # [N, H, G, L]
    return torch.gather(cb, 3, codes).reshape(n, h, g * GROUP_SIZE)


def quantize_rotated(u: torch.Tensor, comp: ComponentCodec) -> torch.Tensor:
    """Nearest codebook level of each coordinate: u float32 [N, H, D] (rotated, sigma units) -> [N, H, D]."""
    return _lookup_levels(_nearest_level(u, comp), comp)


def saturate(x: torch.Tensor) -> torch.Tensor:
    """float32 copy with the defined runtime behaviour for non-finite input: NaN -> 0, +-inf -> +-65504.

    (What an fp16 cache would hold; everything downstream is then finite.)
    """
    return torch.nan_to_num(x.to(torch.float32), nan=0.0, posinf=_FP16_MAX, neginf=-_FP16_MAX)


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)


def encode_component(x: torch.Tensor, comp: ComponentCodec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise one component.

    Args:
        x: float [N, H, D]; non-finite entries are saturated first (see :func:`saturate`).
    Returns:
        codes int64 [N, H, G, 8]; per-token s, z float32 [N, H] (already fp16-rounded).
    """
    x = saturate(x)
    # rn: the rotated, sigma-normalised vector; every token-scale mode is defined on it.
    rn = torch.einsum("nhd,hde->nhe", x - comp.mean, comp.basis) / comp.scale
    n, h, _ = rn.shape
    one, zero = torch.ones(n, h, device=x.device), torch.zeros(n, h, device=x.device)
    if comp.token_scale == TokenScale.NONE:
        u, s, z = rn, one, zero
    elif comp.token_scale == TokenScale.NORM:
        norm = rn.norm(dim=-1)
        u = rn / torch.where(norm > 0, norm, 1.0)[..., None]
        s, z = norm, zero  # s is replaced by the norm-corrected value below
    elif comp.token_scale == TokenScale.AFFINE:
        lo, hi = rn.amin(dim=-1), rn.amax(dim=-1)
        s, z = _fp16_round(hi - lo), _fp16_round(lo)
        u = (rn - z[..., None]) / torch.where(s > 0, s, 1.0)[..., None]
    else:  # pragma: no cover - enum is closed
        raise FormatError(f"unknown token scale {comp.token_scale!r}")
    codes = _nearest_level(u, comp)
    if comp.token_scale == TokenScale.NORM:
        # Norm correction: store |x| / |levels| so the decoded vector has exactly the input norm.
        lv_norm = _lookup_levels(codes, comp).norm(dim=-1)
        s = _fp16_round(torch.where(lv_norm > 0, s / torch.where(lv_norm > 0, lv_norm, 1.0), 0.0))
    return codes, s, z


def _write_fields(slots: torch.Tensor, offset: int, fields: list[torch.Tensor]) -> None:
    for i, f in enumerate(fields):
        slots[..., offset + 2 * i : offset + 2 * i + 2] = f.to(torch.float16).unsqueeze(-1).view(torch.uint8)


def _read_field(slots: torch.Tensor, offset: int) -> torch.Tensor:
    # Stack the two bytes into fresh memory: a strided slice of odd-sized slots cannot be viewed as fp16.
    pair = torch.stack([slots[..., offset], slots[..., offset + 1]], dim=-1)
    return pair.view(torch.float16).squeeze(-1).to(torch.float32)


def _token_fields(comp: ComponentCodec, s: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
    return {TokenScale.NONE: [], TokenScale.NORM: [s], TokenScale.AFFINE: [s, z]}[comp.token_scale]


def encode_slots(key: torch.Tensor, value: torch.Tensor, codec: LayerCodec, *, strict: bool = True) -> torch.Tensor:
    """Pack K and V of N tokens into slots.

    Args:
        key, value: float [N, H, D] post-RoPE keys and values.
        strict: raise on NaN/inf (False: the defined runtime behaviour of :func:`encode_component`).
    Returns:
        uint8 [N, H, slot_bytes].
    """
    check_kv_input(key, codec.num_kv_heads, codec.head_dim, "key", strict=strict)
    check_kv_input(value, codec.num_kv_heads, codec.head_dim, "value", strict=strict)
    if key.shape[0] != value.shape[0]:
        raise FormatError(f"key has {key.shape[0]} tokens but value has {value.shape[0]}")
    n, h = key.shape[0], codec.num_kv_heads
    slots = torch.zeros(n, h, codec.slot_bytes, dtype=torch.uint8, device=key.device)
    k_codes, k_s, k_z = encode_component(key, codec.key)
    v_codes, v_s, v_z = encode_component(value, codec.value)
    _write_fields(slots, codec.key_field_offset, _token_fields(codec.key, k_s, k_z))
    _write_fields(slots, codec.value_field_offset, _token_fields(codec.value, v_s, v_z))
    pack_groups(k_codes, codec.key.bits, codec.key_group_offsets(), slots)
    pack_groups(v_codes, codec.value.bits, codec.value_group_offsets(), slots)
    return slots


def _decode_rotated_component(slots: torch.Tensor, comp: ComponentCodec, field_offset: int, group_offsets) -> RotatedCodes:
    codes = unpack_groups(slots, comp.bits, group_offsets)
    levels = _lookup_levels(codes, comp)
    n, h = slots.shape[:2]
    s = torch.ones(n, h, device=slots.device)
    z = torch.zeros(n, h, device=slots.device)
    if comp.token_scale in (TokenScale.NORM, TokenScale.AFFINE):
        s = _read_field(slots, field_offset)
    if comp.token_scale == TokenScale.AFFINE:
        z = _read_field(slots, field_offset + 2)
    return RotatedCodes(levels, s, z)


def decode_rotated(slots: torch.Tensor, codec: LayerCodec) -> tuple[RotatedCodes, RotatedCodes]:
    """Slots uint8 [N, H, S] -> (keys, values) in their rotated, sigma-normalised frames."""
    check_slots(slots, codec)
    keys = _decode_rotated_component(slots, codec.key, codec.key_field_offset, codec.key_group_offsets())
    values = _decode_rotated_component(slots, codec.value, codec.value_field_offset, codec.value_group_offsets())
    return keys, values


def unrotate(codes: RotatedCodes, comp: ComponentCodec) -> torch.Tensor:
    """Rotated codes -> float32 [N, H, D] vectors in the model's frame (with the decode gain)."""
    r = comp.decode_scale * (codes.s[..., None] * codes.levels + codes.z[..., None])
    return torch.einsum("nhe,hde->nhd", r, comp.basis) + comp.mean


def decode_slots(slots: torch.Tensor, codec: LayerCodec) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots uint8 [N, H, S] -> (key, value) float32 [N, H, D]."""
    keys, values = decode_rotated(slots, codec)
    return unrotate(keys, codec.key), unrotate(values, codec.value)


def check_slots(slots: torch.Tensor, codec: LayerCodec) -> None:
    if slots.dtype != torch.uint8:
        raise FormatError(f"slots must be uint8, got {slots.dtype}")
    if slots.dim() != 3 or slots.shape[1] != codec.num_kv_heads or slots.shape[2] < codec.slot_bytes:
        raise FormatError(
            f"slots must have shape [N, {codec.num_kv_heads}, >= {codec.slot_bytes}], got {tuple(slots.shape)}"
        )
