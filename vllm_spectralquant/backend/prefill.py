"""A prefill chunk's attention over its packed context and its own raw K/V, in bounded memory.

A continuation chunk (chunked prefill of a long prompt, or a prefix-cache hit) of ``n`` query tokens
at positions ``cached .. cached + n - 1`` attends over ``cached`` packed tokens plus its own ``n``
raw ones. Dequantising the whole context at once costs O(context) memory per layer that vLLM's
memory profiling never sees (at 128k tokens, 8 KV heads, D = 128 that is over 1 GiB in float32
before any GQA expansion), and a materialised causal mask costs O(n x context). Here the keys are
walked in tiles of whole blocks (``ops.gather_context`` per tile) and the queries in tiles too, with
an online softmax (running max and sum, as flash attention does), so the scratch is bounded by
``SCORE_BUDGET_BYTES`` whatever the context length. GQA folds the query group into the query axis
instead of repeating K/V.

Numbers: scores and accumulation in float32; each tile is dequantised by ``ops.gather_context``.
Every block's spill holds its own first ``sink_tokens`` tokens exactly (docs/FORMAT.md), and a
gather reads the first block it is given that way, so the first ``sink_tokens`` tokens of every tile
come from that exact (bf16) copy instead of their codes: a few more exact tokens than a one-piece
gather (1 in ``KEY_TILE_TOKENS`` per sink token), never fewer.
"""

from __future__ import annotations

import torch

from vllm_spectralquant import ops
from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec

#: Bytes of float32 scores one step may hold (query tile x key tile x query heads x 4).
SCORE_BUDGET_BYTES = 128 << 20
#: Keys per tile, in tokens (rounded down to whole blocks): each tile is dequantised once.
KEY_TILE_TOKENS = 2048


