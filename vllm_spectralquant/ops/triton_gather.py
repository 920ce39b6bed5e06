"""Triton gather: dequantise the packed context of B sequences into dense K, V [B, L, H, D] float32.

For prefill continuations (attention of a new chunk over its already-packed context). One program
per (tile of BT positions, KV head, sequence): levels -> ``scale * (s * level + z)`` -> ``@ U^T +
mean`` (fp32 dot); positions < sink_tokens take the exact bf16 spill; positions past a sequence's
length are written as zeros. Same result as ``reference_attention.gather_context``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.ops.kernel_codec import KernelComponent, kernel_codec, padded_dim
from vllm_spectralquant.ops.triton_common import basis_rows_per_dot, bf16_bytes, read_codes, spill_pointers, token_scale

_TOKENS_PER_PROGRAM = 16


@triton.jit
def _dequantise_write(
    out_ptr, s_ob, s_ol, s_oh, b, pos, inside, in_out, rows, entry, h,
    cb_ptr, csh_ptr, c2_ptr, cm_ptr, cl_ptr, lut_ptr, s_lut, basis_t_ptr, mean_ptr, scale_ptr,
    slot_bytes, sink_bytes, s_tok, n_sink,
    MODE: tl.constexpr, FIELD: tl.constexpr, COMP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    KC: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    rd = tl.arange(0, DP)
    dmask = rd < D
    s, z = token_scale(rows, inside, MODE, FIELD, BT)
    # x = rot @ U^T + mean, KC rotated coordinates per dot (triton_common.basis_rows_per_dot: shared
    # memory); neither unrolled nor pipelined, so one KC-row slice of U^T is staged at a time.
    x = tl.zeros([BT, DP], dtype=tl.float32)
    for c in tl.range(0, DP // KC, num_stages=1):
        rk = c * KC + tl.arange(0, KC)
        kmask = rk < D
        hk = h * DP + rk
        codes = read_codes(rows, inside, tl.load(cb_ptr + hk), tl.load(csh_ptr + hk), tl.load(c2_ptr + hk), tl.load(cm_ptr + hk))
        lev = tl.load(lut_ptr + h * s_lut + tl.load(cl_ptr + hk)[None, :] + codes)
        scale = tl.load(scale_ptr + h * D + rk, mask=kmask, other=0.0)
        rot = scale[None, :] * (s[:, None] * lev + z[:, None])
        basis_t = tl.load(basis_t_ptr + h * D * D + rk[:, None] * D + rd[None, :], mask=kmask[:, None] & dmask[None, :], other=0.0)
        x += tl.dot(rot, basis_t, input_precision="ieee")
    x += tl.load(mean_ptr + h * D + rd, mask=dmask, other=0.0)[None, :]
    # Exact sinks (first block's spill) replace their codes.
    is_sink = inside & (pos < n_sink)
    index = pos[:, None] * (4 * D) + COMP * (2 * D) + 2 * rd[None, :]
    exact = bf16_bytes(spill_pointers(entry, index, slot_bytes, sink_bytes, s_tok), is_sink[:, None] & dmask[None, :])
    x = tl.where(is_sink[:, None], exact, x)
    x = tl.where(inside[:, None], x, 0.0)
    ptr = out_ptr + b.to(tl.int64) * s_ob + pos[:, None].to(tl.int64) * s_ol + h * s_oh + rd[None, :]
    tl.store(ptr, x, mask=in_out[:, None] & dmask[None, :])


@triton.jit
def _gather_kernel(
    k_out, v_out, s_ob, s_ol, s_oh, max_len,
    cache_ptr, s_blk, s_head, s_tok, bt_ptr, s_bt, seq_ptr, block_size, slot_bytes, sink_bytes, n_sink,
    kb_ptr, ksh_ptr, k2_ptr, km_ptr, kl_ptr, klut_ptr, s_klut, kbt_ptr, kmean_ptr, kscale_ptr,
    vb_ptr, vsh_ptr, v2_ptr, vm_ptr, vl_ptr, vlut_ptr, s_vlut, vbt_ptr, vmean_ptr, vscale_ptr,
    K_MODE: tl.constexpr, K_FIELD: tl.constexpr, V_MODE: tl.constexpr, V_FIELD: tl.constexpr,
    D: tl.constexpr, DP: tl.constexpr, KC: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1)
    b = tl.program_id(2)
    pos = tl.program_id(0) * BT + tl.arange(0, BT)
    seq_len = tl.load(seq_ptr + b)
    inside = pos < seq_len
    in_out = pos < max_len
    blk = tl.load(bt_ptr + b * s_bt + pos // block_size, mask=inside, other=0).to(tl.int64)
    rows = cache_ptr + blk * s_blk + h * s_head + (pos % block_size).to(tl.int64) * s_tok
    entry = cache_ptr + tl.load(bt_ptr + b * s_bt).to(tl.int64) * s_blk + h * s_head
    _dequantise_write(k_out, s_ob, s_ol, s_oh, b, pos, inside, in_out, rows, entry, h,
                      kb_ptr, ksh_ptr, k2_ptr, km_ptr, kl_ptr, klut_ptr, s_klut, kbt_ptr, kmean_ptr, kscale_ptr,
                      slot_bytes, sink_bytes, s_tok, n_sink, K_MODE, K_FIELD, 0, D, DP, KC, BT)  # fmt: skip
    _dequantise_write(v_out, s_ob, s_ol, s_oh, b, pos, inside, in_out, rows, entry, h,
                      vb_ptr, vsh_ptr, v2_ptr, vm_ptr, vl_ptr, vlut_ptr, s_vlut, vbt_ptr, vmean_ptr, vscale_ptr,
                      slot_bytes, sink_bytes, s_tok, n_sink, V_MODE, V_FIELD, 1, D, DP, KC, BT)  # fmt: skip


def _args(c: KernelComponent) -> list:
    return [c.coord_byte, c.coord_shift, c.coord_two, c.coord_mask, c.coord_lut, c.lut32, c.lut32.stride(0),
            c.basis_t, c.mean, c.decode_scale]  # fmt: skip


def gather_context(
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised context K, V float32 [B, max(seq_lens), H, D] (exact sinks; zero padding)."""
    kc = kernel_codec(codec, kv_cache.device)
    bsz, h, d = seq_lens.shape[0], kc.num_kv_heads, kc.head_dim
    max_len = int(seq_lens.max()) if bsz else 0  # the output shape needs it (host sync; not a decode path)
    k_out = torch.empty(bsz, max_len, h, d, dtype=torch.float32, device=kv_cache.device)
    v_out = torch.empty_like(k_out)
    if bsz == 0 or max_len == 0:
        return k_out, v_out
    grid = (triton.cdiv(max_len, _TOKENS_PER_PROGRAM), h, bsz)
    _gather_kernel[grid](
        k_out, v_out, k_out.stride(0), k_out.stride(1), k_out.stride(2), max_len,
        kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), block_table, block_table.stride(0),
        seq_lens, geometry.block_size, geometry.slot_bytes, max(geometry.sink_bytes, 1), geometry.sink_tokens,
        *_args(kc.key), *_args(kc.value),
        K_MODE=kc.key.mode, K_FIELD=kc.key.field_offset, V_MODE=kc.value.mode, V_FIELD=kc.value.field_offset,
        D=d, DP=padded_dim(d), KC=basis_rows_per_dot(padded_dim(d)), BT=_TOKENS_PER_PROGRAM, num_warps=4,
    )  # fmt: skip
    return k_out, v_out
