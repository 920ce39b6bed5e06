"""Triton store: quantise new K/V tokens and write them into the packed paged cache.

One program per (tile of BT tokens, KV head): rotate ``(x - mean) @ U / scale`` (fp32 dot), apply
the token scale (none / norm / affine), pick the nearest codebook level by binary search over the
midpoints, pack each group's 8 codes into its ``bits`` bytes, write the fp16 token fields, zero
the slot padding, and for block offsets < sink_tokens also the exact bf16 sink spill.
Same result as ``format.paged.store_kv(strict=False)`` up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.ops.kernel_codec import KernelComponent, kernel_codec, padded_dim
from vllm_spectralquant.ops.triton_common import basis_rows_per_dot, spill_pointers

_TOKENS_PER_PROGRAM = 16
#: Upper bound on slot bytes (134 B at head_dim 128 scales to 268 B at 256): one compiled variant for every preset.
_MAX_SLOT_BYTES = 512


@triton.jit
def _fp16_round(x):
    return tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16).to(tl.float32)


@triton.jit
def _bf16_bits(x):
    """Round-to-nearest-even bf16 bit patterns of float32 x, as int32 (integer math: same on every backend)."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def _load_saturated(x_ptr, s_xt, s_xh, tok, tvalid, h, cols, D: tl.constexpr):
    """x[tok, h, cols] as float32 [BT, len(cols)], 0 outside the tokens and D.

    Non-finite input is saturated, as an fp16 cache would hold it (format.codec.saturate):
    NaN -> 0, +-inf -> +-65504, for the codes and the exact sink copy alike.
    """
    x = tl.load(x_ptr + tok[:, None] * s_xt + h * s_xh + cols[None, :], mask=tvalid[:, None] & (cols < D)[None, :], other=0.0)
    x = x.to(tl.float32)
    x = tl.where(x != x, 0.0, x)
    return tl.where(x == float("inf"), 65504.0, tl.where(x == float("-inf"), -65504.0, x))


