"""The packed paged cache in vLLM's terms: geometry, storing new tokens, gathering a context.

vLLM hands a layer its cache as a uint8 tensor with the logical shape
``[num_blocks, num_kv_heads, block_size, page_slot_bytes]`` (any strides). Each (block, head, offset)
entry is one head-token: ``slot_bytes`` of packed codes, then ``sink_bytes`` of the block's
*sink spill*. The spill bytes of all offsets of a (block, head), concatenated in offset order,
hold the block's first ``sink_tokens`` tokens exactly (bf16 K then V, ``4 * head_dim`` bytes per
token). Every block stores them, but attention reads them only for a sequence's first block:
those are the attention-sink tokens (positions 0 .. sink_tokens-1), which then bypass the codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_spectralquant.format.codec import check_kv_input, encode_slots, saturate
from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.params import LayerCodec

#: Exact sink tokens are stored in this dtype (what a bf16 cache would hold).
SINK_DTYPE = torch.bfloat16
_SINK_ELEM = 2  # bytes per bf16


@dataclass(frozen=True)
class CacheGeometry:
    """Bytes of one head-token entry of the paged cache, for a block size and sink policy."""

    head_dim: int
    slot_bytes: int
    block_size: int
    sink_tokens: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise FormatError(f"block_size must be positive, got {self.block_size}")
        if not 0 <= self.sink_tokens <= self.block_size:
            raise FormatError(
                f"sink_tokens ({self.sink_tokens}) must be between 0 and the block size ({self.block_size})"
            )

    @classmethod
    def for_codec(cls, codec: LayerCodec, block_size: int, sink_tokens: int | None = None) -> CacheGeometry:
        sink = codec.preset.sink_tokens if sink_tokens is None else sink_tokens
        return cls(codec.head_dim, codec.slot_bytes, block_size, sink)

    @property
    def sink_token_bytes(self) -> int:
        """Exact bytes of one sink token (K and V)."""
        return 2 * self.head_dim * _SINK_ELEM

    @property
    def sink_bytes(self) -> int:
        """Spill bytes per head-token entry: the block's sinks spread over its offsets."""
        return -(-self.sink_tokens * self.sink_token_bytes // self.block_size)

    @property
    def page_slot_bytes(self) -> int:
        """Bytes per head-token entry that vLLM allocates (vLLM's ``state_content_bytes``)."""
        return self.slot_bytes + self.sink_bytes

    def compression_vs_bf16(self) -> float:
        """Whole-cache compression, sink spill included."""
        return 4 * self.head_dim / self.page_slot_bytes


def check_cache(kv_cache: torch.Tensor, num_kv_heads: int, geometry: CacheGeometry) -> None:
    """Raise FormatError unless kv_cache is uint8 [num_blocks, H, block_size, page_slot_bytes]."""
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dtype != torch.uint8:
        raise FormatError(f"kv_cache must be a uint8 tensor, got {getattr(kv_cache, 'dtype', type(kv_cache))}")
    want = (num_kv_heads, geometry.block_size, geometry.page_slot_bytes)
    if kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != want:
        raise FormatError(
            f"kv_cache must have shape [num_blocks, {want[0]}, {want[1]}, {want[2]}] "
            f"(KV heads, block size, bytes per head-token), got {tuple(kv_cache.shape)}"
        )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
    *,
    strict: bool = True,
) -> None:
    """Encode new tokens and write them into the paged cache.

    Args:
        key, value: float [T, H, D]; only the first ``len(slot_mapping)`` tokens are stored
            (vLLM may pad T).
        kv_cache: uint8 [num_blocks, H, block_size, page_slot_bytes], written in place.
        slot_mapping: int [N]; ``block * block_size + offset``, -1 = skip this token.
        strict: raise on NaN/inf and out-of-range slots (the backend's hot path passes False).
    """
    h, d = codec.num_kv_heads, codec.head_dim
    check_cache(kv_cache, h, geometry)
    if slot_mapping.dim() != 1 or slot_mapping.is_floating_point():
        raise FormatError(f"slot_mapping must be a 1-D integer tensor, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    n = slot_mapping.shape[0]
    for name, x in (("key", key), ("value", value)):
        if x.dim() != 3 or x.shape[0] < n:
            raise FormatError(f"{name} has {x.shape[0] if x.dim() else 0} tokens, slot_mapping has {n}")
        check_kv_input(x[:n], h, d, name, strict=strict)
    num_blocks, bs = kv_cache.shape[0], geometry.block_size
    if strict and n and int(slot_mapping.max()) >= num_blocks * bs:
        raise FormatError(
            f"slot_mapping entry {int(slot_mapping.max())} is out of range for a cache of "
            f"{num_blocks} blocks x {bs} tokens"
        )
    sel = torch.nonzero(slot_mapping >= 0).squeeze(-1)
    if sel.numel() == 0:
        return
    slots = slot_mapping[sel].long()
    k, v = key[sel], value[sel]
    block, offset = slots // bs, slots % bs
    kv_cache[block, :, offset, : geometry.slot_bytes] = encode_slots(k, v, codec, strict=strict)
    if geometry.sink_tokens:
        # The exact copy gets the codes' runtime rule too, so nothing non-finite is ever written.
        _store_sinks(saturate(k), saturate(v), kv_cache, block, offset, geometry)


def _spill_position(byte_index: torch.Tensor, geometry: CacheGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte i of a block's spill region -> (offset in block, byte column in the entry)."""
    return byte_index // geometry.sink_bytes, geometry.slot_bytes + byte_index % geometry.sink_bytes


def _store_sinks(k, v, kv_cache, block, offset, geometry: CacheGeometry) -> None:
    is_sink = offset < geometry.sink_tokens
    if not bool(is_sink.any()):
        return
    k, v, block, offset = k[is_sink], v[is_sink], block[is_sink], offset[is_sink]
    m, h, _ = k.shape
    exact = torch.stack([k, v], dim=2).to(SINK_DTYPE).contiguous().view(torch.uint8).reshape(m, h, -1)
    tb = geometry.sink_token_bytes
    byte_index = offset[:, None] * tb + torch.arange(tb, device=k.device)[None, :]  # [m, tb]
    row, col = _spill_position(byte_index, geometry)
    heads = torch.arange(h, device=k.device)
    kv_cache[block[:, None, None], heads[None, :, None], row[:, None, :], col[:, None, :]] = exact


def read_sinks(kv_cache: torch.Tensor, first_blocks: torch.Tensor, geometry: CacheGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact sink tokens of sequences whose first blocks are ``first_blocks`` [B].

    Returns (key, value) float32 [B, sink_tokens, H, D].
    """
    b, h = first_blocks.shape[0], kv_cache.shape[1]
    tb, n = geometry.sink_token_bytes, geometry.sink_tokens
    byte_index = torch.arange(n * tb, device=kv_cache.device)
    row, col = _spill_position(byte_index, geometry)
    heads = torch.arange(h, device=kv_cache.device)
    raw = kv_cache[first_blocks.long()[:, None, None], heads[None, :, None], row[None, None, :], col[None, None, :]]
    exact = raw.reshape(b, h, n, 2, geometry.head_dim * _SINK_ELEM).contiguous().view(SINK_DTYPE).float()
    k, v = exact[:, :, :, 0], exact[:, :, :, 1]  # [B, H, n, D]
    return k.transpose(1, 2), v.transpose(1, 2)


def gather_slots(kv_cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor, geometry: CacheGeometry):
    """Packed slots of the first ``lengths[b]`` tokens of each sequence, padded to the longest.

    Args:
        block_table: int [B, max_blocks]; lengths: int [B].
    Returns:
        (slots uint8 [B, L, H, slot_bytes], valid bool [B, L]).
    """
    bsz = block_table.shape[0]
    max_len = int(lengths.max()) if bsz else 0
    pos = torch.arange(max_len, device=kv_cache.device)
    valid = pos[None, :] < lengths[:, None]
    logical = torch.where(valid, pos[None, :] // geometry.block_size, 0)
    blocks = torch.gather(block_table.long(), 1, logical)
    blocks = torch.where(valid, blocks, 0)
    offsets = (pos % geometry.block_size).expand(bsz, -1)
    return kv_cache[blocks, :, offsets, : geometry.slot_bytes], valid


def check_block_table(block_table: torch.Tensor, lengths: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """Raise FormatError when a sequence needs a block-table entry that is missing or out of range."""
    if block_table.dim() != 2 or block_table.is_floating_point():
        raise FormatError(f"block_table must be a 2-D integer tensor, got {block_table.dtype} {tuple(block_table.shape)}")
    needed = (lengths.long() + block_size - 1) // block_size
    if needed.numel() and int(needed.max()) > block_table.shape[1]:
        r = int(torch.argmax(needed))
        raise FormatError(
            f"sequence {r} has {int(lengths[r])} tokens and needs {int(needed[r])} blocks, "
            f"but the block table has {block_table.shape[1]} columns"
        )
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    used = cols[None, :] < needed[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        r, c = (int(i) for i in torch.nonzero(bad)[0])
        raise FormatError(
            f"block_table[{r}, {c}] = {int(block_table[r, c])} is out of range for a cache of {num_blocks} blocks"
        )
