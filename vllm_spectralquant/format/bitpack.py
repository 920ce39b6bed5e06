"""Bit packing of code groups into slot bytes (vectorised torch, any device).

A group holds GROUP_SIZE = 8 codes of ``b`` bits (0 <= b <= 8) as one little-endian bitstream of
exactly ``b`` bytes: code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, stream bit ``p`` is bit
``p % 8`` of byte ``p // 8``. Groups have per-head bit widths and byte offsets, so one call
packs every head of a layer at once.

Each output byte is a sum of masked, shifted codes whose bit ranges are disjoint, so sum == OR
and no shift ever exceeds 8 bits (no int64 overflow for 8-bit codes).
"""

from __future__ import annotations

import torch

from vllm_spectralquant.format.presets import GROUP_SIZE

_POS = torch.arange(GROUP_SIZE)


def _shift_table(bits: torch.Tensor) -> torch.Tensor:
    """Signed shifts [H, G, 8 codes, 8 bytes]: code i lands in byte k at ``i*b - 8*k``."""
    pos = _POS.to(bits.device)
    return pos.view(1, 1, -1, 1) * bits.long()[..., None, None] - 8 * pos.view(1, 1, 1, -1)


def pack_groups(codes: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    """Write code groups into slot bytes in place.

    Args:
        codes: int [N, H, G, 8], each code < 2**bits of its group.
        bits: int [H, G] bit width per group.
        offsets: int [H, G] byte offset of each group inside the slot.
        out: uint8 [N, H, S] slots; bytes outside the groups are left untouched.
    """
    n, h, g, _ = codes.shape
    shift = _shift_table(bits)  # [H, G, 8i, 8k]
    c = codes.to(torch.int32)[..., :, None]  # [N, H, G, 8i, 1]
    left = c << shift.clamp(0, 8).to(torch.int32)
    right = c >> (-shift).clamp(0, 8).to(torch.int32)
    contrib = torch.where(shift >= 0, left, right) & 0xFF
    byte_vals = contrib.sum(dim=-2)  # [N, H, G, 8k]; disjoint bits, so sum == OR
    pos = _POS.to(codes.device)
    valid = pos.view(1, 1, -1) < bits.long()[..., None]  # [H, G, 8k]
    dest = offsets.long()[..., None] + pos.view(1, 1, -1)
    # Bytes past a group's width go to a scratch column that is dropped afterwards.
    scratch = out.shape[-1]
    dest = torch.where(valid, dest, torch.full_like(dest, scratch))
    buf = torch.cat([out, torch.zeros_like(out[..., :1])], dim=-1)
    buf.scatter_(2, dest.reshape(1, h, g * GROUP_SIZE).expand(n, -1, -1), byte_vals.reshape(n, h, -1).to(torch.uint8))
    out.copy_(buf[..., :scratch])


def unpack_groups(slots: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Read code groups from slot bytes.

    Args:
        slots: uint8 [N, H, S].
        bits, offsets: int [H, G] as in :func:`pack_groups`.
    Returns:
        int64 [N, H, G, 8] codes (0 for 0-bit groups).
    """
    n, h, s = slots.shape
    g = bits.shape[-1]
    pos = _POS.to(slots.device)
    valid = pos.view(1, 1, -1) < bits.long()[..., None]  # [H, G, 8k]
    src = (offsets.long()[..., None] + pos.view(1, 1, -1)).clamp(max=s - 1)
    gathered = torch.gather(slots, 2, src.reshape(1, h, g * GROUP_SIZE).expand(n, -1, -1).contiguous())
    byte_vals = torch.where(valid, gathered.reshape(n, h, g, GROUP_SIZE).to(torch.int32), 0)
    shift = _shift_table(bits)  # [H, G, 8i, 8k]; code i = sum_k byte_k shifted right by shift
    b = byte_vals[..., None, :]  # [N, H, G, 1, 8k]
    right = b >> shift.clamp(0, 8).to(torch.int32)
    left = b << (-shift).clamp(0, 8).to(torch.int32)
    mask = ((1 << bits.long()) - 1).to(torch.int32)[..., None, None]
    contrib = torch.where(shift >= 0, right, left) & mask
    return contrib.sum(dim=-1).long()


def group_offsets(bits: torch.Tensor, start: int) -> torch.Tensor:
    """Byte offset of each group when groups [.., G] are laid out back to back from ``start``."""
    b = bits.long()
    return start + torch.cumsum(b, dim=-1) - b
