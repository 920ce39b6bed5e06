"""Triton split-KV decode attention over the packed paged cache (one query token per sequence).

1. Rotate each query once (torch): ``w = scale_K * (q @ U_K)``, ``base = q . mean_K``, both times
   ``softmax_scale * log2(e)``; ``w`` is stored as fp16 divided by ``max|w|`` (tensor-core operand).
2. ``_partial_kernel``, one program per (split, KV head, sequence): every query head of the KV
   head's group at once (GQA reuse: each decoded tile feeds one [G, D] x [D, BT] dot), online
   softmax in base 2, values accumulated in their rotated frame.
3. ``_merge_kernel``, one program per (sequence, query head): combine the splits and the exact
   sink tokens (position < sink_tokens, read from the first block's spill).
4. Rotate back once per query head (torch): ``o = (scale_V * acc) @ U_V^T + mass * mean_V + sinks``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.ops.kernel_codec import KernelCodec, KernelComponent, kernel_codec, padded_dim
from vllm_spectralquant.ops.triton_common import bf16_bytes, read_codes, spill_pointers, token_scale
from vllm_spectralquant.ops.workspace import MAX_SPLITS, DecodeViews, DecodeWorkspace, default_workspace, num_splits, padded_group

_TOKENS_PER_TILE = 32
LOG2E = 1.0 / math.log(2.0)
#: The window passed for "no sliding window": longer than any context, so seq_len - window < 0 (int32-safe).
NO_WINDOW = 1 << 30


@triton.jit
def _partial_kernel(
    w_ptr, wpar_ptr, cache_ptr, s_blk, s_head, s_tok, bt_ptr, s_bt, seq_ptr, window, block_size, n_sink, n_splits,
    kb_ptr, ksh_ptr, k2_ptr, km_ptr, kl_ptr, klut_ptr, s_klut,
    vb_ptr, vsh_ptr, v2_ptr, vm_ptr, vl_ptr, vlut_ptr, s_vlut,
    po_ptr, pml_ptr, G,
    K_MODE: tl.constexpr, K_FIELD: tl.constexpr, V_MODE: tl.constexpr, V_FIELD: tl.constexpr,
    GP: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    nh = tl.num_programs(1)
    seq_len = tl.load(seq_ptr + b)
    first = tl.maximum(seq_len - window, 0)  # NO_WINDOW: 0, the whole context
    per = tl.cdiv(tl.cdiv(seq_len - first, BT), n_splits) * BT
    start = first + split * per
    end = tl.minimum(start + per, seq_len)

    rq = tl.arange(0, GP)
    rd = tl.arange(0, DP)
    rt = tl.arange(0, BT)
    qrow = (b * nh + h) * G + rq
    qmask = rq < G
    w = tl.load(w_ptr + qrow[:, None] * DP + rd[None, :], mask=qmask[:, None], other=0.0)
    base = tl.load(wpar_ptr + qrow * 4, mask=qmask, other=0.0)
    sum_w = tl.load(wpar_ptr + qrow * 4 + 1, mask=qmask, other=0.0)
    w_max = tl.load(wpar_ptr + qrow * 4 + 2, mask=qmask, other=1.0)
    hd = h * DP + rd
    kb, ksh, k2, km, kl = tl.load(kb_ptr + hd), tl.load(ksh_ptr + hd), tl.load(k2_ptr + hd), tl.load(km_ptr + hd), tl.load(kl_ptr + hd)
    vb, vsh, v2, vm, vl = tl.load(vb_ptr + hd), tl.load(vsh_ptr + hd), tl.load(v2_ptr + hd), tl.load(vm_ptr + hd), tl.load(vl_ptr + hd)

    m_i = tl.full([GP], -1e30, dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    z_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, DP], dtype=tl.float32)
    for t0 in range(start, end, BT):
        pos = t0 + rt
        inside = pos < end
        valid = inside & (pos >= n_sink)  # sinks are exact: the merge adds them
        blk = tl.load(bt_ptr + b * s_bt + pos // block_size, mask=inside, other=0).to(tl.int64)
        rows = cache_ptr + blk * s_blk + h * s_head + (pos % block_size).to(tl.int64) * s_tok

        k_lev = tl.load(klut_ptr + h * s_klut + kl[None, :] + read_codes(rows, valid, kb, ksh, k2, km))
        k_s, k_z = token_scale(rows, valid, K_MODE, K_FIELD, BT)
        dot = tl.dot(w, tl.trans(k_lev))  # [GP, BT], fp32 accumulation
        score = base[:, None] + w_max[:, None] * (dot * k_s[None, :]) + sum_w[:, None] * k_z[None, :]
        score = tl.where(valid[None, :], score, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(score, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(score - m_new[:, None])
        v_lev = tl.load(vlut_ptr + h * s_vlut + vl[None, :] + read_codes(rows, valid, vb, vsh, v2, vm))
        v_s, v_z = token_scale(rows, valid, V_MODE, V_FIELD, BT)
        acc = acc * alpha[:, None] + tl.dot((p * v_s[None, :]).to(tl.float16), v_lev)
        l_i = l_i * alpha + tl.sum(p, 1)
        z_i = z_i * alpha + tl.sum(p * v_z[None, :], 1)
        m_i = m_new

    out = ((b * nh + h) * n_splits + split) * GP + rq
    tl.store(po_ptr + out[:, None] * DP + rd[None, :], acc + z_i[:, None])
    tl.store(pml_ptr + out * 2, m_i)
    tl.store(pml_ptr + out * 2 + 1, l_i)


@triton.jit
def _merge_kernel(
    po_ptr, pml_ptr, q_ptr, s_qb, s_qh, merged_ptr,
    cache_ptr, s_blk, s_head, s_tok, bt_ptr, s_bt, seq_ptr, window, slot_bytes, sink_bytes, n_sink, n_splits, qk_scale, G,
    GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NSP: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    qh = tl.program_id(1)
    nh = tl.num_programs(1) // G
    h = qh // G
    r = qh % G
    rs = tl.arange(0, NSP)
    smask = rs < n_splits
    idx = ((b * nh + h) * n_splits + rs) * GP + r
    m_s = tl.load(pml_ptr + idx * 2, mask=smask, other=-1e30)
    l_s = tl.load(pml_ptr + idx * 2 + 1, mask=smask, other=0.0)
    top = tl.max(m_s, 0)

    rd = tl.arange(0, DP)
    dmask = rd < D
    seq_len = tl.load(seq_ptr + b)
    rk = tl.arange(0, SP)
    kmask = (rk < tl.minimum(n_sink, seq_len)) & (rk >= tl.maximum(seq_len - window, 0))  # NO_WINDOW: all sinks
    # Exact sinks from the first block's spill: token k owns bytes [k*4D, (k+1)*4D), K then V.
    entry = cache_ptr + tl.load(bt_ptr + b * s_bt).to(tl.int64) * s_blk + h * s_head
    index = rk[:, None] * (4 * D) + 2 * rd[None, :]
    emask = kmask[:, None] & dmask[None, :]
    k_sink = bf16_bytes(spill_pointers(entry, index, slot_bytes, sink_bytes, s_tok), emask)
    v_sink = bf16_bytes(spill_pointers(entry, index + 2 * D, slot_bytes, sink_bytes, s_tok), emask)
    q = tl.load(q_ptr + b * s_qb + qh * s_qh + rd, mask=dmask, other=0.0).to(tl.float32)
    sig = tl.where(kmask, tl.sum(k_sink * q[None, :], 1) * qk_scale, float("-inf"))
    top = tl.maximum(top, tl.max(sig, 0))

    omega = tl.exp2(m_s - top)
    e_sink = tl.exp2(sig - top)
    total = tl.sum(omega * l_s, 0) + tl.sum(e_sink, 0)
    inv = tl.where(total > 0, 1.0 / total, 0.0)
    parts = tl.load(po_ptr + idx[:, None] * DP + rd[None, :], mask=smask[:, None], other=0.0)
    acc = tl.sum(omega[:, None] * parts, 0) * inv
    sinks = tl.sum(e_sink[:, None] * v_sink, 0) * inv
    row = merged_ptr + (b * tl.num_programs(1) + qh) * (2 * DP + 1)
    tl.store(row + rd, acc)
    tl.store(row + DP + rd, sinks)
    tl.store(row + 2 * DP, tl.sum(omega * l_s, 0) * inv)


def rotate_queries(query: torch.Tensor, kc: KernelCodec, softmax_scale: float, views: DecodeViews) -> None:
    """w16/wpar of ``views`` from query [B, Hq, D] (torch; once per query head)."""
    b, hq, d = query.shape
    h = kc.num_kv_heads
    c = softmax_scale * LOG2E
    q = query.float().view(b, h, hq // h, d)
    w = torch.einsum("bhrd,hde->bhre", q, kc.key.basis) * kc.key.decode_scale[None, :, None, :] * c
    w_max = w.abs().amax(-1)
    w_max = torch.where(w_max > 0, w_max, torch.ones_like(w_max))
    views.w16.zero_()
    views.w16[:, :, :d] = (w / w_max[..., None]).reshape(b, hq, d).to(torch.float16)
    views.wpar[..., 0] = torch.einsum("bhrd,hd->bhr", q, kc.key.mean).reshape(b, hq) * c
    views.wpar[..., 1] = w.sum(-1).reshape(b, hq)
    views.wpar[..., 2] = w_max.reshape(b, hq)
    views.wpar[..., 3] = 0


def _coords(c: KernelComponent) -> list:
    return [c.coord_byte, c.coord_shift, c.coord_two, c.coord_mask, c.coord_lut, c.lut16, c.lut16.stride(0)]


def decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
    softmax_scale: float,
    out: torch.Tensor,
    workspace: DecodeWorkspace | None = None,
    window: int | None = None,
) -> None:
    """Triton twin of the reference decode: query [>= B, Hq, D], out [>= B, Hq, D] (rows < B written).

    ``window``: only positions ``seq_len - window ..`` are read (tiles, block-table entries, sinks).
    """
    bsz = seq_lens.shape[0]
    if bsz == 0:
        return
    kc = kernel_codec(codec, kv_cache.device)
    h, d = kc.num_kv_heads, kc.head_dim
    hq = query.shape[1]
    g = hq // h
    dp, gp = padded_dim(d), padded_group(g)
    longest = block_table.shape[1] * geometry.block_size
    splits = num_splits(bsz, h, longest if window is None else min(longest, window), kv_cache.device)
    ws = workspace if workspace is not None else default_workspace(kv_cache.device)
    views = ws.views(bsz, hq, h, d, splits, grow=workspace is None)
    rotate_queries(query[:bsz], kc, softmax_scale, views)
    cache = (kv_cache, kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2))
    tables = (block_table, block_table.stride(0), seq_lens, NO_WINDOW if window is None else int(window))
    _partial_kernel[(splits, h, bsz)](
        views.w16, views.wpar, *cache, *tables, geometry.block_size, geometry.sink_tokens, splits,
        *_coords(kc.key), *_coords(kc.value), views.part_o, views.part_ml, g,
        K_MODE=kc.key.mode, K_FIELD=kc.key.field_offset, V_MODE=kc.value.mode, V_FIELD=kc.value.field_offset,
        GP=gp, DP=dp, BT=_TOKENS_PER_TILE, num_warps=4,
    )  # fmt: skip
    q = query if query.stride(2) == 1 else query.contiguous()
    _merge_kernel[(bsz, hq)](
        views.part_o, views.part_ml, q, q.stride(0), q.stride(1), views.merged, *cache, *tables,
        geometry.slot_bytes, max(geometry.sink_bytes, 1), geometry.sink_tokens, splits, softmax_scale * LOG2E, g,
        GP=gp, D=d, DP=dp, NSP=MAX_SPLITS,
        SP=max(2, triton.next_power_of_2(max(geometry.sink_tokens, 1))), num_warps=4,
    )  # fmt: skip
    merged = views.merged.view(bsz, h, g, 2 * dp + 1)
    vc = kc.value
    acc = merged[..., :d] * vc.decode_scale[None, :, None, :]
    o = torch.einsum("bhre,hde->bhrd", acc, vc.basis) + merged[..., 2 * dp, None] * vc.mean[None, :, None, :]
    o = o + merged[..., dp : dp + d]
    out[:bsz] = o.reshape(bsz, hq, d).to(out.dtype)
