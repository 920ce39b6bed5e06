"""Triton helpers shared by the store, decode and gather kernels: reading packed slots.

A row is one (block, KV head, offset) entry of the paged cache; ``rows`` are byte pointers [BT].
Per-coordinate metadata comes from :class:`~vllm_spectralquant.ops.kernel_codec.KernelComponent`.
"""

from __future__ import annotations

import triton
import triton.language as tl


#: Basis rows per rotation dot above head_dim 128. A whole fp32 basis at head_dim 256 (256 KiB) does
#: not fit in an SM's shared memory as one dot operand (H200: 227 KiB); 64 rows of 256 take 64 KiB.
BASIS_ROWS_PER_DOT = 64


def basis_rows_per_dot(padded_head_dim: int) -> int:
    """Rows of the (padded) basis contracted per ``tl.dot`` by the store and the gather: all up to 128."""
    return padded_head_dim if padded_head_dim <= 128 else BASIS_ROWS_PER_DOT


@triton.jit
def fp16_field(rows, offset, valid):
    """The little-endian fp16 token field at byte ``offset`` of each row -> float32 [BT] (0 where invalid)."""
    lo = tl.load(rows + offset, mask=valid, other=0).to(tl.uint16)
    hi = tl.load(rows + offset + 1, mask=valid, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def token_scale(rows, valid, MODE: tl.constexpr, FIELD: tl.constexpr, BT: tl.constexpr):
    """Per-token (s, z) float32 [BT] of one component: (1, 0) without fields, (0, 0) for invalid rows."""
    if MODE >= 1:
        s = fp16_field(rows, FIELD, valid)
    else:
        s = tl.where(valid, 1.0, 0.0)
    if MODE == 2:
        z = fp16_field(rows, FIELD + 2, valid)
    else:
        z = tl.zeros([BT], dtype=tl.float32)
    return s, z


@triton.jit
def read_codes(rows, valid, cbyte, cshift, ctwo, cmask):
    """Codes int32 [BT, DP] of every rotated coordinate (0 where invalid or padded).

    A code of <= 8 bits starting at bit ``cshift`` of byte ``cbyte`` spans at most two bytes.
    """
    ptr = rows[:, None] + cbyte[None, :]
    lo = tl.load(ptr, mask=valid[:, None], other=0).to(tl.int32)
    hi = tl.load(ptr + 1, mask=valid[:, None] & (ctwo[None, :] != 0), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> cshift[None, :]) & cmask[None, :]


@triton.jit
def bf16_bytes(ptr_lo, mask):
    """bf16 values from little-endian byte pairs at ``ptr_lo`` -> float32."""
    lo = tl.load(ptr_lo, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr_lo + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.bfloat16, bitcast=True).to(tl.float32)


@triton.jit
def spill_pointers(entry, byte_index, slot_bytes, sink_bytes, s_tok):
    """Address of byte ``byte_index`` of a block's sink spill (entry = the block-head's offset-0 entry)."""
    row = byte_index // sink_bytes
    col = slot_bytes + byte_index % sink_bytes
    return entry + row.to(tl.int64) * s_tok + col
