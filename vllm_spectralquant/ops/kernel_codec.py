"""A LayerCodec's parameters as the kernels want them: flat, contiguous device tensors, built once.

Everything here is derived from ``vllm_spectralquant.format`` (bit widths, slot offsets, codebooks,
bases); nothing restates the format. Two views of the same codes:

* per group (CUDA): ``meta`` int32 [H, G, 4] = (slot byte offset, LUT entry offset, bits, mask);
  for the decode kernel also ``pair_meta`` int32 [H, G, 4] = (slot byte offset, pair-table byte
  offset, 2 * bits, pair-index mask << 2) over ``pairs``: for every group of <= 4 bits, a table of
  ``4**bits`` half2 entries, entry ``c0 | c1 << bits`` = (level[c0], level[c1]), so one 32-bit
  shared-memory load decodes two consecutive codes straight into an MMA operand register;
* per coordinate (Triton): int32 [H, DP] arrays giving, for rotated coordinate ``j``, the slot byte
  holding its first bit, the bit shift inside that byte, whether the code spills into the next byte,
  the code mask and the LUT offset of its group. ``DP`` is ``head_dim`` rounded up to a power of 2
  (Triton block shapes); padded coordinates have mask 0 and decode to a zero weight.

Codebook levels are stored compactly: group ``g`` of head ``h`` owns ``2**bits`` entries starting
at ``lut_offset[h, g]`` of ``lut32[h]`` / ``lut16[h]`` (float32 for store/gather, float16 for the
decode kernels' tensor-core operands). Tables are laid out in *stripes* of four consecutive groups
``{4 p + c : c = 0..3}``, the groups the four lanes of an MMA quad decode at the same time (groups
are ordered by importance, so the few wide groups share a stripe and the decode kernel's choice of
path per stripe stays warp-uniform), each table aligned to its own size: small tables of a stripe
then sit in distinct shared-memory banks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from vllm_spectralquant.format.kernel_limits import PAIR_MAX_BITS, PAIR_TABLE_ALIGN_ENTRIES, STRIPE_GROUPS
from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import GROUP_SIZE


def padded_dim(head_dim: int) -> int:
    """Smallest power of 2 >= head_dim (Triton block shapes must be powers of 2)."""
    return 1 << (head_dim - 1).bit_length()


def _lut_layout(bits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """LUT entry offsets int32 [H, G] and the entries per head (max over heads, a multiple of 8)."""
    h, g = bits.shape
    stripe = STRIPE_GROUPS if g % STRIPE_GROUPS == 0 else g
    offsets = torch.zeros(h, g, dtype=torch.int32)
    size = 0
    for head in range(h):
        sizes = [1 << int(b) for b in bits[head]]
        cursor = 0
        # Within a stripe, largest tables first: every table starts at a multiple of its size.
        for start in range(0, g, stripe):
            for grp in sorted(range(start, start + stripe), key=lambda x: -sizes[x]):
                cursor = -(-cursor // sizes[grp]) * sizes[grp]
                offsets[head, grp] = cursor
                cursor += sizes[grp]
        size = max(size, cursor)
    return offsets, -(-size // 8) * 8


def _pair_tables(bits: torch.Tensor, lut16: torch.Tensor, lut_off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair tables of the groups of <= PAIR_MAX_BITS bits: (int32 [H, G] byte offsets, int32 [H, N] entries).

    Entry ``c0 | c1 << b`` holds the fp16 bit patterns of level[c0] (low half) and level[c1] (high
    half). Tables are placed largest first, so each starts at a multiple of its own size, and N is a
    multiple of 256 entries (1 KiB): the kernel forms an entry's address as ``base | (index << 2)``
    with the key and value regions back to back from a 1 KiB-aligned base.
    """
    h, g = bits.shape
    raw = lut16.view(torch.int16).to(torch.int64) & 0xFFFF  # [H, LUTN] fp16 bit patterns
    offsets = torch.zeros(h, g, dtype=torch.int64)
    tables: list[torch.Tensor] = []
    for head in range(h):
        small = [grp for grp in range(g) if int(bits[head, grp]) <= PAIR_MAX_BITS]
        cursor, parts = 0, []
        for grp in sorted(small, key=lambda x: -int(bits[head, x])):
            b = int(bits[head, grp])
            levels = raw[head, int(lut_off[head, grp]) : int(lut_off[head, grp]) + (1 << b)]
            idx = torch.arange(1 << (2 * b))
            entry = levels[idx & ((1 << b) - 1)] | (levels[idx >> b] << 16)
            offsets[head, grp] = 4 * cursor
            parts.append(entry)
            cursor += entry.numel()
        tables.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64))
    # A whole number of the largest table (256 entries): the value tables follow the key tables in
    # the kernel's shared memory and must keep the alignment.
    n = -(-max(1, max(t.numel() for t in tables)) // PAIR_TABLE_ALIGN_ENTRIES) * PAIR_TABLE_ALIGN_ENTRIES
    out = torch.zeros(h, n, dtype=torch.int64)
    for head, t in enumerate(tables):
        out[head, : t.numel()] = t
    # Two's-complement int32 view of the uint32 entries.
    out = torch.where(out >= 1 << 31, out - (1 << 32), out)
    return offsets.to(torch.int32), out.to(torch.int32)


@dataclass(frozen=True)
class KernelComponent:
    """Keys or values of one layer, in kernel form (all tensors on the kernel's device)."""

    mode: int  # format.presets.TokenScale: 0 none, 1 norm, 2 affine
    field_offset: int  # slot byte of the first fp16 token field
    meta: torch.Tensor  # int32 [H, G, 4]: byte offset, LUT offset, bits, mask
    lut32: torch.Tensor  # float32 [H, LUTN] codebook levels (sigma units)
    lut16: torch.Tensor  # float16 [H, LUTN]
    pair_meta: torch.Tensor  # int32 [H, G, 4]: byte offset, pair-table byte offset, 2 * bits, mask << 2
    pairs: torch.Tensor  # int32 [H, PN]: half2 pair tables of the groups of <= PAIR_MAX_BITS bits
    basis: torch.Tensor  # float32 [H, D, D]  U (rotated = (x - mean) @ U)
    basis_t: torch.Tensor  # float32 [H, D, D]  U^T, contiguous (x = rotated @ U^T + mean)
    mean: torch.Tensor  # float32 [H, D]
    scale: torch.Tensor  # float32 [H, D]: encoding's sigma per rotated coordinate
    decode_scale: torch.Tensor  # float32 [H, D]: decoding's (scale x the key gain; format/params.py)
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
    lut16 = lut.to(torch.float16)
    pair_off, pairs = _pair_tables(bits, lut16, lut_off)
    # 2 * bits steps the kernel's shifts from one code pair to the next (2 for 0-bit groups, whose
    # mask is 0, keeps every shift non-negative); wide groups get mask 0 (they take the LUT path).
    small = bits <= PAIR_MAX_BITS
    pair_meta = torch.stack(
        [
            offsets.to(torch.int32),
            pair_off,
            torch.where(bits == 0, 2, 2 * bits).to(torch.int32),
            torch.where(small, ((1 << (2 * bits.clamp(max=PAIR_MAX_BITS))) - 1) << 2, 0).to(torch.int32),
        ],
        dim=-1,
    )

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
        lut16=lut16.to(device),
        pair_meta=pair_meta.contiguous().to(device),
        pairs=pairs.contiguous().to(device),
        basis=comp.basis.detach().to(device, torch.float32).contiguous(),
        basis_t=comp.basis.detach().to(device, torch.float32).transpose(1, 2).contiguous(),
        mean=comp.mean.detach().to(device, torch.float32).contiguous(),
        scale=comp.scale.detach().to(device, torch.float32).contiguous(),
        decode_scale=comp.decode_scale.detach().to(device, torch.float32).contiguous(),
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
