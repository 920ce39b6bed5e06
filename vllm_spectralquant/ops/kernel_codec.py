"""A LayerCodec's parameters as the kernels want them: flat, contiguous device tensors, built once.

Everything here is derived from ``vllm_spectralquant.format`` (bit widths, slot offsets, codebooks,
bases); nothing restates the format. Two views of the same codes:

* per group (CUDA): ``meta`` int32 [H, G, 4] = (slot byte offset, LUT entry offset, bits, mask);
* per coordinate (Triton): int32 [H, DP] arrays giving, for rotated coordinate ``j``, the slot byte
  holding its first bit, the bit shift inside that byte, whether the code spills into the next byte,
  the code mask and the LUT offset of its group. ``DP`` is ``head_dim`` rounded up to a power of 2
  (Triton block shapes); padded coordinates have mask 0 and decode to a zero weight.

Codebook levels are stored compactly: group ``g`` of head ``h`` owns ``2**bits`` entries starting
at ``lut_offset[h, g]`` of ``lut32[h]`` / ``lut16[h]`` (float32 for store/gather, float16 for the
decode kernels' tensor-core operands). Tables are laid out in *stripes* of four groups
``{c * P + p : c = 0..3}`` (``P = G / 4``), the groups the four lanes of an MMA quad decode at the
same time, each table aligned to its own size: small tables of a stripe then sit in distinct
shared-memory banks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import GROUP_SIZE


def padded_dim(head_dim: int) -> int:
    """Smallest power of 2 >= head_dim (Triton block shapes must be powers of 2)."""
    return 1 << (head_dim - 1).bit_length()


def _lut_layout(bits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """LUT entry offsets int32 [H, G] and the entries per head (max over heads, a multiple of 8)."""
    h, g = bits.shape
    stripes = g // 4 if g % 4 == 0 else 0
    offsets = torch.zeros(h, g, dtype=torch.int32)
    size = 0
    for head in range(h):
        sizes = [1 << int(b) for b in bits[head]]
        if stripes:
            order = [c * stripes + p for p in range(stripes) for c in range(4)]
        else:
            order = list(range(g))
        cursor = 0
        # Within a stripe, largest tables first: every table starts at a multiple of its size.
        for start in range(0, g, 4 if stripes else g):
            for grp in sorted(order[start : start + (4 if stripes else g)], key=lambda x: -sizes[x]):
                cursor = -(-cursor // sizes[grp]) * sizes[grp]
                offsets[head, grp] = cursor
                cursor += sizes[grp]
        size = max(size, cursor)
    return offsets, -(-size // 8) * 8


@dataclass(frozen=True)
class KernelComponent:
    """Keys or values of one layer, in kernel form (all tensors on the kernel's device)."""

    mode: int  # format.presets.TokenScale: 0 none, 1 norm, 2 affine
    field_offset: int  # slot byte of the first fp16 token field
    meta: torch.Tensor  # int32 [H, G, 4]: byte offset, LUT offset, bits, mask
    lut32: torch.Tensor  # float32 [H, LUTN] codebook levels (sigma units)
    lut16: torch.Tensor  # float16 [H, LUTN]
    basis: torch.Tensor  # float32 [H, D, D]  U (rotated = (x - mean) @ U)
    basis_t: torch.Tensor  # float32 [H, D, D]  U^T, contiguous (x = rotated @ U^T + mean)
    mean: torch.Tensor  # float32 [H, D]
    scale: torch.Tensor  # float32 [H, D]
    # Per rotated coordinate j (Triton), int32 [H, DP]:
    coord_byte: torch.Tensor  # slot byte holding the code's first bit
    coord_shift: torch.Tensor  # bit of that byte where the code starts
    coord_two: torch.Tensor  # 1 when the code continues into the next byte
    coord_mask: torch.Tensor  # (1 << bits) - 1; 0 for padded coordinates
    coord_lut: torch.Tensor  # LUT offset of the coordinate's group
    coord_pack_shift: torch.Tensor  # (j % 8) * bits: the code's bit inside its group's stream


def _component(comp: ComponentCodec, field_offset: int, group_offsets: torch.Tensor, device) -> KernelComponent:
    h, d = comp.num_kv_heads, comp.head_dim
    g, dp = d // GROUP_SIZE, padded_dim(d)
    bits = comp.bits.detach().to("cpu", torch.int32)
    offsets = group_offsets.detach().to("cpu", torch.int64)
    lut_off, lutn = _lut_layout(bits)
    cb = comp.codebooks.detach().to("cpu", torch.float32)
    lut = torch.zeros(h, lutn, dtype=torch.float32)
    for head in range(h):
        for grp in range(g):
            n = 1 << int(bits[head, grp])
            lut[head, lut_off[head, grp] : lut_off[head, grp] + n] = cb[head, grp, :n]
    mask = (1 << bits) - 1
    meta = torch.stack([offsets.to(torch.int32), lut_off, bits, mask], dim=-1)

    j = torch.arange(d)
    bj = bits[:, j // GROUP_SIZE].long()  # [H, D]
    first_bit = offsets[:, j // GROUP_SIZE] * 8 + (j % GROUP_SIZE) * bj

    def per_coord(values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(h, dp, dtype=torch.int32)
        out[:, :d] = values.to(torch.int32)
        return out

    return KernelComponent(
        mode=int(comp.token_scale),
        field_offset=field_offset,
        meta=meta.contiguous().to(device),
        lut32=lut.to(device),
        lut16=lut.to(torch.float16).to(device),
        basis=comp.basis.detach().to(device, torch.float32).contiguous(),
        basis_t=comp.basis.detach().to(device, torch.float32).transpose(1, 2).contiguous(),
        mean=comp.mean.detach().to(device, torch.float32).contiguous(),
        scale=comp.scale.detach().to(device, torch.float32).contiguous(),
        coord_byte=per_coord(first_bit // 8).to(device),
        coord_shift=per_coord(first_bit % 8).to(device),
        coord_two=per_coord((first_bit % 8 + bj) > 8).to(device),
        coord_mask=per_coord((1 << bj) - 1).to(device),
        coord_lut=per_coord(lut_off[:, j // GROUP_SIZE]).to(device),
        coord_pack_shift=per_coord((j % GROUP_SIZE) * bj).to(device),
    )


@dataclass(frozen=True)
class KernelCodec:
    """One layer's codec in kernel form, for one device."""

    num_kv_heads: int
    head_dim: int
    slot_bytes: int
    key: KernelComponent
    value: KernelComponent
    pad_start: torch.Tensor  # int32 [H]: first zero-padding byte of each head's slot

    @property
    def lut_entries(self) -> int:
        return max(self.key.lut32.shape[1], self.value.lut32.shape[1])

    @classmethod
    def build(cls, codec: LayerCodec, device: torch.device | str) -> KernelCodec:
        device = torch.device(device)
        key = _component(codec.key, codec.key_field_offset, codec.key_group_offsets(), device)
        value = _component(codec.value, codec.value_field_offset, codec.value_group_offsets(), device)
        pad = codec.value_group_offsets()[:, -1] + codec.value.bits[:, -1].long()
        return cls(codec.num_kv_heads, codec.head_dim, codec.slot_bytes, key, value, pad.to(device, torch.int32))


# One KernelCodec per (LayerCodec object, device); entries die with their LayerCodec.
_CACHE: dict[tuple[int, str], tuple[weakref.ref, KernelCodec]] = {}


def kernel_codec(codec: LayerCodec, device: torch.device | str) -> KernelCodec:
    """The cached KernelCodec of ``codec`` on ``device`` (built on first use: host work, not capture-safe).

    Keep LayerCodec objects alive and reuse them (one per layer): the cache is keyed on identity.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (id(codec), str(device))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is codec:
        return hit[1]
    built = KernelCodec.build(codec, device)
    _CACHE[key] = (weakref.ref(codec, lambda _ref, k=key: _CACHE.pop(k, None)), built)
    return built


__all__ = ["KernelCodec", "KernelComponent", "kernel_codec", "padded_dim"]