@triton.jit
def _encode_write(
    x_ptr, s_xt, s_xh, tok, tvalid, rows, h,
    basis_ptr, mean_ptr, scale_ptr, lut_ptr, s_lut, meta_ptr, clut_ptr, cmask_ptr, cpack_ptr,
    blk, off, cache_ptr, s_blk, s_head, s_tok, slot_bytes, sink_bytes, n_sink,
    MODE: tl.constexpr, FIELD: tl.constexpr, COMP: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    """Quantise one component of the tile and write codes, fields and (sinks) the exact spill."""
    rd = tl.arange(0, DP)
    dmask = rd < D
    scale = tl.load(scale_ptr + h * D + rd, mask=dmask, other=1.0)
    # Exact sink spill: token at block offset o owns spill bytes [o*4D, (o+1)*4D): K then V, bf16.
    is_sink = tvalid & (off < n_sink)
    entry = cache_ptr + blk * s_blk + h * s_head
    # rn = (x - mean) @ basis, KC basis rows per dot (triton_common.basis_rows_per_dot: shared memory).
    # A loop, neither unrolled nor pipelined (num_stages=1), so one KC-row slice is staged at a time;
    # each slice of the input is loaded once, for its dot and for its part of the sink spill.
    rn = tl.zeros([BT, DP], dtype=tl.float32)
    for c in tl.range(0, DP // KC, num_stages=1):
        rk = c * KC + tl.arange(0, KC)
        kmask = rk < D
        xk = _load_saturated(x_ptr, s_xt, s_xh, tok, tvalid, h, rk, D)
        bits16 = _bf16_bits(xk)
        index = off[:, None] * (4 * D) + COMP * (2 * D) + 2 * rk[None, :]
        smask = is_sink[:, None] & kmask[None, :]
        ptr = spill_pointers(entry[:, None], index, slot_bytes, sink_bytes, s_tok)
        tl.store(ptr, (bits16 & 0xFF).to(tl.uint8), mask=smask)
        ptr = spill_pointers(entry[:, None], index + 1, slot_bytes, sink_bytes, s_tok)
        tl.store(ptr, (bits16 >> 8).to(tl.uint8), mask=smask)
        xk = xk - tl.load(mean_ptr + h * D + rk, mask=kmask, other=0.0)[None, :]
        bk = tl.load(basis_ptr + h * D * D + rk[:, None] * D + rd[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        rn += tl.dot(xk, bk, input_precision="ieee")
    rn = rn / scale[None, :]

    if MODE == 1:  # norm: unit vector, s = |rn| / |levels| after the codes are known
        norm = tl.sqrt(tl.sum(rn * rn, 1))
        u = rn / tl.where(norm > 0, norm, 1.0)[:, None]
        s = norm
        z = tl.zeros([BT], dtype=tl.float32)
    elif MODE == 2:  # affine: s = max - min, z = min (fp16-rounded before use, as stored)
        lo = tl.min(tl.where(dmask[None, :], rn, float("inf")), 1)
        hi = tl.max(tl.where(dmask[None, :], rn, float("-inf")), 1)
        s = _fp16_round(hi - lo)
        z = _fp16_round(lo)
        u = (rn - z[:, None]) / tl.where(s > 0, s, 1.0)[:, None]
    else:
        u = rn
        s = tl.full([BT], 1.0, dtype=tl.float32)
        z = tl.zeros([BT], dtype=tl.float32)

    # Nearest level = number of midpoints <= u (binary lifting over <= 255 midpoints).
    last = tl.load(cmask_ptr + h * DP + rd)  # 2**bits - 1 = number of midpoints
    table = lut_ptr + h * s_lut + tl.load(clut_ptr + h * DP + rd)[None, :]
    code = tl.zeros([BT, DP], dtype=tl.int32)
    for k in tl.static_range(8):
        cand = code + (128 >> k)
        ok = cand <= last[None, :]
        below = tl.load(table + cand - 1, mask=ok, other=0.0)
        above = tl.load(table + cand, mask=ok, other=0.0)
        code = tl.where(ok & (0.5 * (above + below) <= u), cand, code)

    if MODE == 1:  # norm correction: the decoded vector keeps the input norm
        lev = tl.load(table + code)
        lv_norm = tl.sqrt(tl.sum(tl.where(dmask[None, :], lev * lev, 0.0), 1))
        s = _fp16_round(tl.where(lv_norm > 0, s / tl.where(lv_norm > 0, lv_norm, 1.0), 0.0))

    # Group streams: code i of a group sits at bit i * bits; disjoint bits, so sum == OR.
    packed = code.to(tl.int64) << tl.load(cpack_ptr + h * DP + rd).to(tl.int64)[None, :]
    stream = tl.sum(tl.reshape(packed, (BT, DP // 8, 8)), 2)  # [BT, DP/8]
    rg = tl.arange(0, DP // 8)
    gmask = rg < D // 8
    gbits = tl.load(meta_ptr + (h * (D // 8) + rg) * 4 + 2, mask=gmask, other=0)
    goff = tl.load(meta_ptr + (h * (D // 8) + rg) * 4 + 0, mask=gmask, other=0)
    for k in tl.static_range(8):
        byte = ((stream >> (8 * k)) & 0xFF).to(tl.uint8)
        tl.store(rows[:, None] + goff[None, :] + k, byte, mask=tvalid[:, None] & (k < gbits)[None, :])

    if MODE >= 1:
        sb = s.to(tl.float16).to(tl.uint16, bitcast=True)
        tl.store(rows + FIELD, (sb & 0xFF).to(tl.uint8), mask=tvalid)
        tl.store(rows + FIELD + 1, (sb >> 8).to(tl.uint8), mask=tvalid)
    if MODE == 2:
        zb = z.to(tl.float16).to(tl.uint16, bitcast=True)
        tl.store(rows + FIELD + 2, (zb & 0xFF).to(tl.uint8), mask=tvalid)
        tl.store(rows + FIELD + 3, (zb >> 8).to(tl.uint8), mask=tvalid)


@triton.jit
def _store_kernel(
    k_ptr, s_kt, s_kh, v_ptr, s_vt, s_vh, slot_ptr, n_tokens,
    cache_ptr, s_blk, s_head, s_tok, block_size, slot_bytes, sink_bytes, n_sink, pad_ptr,
    kb_ptr, km_ptr, ks_ptr, klut_ptr, s_klut, kmeta_ptr, kcl_ptr, kcm_ptr, kcp_ptr,
    vb_ptr, vm_ptr, vs_ptr, vlut_ptr, s_vlut, vmeta_ptr, vcl_ptr, vcm_ptr, vcp_ptr,
    K_MODE: tl.constexpr, K_FIELD: tl.constexpr, V_MODE: tl.constexpr, V_FIELD: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, KC: tl.constexpr, SP: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1)
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    slot = tl.load(slot_ptr + tok, mask=tok < n_tokens, other=-1).to(tl.int64)
    tvalid = slot >= 0
    slot = tl.where(tvalid, slot, 0)
    blk = slot // block_size
    off = slot % block_size
    rows = cache_ptr + blk * s_blk + h * s_head + off * s_tok

    _encode_write(k_ptr, s_kt, s_kh, tok, tvalid, rows, h, kb_ptr, km_ptr, ks_ptr, klut_ptr, s_klut, kmeta_ptr,
                  kcl_ptr, kcm_ptr, kcp_ptr, blk, off, cache_ptr, s_blk, s_head, s_tok, slot_bytes, sink_bytes,
                  n_sink, K_MODE, K_FIELD, 0, D, DP, KC, BT)  # fmt: skip
    _encode_write(v_ptr, s_vt, s_vh, tok, tvalid, rows, h, vb_ptr, vm_ptr, vs_ptr, vlut_ptr, s_vlut, vmeta_ptr,
                  vcl_ptr, vcm_ptr, vcp_ptr, blk, off, cache_ptr, s_blk, s_head, s_tok, slot_bytes, sink_bytes,
                  n_sink, V_MODE, V_FIELD, 1, D, DP, KC, BT)  # fmt: skip

    # Unused budget at the end of the slot is zero, as in the reference.
    rs = tl.arange(0, SP)
    pad = tl.load(pad_ptr + h)
    tl.store(rows[:, None] + rs[None, :], tl.zeros([BT, SP], dtype=tl.uint8),
             mask=tvalid[:, None] & (rs >= pad)[None, :] & (rs < slot_bytes)[None, :])  # fmt: skip


def _component_args(c: KernelComponent) -> list:
    return [c.basis, c.mean, c.scale, c.lut32, c.lut32.stride(0), c.meta, c.coord_lut, c.coord_mask, c.coord_pack_shift]


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
) -> None:
    """Triton twin of ``format.paged.store_kv(strict=False)``; key/value [>= N, H, D] any float dtype."""
    n = slot_mapping.shape[0]
    if n == 0:
        return
    kc = kernel_codec(codec, kv_cache.device)
    h, d = kc.num_kv_heads, kc.head_dim
    # The kernels index the head dim with stride 1 (vLLM's key/value views have it).
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    dp = padded_dim(d)
    grid = (triton.cdiv(n, _TOKENS_PER_PROGRAM), h)
    _store_kernel[grid](
        key, key.stride(0), key.stride(1), value, value.stride(0), value.stride(1), slot_mapping, n,
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        geometry.block_size, geometry.slot_bytes, max(geometry.sink_bytes, 1), geometry.sink_tokens, kc.pad_start,
        *_component_args(kc.key), *_component_args(kc.value),
        K_MODE=kc.key.mode, K_FIELD=kc.key.field_offset, V_MODE=kc.value.mode, V_FIELD=kc.value.field_offset,
        D=d, DP=dp, KC=basis_rows_per_dot(dp), SP=_MAX_SLOT_BYTES, BT=_TOKENS_PER_PROGRAM, num_warps=8,
    )  # fmt: skip
