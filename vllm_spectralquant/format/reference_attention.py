"""Reference attention over the packed paged cache (torch, fp32, CPU or CUDA).

The math the kernels must reproduce, per query token q of a query head served by KV head h:

* rotate once: ``w = scale_K * (q @ U_K)``, ``base = q . mean_K``;
* packed context token t: ``score_t = base + s_t * (w . levels_t) + z_t * sum(w)``;
  exact sink token t: ``score_t = q . k_t``;
* ``p = softmax(softmax_scale * score)`` over the causal context;
* accumulate in the V basis: ``acc = sum_t p_t (s_t levels_t + z_t)`` over packed tokens, then rotate
  back once: ``o = (scale_V * acc) @ U_V.T + (sum_packed p) mean_V + sum_sinks p_t v_t``.

No per-token D x D work; this equals dense attention over the decoded K/V (see tests).
Requests are split as vLLM orders them: single-token decodes are batched, each prefill (or
prefill continuation) runs on its own.
"""

from __future__ import annotations

import torch

from vllm_spectralquant.format.codec import decode_rotated, unrotate
from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.paged import CacheGeometry, check_block_table, check_cache, gather_slots, read_sinks
from vllm_spectralquant.format.params import LayerCodec


def _check_batch(query, kv_cache, block_table, seq_lens, query_start_loc, codec, geometry) -> None:
    check_cache(kv_cache, codec.num_kv_heads, geometry)
    if query.dim() != 3 or query.shape[2] != codec.head_dim or query.shape[1] % codec.num_kv_heads:
        raise FormatError(
            f"query must have shape [tokens, num_heads, {codec.head_dim}] with num_heads a multiple of "
            f"{codec.num_kv_heads} KV heads, got {tuple(query.shape)}"
        )
    if not query.is_floating_point():
        raise FormatError(f"query must be floating point, got {query.dtype}")
    b = seq_lens.shape[0]
    if query_start_loc.shape != (b + 1,) or block_table.shape[0] < b:
        raise FormatError(
            f"batch of {b} sequences needs query_start_loc [{b + 1}] and block_table [>= {b}, max_blocks], "
            f"got {tuple(query_start_loc.shape)} and {tuple(block_table.shape)}"
        )
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    if b and (bool((q_lens < 0).any()) or bool((q_lens > seq_lens).any())):
        raise FormatError("every sequence needs 0 <= query length <= seq_len")
    if b and int(query_start_loc[-1]) > query.shape[0]:
        raise FormatError(f"query_start_loc ends at {int(query_start_loc[-1])} but query has {query.shape[0]} tokens")
    check_block_table(block_table[:b], seq_lens, kv_cache.shape[0], geometry.block_size)


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    codec: LayerCodec,
    geometry: CacheGeometry,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
    *,
    validate: bool = True,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of new query tokens over their sequences' packed context.

    Args:
        query: float [T, Hq, D]; tokens of sequence b are ``query_start_loc[b]:query_start_loc[b+1]``
            and sit at the end of its context (positions ``seq_lens[b] - q_len .. seq_lens[b] - 1``).
            Rows past ``query_start_loc[-1]`` (vLLM padding) are left untouched in ``out``.
        kv_cache: uint8 [num_blocks, H, block_size, page_slot_bytes], already holding the new tokens.
        block_table: int [>= B, max_blocks]; seq_lens: int [B]; query_start_loc: int [B + 1].
        window: sliding window in tokens, vLLM's convention: the query at position p attends positions
            ``p - window + 1 .. p`` (None: the whole context). Tokens before a row's window are never used, so
            their block-table entries may point anywhere (vLLM's null block once the window passed them).
    Returns:
        ``out`` (allocated float32 [T, Hq, D] if None).
    """
    if validate:
        _check_batch(query, kv_cache, block_table, seq_lens, query_start_loc, codec, geometry)
    scale = codec.head_dim**-0.5 if softmax_scale is None else softmax_scale
    if out is None:
        out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [qsl[i + 1] - qsl[i] for i in range(len(lens))]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    prefills = [i for i, n in enumerate(q_lens) if n > 1]
    groups = ([decodes] if decodes else []) + [[i] for i in prefills]
    for rows in groups:
        idx = torch.tensor(rows, device=query.device)
        q_len = max(q_lens[i] for i in rows)
        # Query tokens of each sequence padded to q_len, with their absolute positions (-1 = padding).
        j = torch.arange(q_len, device=query.device)
        starts = query_start_loc[idx].long()
        n_q = (query_start_loc[idx + 1] - query_start_loc[idx]).long()
        tok = starts[:, None] + j[None, :]
        q_valid = j[None, :] < n_q[:, None]
        q = query[torch.where(q_valid, tok, 0)].float()
        q_pos = torch.where(q_valid, seq_lens[idx].long()[:, None] - n_q[:, None] + j[None, :], -1)
        o = _attend(q, q_pos, kv_cache, block_table[idx], seq_lens[idx].long(), codec, geometry, scale, window)
        out[tok[q_valid]] = o[q_valid].to(out.dtype)
    return out


def _attend(q, q_pos, kv_cache, block_table, ctx_len, codec: LayerCodec, geometry: CacheGeometry, scale, window=None):
    """q: float32 [B, Q, Hq, D]; q_pos: [B, Q] (-1 = padding) -> float32 [B, Q, Hq, D]."""
    bsz, qn, hq, d = q.shape
    h = codec.num_kv_heads
    g = hq // h
    kc, vc = codec.key, codec.value
    slots, valid = gather_slots(kv_cache, block_table, ctx_len, geometry)
    length = slots.shape[1]
    pos = torch.arange(length, device=q.device)
    if window is not None:
        # Tokens before the earliest query's window count as padding: their bytes (vLLM may have freed
        # and reused their blocks) are zeroed below like padding, and no query attends them.
        first_q = torch.where(q_pos >= 0, q_pos, q_pos.max(dim=1, keepdim=True).values).min(dim=1).values
        valid = valid & (pos[None, :] > first_q[:, None] - window)
    keys, values = decode_rotated(slots.reshape(bsz * length, h, -1), codec)
    k_lv, v_lv = keys.levels.view(bsz, length, h, d), values.levels.view(bsz, length, h, d)
    # Padding positions hold whatever bytes the cache has (NaN fp16 fields included): zero them,
    # since a zero probability times NaN would still be NaN.
    vmask = valid[..., None]
    k_lv, v_lv = torch.where(vmask[..., None], k_lv, 0.0), torch.where(vmask[..., None], v_lv, 0.0)
    k_s, k_z, v_s, v_z = (
        torch.where(vmask, t.view(bsz, length, h), 0.0) for t in (keys.s, keys.z, values.s, values.z)
    )

    qg = q.view(bsz, qn, h, g, d)
    w = torch.einsum("bqhrd,hde->bqhre", qg, kc.basis) * kc.decode_scale[None, None, :, None, :]
    base = torch.einsum("bqhrd,hd->bhrq", qg, kc.mean)
    dot = torch.einsum("bqhre,blhe->bhrql", w, k_lv)
    scores = base[..., None] + k_s.permute(0, 2, 1)[:, :, None, None, :] * dot
    scores = scores + k_z.permute(0, 2, 1)[:, :, None, None, :] * w.sum(-1).permute(0, 2, 3, 1)[..., None]

    n_sink = min(geometry.sink_tokens, length)
    if n_sink:
        k_sink, v_sink = read_sinks(kv_cache, block_table[:, 0], geometry)
        sink_valid = valid[:, :n_sink, None, None]
        k_sink = torch.where(sink_valid, k_sink[:, :n_sink], 0.0)
        v_sink = torch.where(sink_valid, v_sink[:, :n_sink], 0.0)
        scores[..., :n_sink] = torch.einsum("bqhrd,blhd->bhrql", qg, k_sink)
    allowed = valid[:, None, None, None, :] & (pos[None, None, None, None, :] <= q_pos[:, None, None, :, None])
    if window is not None:
        allowed = allowed & (pos[None, None, None, None, :] > q_pos[:, None, None, :, None] - window)
    scores = torch.where(allowed, scores * scale, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(allowed, p, 0.0)  # rows with nothing allowed (padding) are NaN after softmax

    is_packed = (pos >= n_sink).to(p.dtype)
    p_packed = p * is_packed
    acc = torch.einsum("bhrql,blhe->bqhre", p_packed * v_s.permute(0, 2, 1)[:, :, None, None, :], v_lv)
    acc = acc + torch.einsum("bhrql,blh->bqhr", p_packed, v_z)[..., None]
    mass = p_packed.sum(-1).permute(0, 3, 1, 2)[..., None]  # [B, Q, H, g, 1]
    o = torch.einsum("bqhre,hde->bqhrd", acc * vc.decode_scale[None, None, :, None, :], vc.basis) + mass * vc.mean[None, None, :, None, :]
    if n_sink:
        o = o + torch.einsum("bhrql,blhd->bqhrd", p[..., :n_sink], v_sink)
    return o.reshape(bsz, qn, hq, d)


def decode_context(
    kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int, codec: LayerCodec, geometry: CacheGeometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded K, V float32 [seq_len, H, D] of one sequence (exact sinks included)."""
    lengths = torch.tensor([seq_len], device=kv_cache.device)
    slots, _ = gather_slots(kv_cache, block_row[None], lengths, geometry)
    k, v = (unrotate(c, comp) for c, comp in zip(decode_rotated(slots[0], codec), (codec.key, codec.value)))
    n_sink = min(geometry.sink_tokens, seq_len)
    if n_sink:
        k_sink, v_sink = read_sinks(kv_cache, block_row[:1], geometry)
        k[:n_sink], v[:n_sink] = k_sink[0, :n_sink], v_sink[0, :n_sink]
    return k, v


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """Plain attention of the last ``len(q)`` positions over k, v (GQA); ``window`` as in :func:`paged_attention`.

    q: [n, Hq, D]; k, v: [L, H, D] -> float32 [n, Hq, D].
    """
    n, hq, d = q.shape
    length, h, _ = k.shape
    g = hq // h
    kk = k.float().repeat_interleave(g, dim=1)
    vv = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.float(), kk) * scale
    q_pos = torch.arange(length - n, length, device=q.device)
    mask = torch.arange(length, device=q.device)[None, :] <= q_pos[:, None]
    if window is not None:
        mask = mask & (torch.arange(length, device=q.device)[None, :] > q_pos[:, None] - window)
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", torch.softmax(s, dim=-1), vv)


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, codec: LayerCodec, geometry: CacheGeometry
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded context of B sequences, padded to the longest: K, V float32 [B, L, H, D] (exact sinks included).

    Positions past a sequence's length are zero.
    """
    slots, valid = gather_slots(kv_cache, block_table, seq_lens, geometry)
    b, length, h, _ = slots.shape
    keys, values = decode_rotated(slots.reshape(b * length, h, -1), codec)
    k = unrotate(keys, codec.key).view(b, length, h, -1)
    v = unrotate(values, codec.value).view(b, length, h, -1)
    n_sink = min(geometry.sink_tokens, length)
    if n_sink:
        k_sink, v_sink = read_sinks(kv_cache, block_table[:, 0], geometry)
        k[:, :n_sink], v[:, :n_sink] = k_sink[:, :n_sink], v_sink[:, :n_sink]
    mask = valid[..., None, None]
    return torch.where(mask, k, 0.0), torch.where(mask, v, 0.0)
