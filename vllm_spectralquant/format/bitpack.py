"""Bit packing of code groups into slot bytes (vectorised torch, any device).

A group holds GROUP_SIZE = 8 codes of ``b`` bits (0 <= b <= 8) as one little-endian bitstream of
exactly ``b`` bytes: code ``i`` occupies stream bits ``[i*b, (i+1)*b)``, stream bit ``p`` is bit
``p % 8`` of byte ``p // 8``. Groups have per-head bit widths and byte offsets, so one call
packs every head of a layer at once.

A group of b <= 7 bits fits one little-endian int64 word of at most 56 bits, so packing and
unpacking are a shift and a mask per code; 8-bit groups are their bytes.
"""

from __future__ import annotations

import torch

from vllm_spectralquant.format.presets import GROUP_SIZE

_POS = torch.arange(GROUP_SIZE)


def pack_groups(codes: torch.Tensor, bits: torch.Tensor, offsets: torch.Tensor, out: torch.Tensor) -> None:
    """Write code groups into slot bytes in place.

    Args:
        codes: int [N, H, G, 8], each code < 2**bits of its group.
        bits: int [H, G] bit width per group.
        offsets: int [H, G] byte offset of each group inside the slot.
        out: uint8 [N, H, S] slots; bytes outside the groups are left untouched.
    """
    n, h, g, _ = codes.shape
    pos = _POS.to(codes.device)
    b = bits.long()
    c = codes.long()
    # For b <= 7 the 8 codes make one word of at most 56 bits (no int64 overflow); an 8-bit
    # group's bytes are its codes. Codes have disjoint bit ranges, so the sum is their OR.
    small = torch.where((b < 8)[..., None], c, 0)
    word = (small << (pos * b[..., None])).sum(-1, keepdim=True)  # [N, H, G, 1]
    byte_vals = torch.where((b == 8)[..., None], c, (word >> (8 * pos)) & 0xFF)
    valid = pos.view(1, 1, -1) < b[..., None]  # [H, G, 8 bytes]
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
    b = bits.long()
    valid = pos.view(1, 1, -1) < b[..., None]  # [H, G, 8 bytes]
    src = (offsets.long()[..., None] + pos.view(1, 1, -1)).clamp(max=s - 1)
    gathered = torch.gather(slots, 2, src.reshape(1, h, g * GROUP_SIZE).expand(n, -1, -1).contiguous())
    byte_vals = torch.where(valid, gathered.reshape(n, h, g, GROUP_SIZE).long(), 0)
    # A group of b <= 7 bytes is one little-endian word of at most 56 bits (no int64 overflow);
    # an 8-bit group's codes are its bytes.
    word = (byte_vals[..., :7] << (8 * pos[:7])).sum(-1, keepdim=True)  # [N, H, G, 1]
    codes = (word >> (pos * b[..., None])) & ((1 << b) - 1)[..., None]
    return torch.where((b == 8)[..., None], byte_vals, codes)


def group_offsets(bits: torch.Tensor, start: int) -> torch.Tensor:
    """Byte offset of each group when groups [.., G] are laid out back to back from ``start``."""
    b = bits.long()
    return start + torch.cumsum(b, dim=-1) - b