def key_tile_tokens(block_size: int) -> int:
    """Keys per tile: whole blocks, about KEY_TILE_TOKENS."""
    return max(KEY_TILE_TOKENS // block_size, 1) * block_size


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,
    cached: int,
    codec: LayerCodec,
    geometry: CacheGeometry,
    scale: float,
    window: int | None = None,
    budget: int = SCORE_BUDGET_BYTES,
) -> torch.Tensor:
    """Causal attention of one sequence's chunk; returns float32 [n, Hq, D].

    Args:
        query: [n, Hq, D] at positions cached .. cached + n - 1; key, value: the chunk's raw [n, H, D].
        block_row: int32 [max_blocks] block-table row of the sequence (its first ``cached`` tokens
            are read from the packed cache).
        window: sliding window (a query at p sees keys p - window + 1 .. p); None: the whole context.
    Memory: the softmax state (n x Hq x (D + 2) floats), one dequantised key tile and one score tile
    of at most ``budget`` bytes, whatever ``cached`` is.
    """
    n, hq, d = query.shape
    h = key.shape[1]
    g = hq // h
    bs = geometry.block_size
    tile = key_tile_tokens(bs)
    q_tile = max(min(n, budget // (4 * hq * tile)), 1)
    # Queries grouped per KV head: rows [H, g * n] (head hq = kv_head * g + j, as vLLM orders them).
    qg = query.float().view(n, h, g, d).permute(1, 2, 0, 3).reshape(h, g * n, d)
    qpos = torch.arange(cached, cached + n, device=query.device)
    state = _OnlineSoftmax(h, g, n, d, query.device)
    lo = 0 if window is None else max(cached - window + 1, 0)  # the first key any query sees
    # Packed context, in whole blocks from the one holding position lo: each tile dequantised once.
    for k0 in range((lo // bs) * bs, cached, tile):
        k1 = min(k0 + tile, cached)
        b0 = k0 // bs
        blocks = block_row[b0 : -(-k1 // bs)].unsqueeze(0).contiguous()
        kc, vc = ops.gather_context(kv_cache, blocks, blocks.new_tensor([k1 - k0]), codec, geometry)
        if window is None and fused_tiles(query):  # every query sees the whole tile: no mask
            o, lse = _fused_tile(qg, kc[0].to(query.dtype), vc[0].to(query.dtype), scale)
            state.add_partial(o, lse)
            continue
        kpos = torch.arange(k0, k1, device=query.device)
        for q0 in range(0, n, q_tile):
            q1 = min(q0 + q_tile, n)
            if window is not None and k1 <= cached + q0 - window + 1:
                continue  # the whole tile slid out of these queries' window
            state.add(qg, q0, q1, kc[0], vc[0], scale, _mask(qpos[q0:q1], kpos, window, causal=False))
    # The chunk's own raw K/V, causal: each query tile sees keys up to its last query.
    for k0 in range(0, n, tile):
        k1 = min(k0 + tile, n)
        kpos = torch.arange(cached + k0, cached + k1, device=query.device)
        kr, vr = key[k0:k1].float(), value[k0:k1].float()
        for q0 in range(0, n, q_tile):
            q1 = min(q0 + q_tile, n)
            if q1 <= k0 or (window is not None and k1 <= q0 - window + 1):
                continue  # all of these keys are in the future of (or slid out of) these queries
            state.add(qg, q0, q1, kr, vr, scale, _mask(qpos[q0:q1], kpos, window, causal=True))
    return state.result().view(h, g, n, d).permute(2, 0, 1, 3).reshape(n, hq, d)


def fused_tiles(query: torch.Tensor) -> bool:
    """Unmasked context tiles go through torch's fused flash kernel (CUDA, fp16/bf16 queries)."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and FUSED_TILES


#: Set False to force the plain float32 tile path on CUDA too (benchmarks compare the two).
FUSED_TILES = True


def _fused_tile(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All queries over one unmasked tile: (out float32 [H, rows, D], natural-log lse float32 [H, rows]).

    qg float32 [H, rows, D] (rows = g x n: the group folded into the query axis, so no K/V repeat);
    k, v [t, H, D] in the query dtype. torch's flash kernel returns the log-sum-exp the merge needs.
    """
    q = qg.to(k.dtype).unsqueeze(0)
    out = torch.ops.aten._scaled_dot_product_flash_attention(
        q, k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), 0.0, False, False, scale=scale
    )
    rows = qg.shape[1]
    return out[0][0].float(), out[1][0][:, :rows]


def _mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None, causal: bool) -> torch.Tensor | None:
    """bool [nq, nk]: key visible to query (None: all visible)."""
    visible = None
    if causal:
        visible = kpos[None, :] <= qpos[:, None]
    if window is not None:
        inside = kpos[None, :] > qpos[:, None] - window
        visible = inside if visible is None else visible & inside
    return visible


class _OnlineSoftmax:
    """Running max m, sum l and weighted values acc per (KV head, group member, query), float32."""

    def __init__(self, h: int, g: int, n: int, d: int, device: torch.device):
        self.n = n
        self.m = torch.full((h, g, n), float("-inf"), device=device)
        self.l = torch.zeros(h, g, n, device=device)
        self.acc = torch.zeros(h, g, n, d, device=device)

    def add(self, qg, q0: int, q1: int, k, v, scale: float, visible: torch.Tensor | None) -> None:
        """Fold keys k, v [t, H, D] into queries q0..q1 of qg [H, g * n, D]; visible bool [q1 - q0, t]."""
        h, g = self.m.shape[:2]
        q = qg.view(h, g, self.n, -1)[:, :, q0:q1]
        s = torch.matmul(q, k.permute(1, 2, 0)[:, None]).mul_(scale)  # [H, g, nq, t]
        if visible is not None:
            s.masked_fill_(~visible, float("-inf"))
        m_old = self.m[:, :, q0:q1]
        m_new = torch.maximum(m_old, s.amax(dim=-1))
        # A query that has seen no visible key yet keeps m = -inf; shift by 0 there (no inf - inf).
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = torch.exp(s.sub_(shift[..., None]))
        alpha = torch.exp(m_old - shift)
        self.l[:, :, q0:q1] = self.l[:, :, q0:q1] * alpha + p.sum(dim=-1)
        self.acc[:, :, q0:q1] = self.acc[:, :, q0:q1] * alpha[..., None] + torch.matmul(p, v.transpose(0, 1)[:, None])
        self.m[:, :, q0:q1] = m_new

    def add_partial(self, o: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold a normalised partial result over all queries: o [H, g * n, D], lse [H, g * n]."""
        h, g, n = self.m.shape
        o, lse = o.view(h, g, n, -1), lse.view(h, g, n)
        m_new = torch.maximum(self.m, lse)
        shift = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        alpha, beta = torch.exp(self.m - shift), torch.exp(lse - shift)
        self.l = self.l * alpha + beta
        self.acc = self.acc * alpha[..., None] + o * beta[..., None]
        self.m = m_new

    def result(self) -> torch.Tensor:
        """[H, g, n, D]."""
        return self.acc / self.l.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
