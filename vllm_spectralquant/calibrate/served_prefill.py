"""Attention as serving computes it over a packed cache, inside a transformers forward (no vLLM).

With chunked prefill (the eval's ``max_num_batched_tokens``), a query attends over the keys and values
of the chunks before its own as stored, i.e. decoded from packed slots, over the exact ones of its own
chunk up to itself, and over the first ``sink_tokens`` positions exact in bf16 (the sink spill). The
key-gain choice (calibrate/key_gain.py) scores calibration windows this way, and bench/quality_probe.py
builds its cache variants on the same attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from vllm_spectralquant.format.codec import decode_slots, encode_slots
from vllm_spectralquant.format.paged import SINK_DTYPE
from vllm_spectralquant.format.params import LayerCodec

#: Tokens of every prefill chunk that serving packs before later chunks attend to them (the eval's
#: ``max_num_batched_tokens`` and the probe's chunk).
CHUNK_TOKENS = 128


def chunked_prefill_attention(
    q: torch.Tensor, stored_k: torch.Tensor, stored_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    chunk: int = CHUNK_TOKENS, stored_bias: torch.Tensor | None = None, sliding_window: int | None = None,
) -> torch.Tensor:
    """q [Hq, T, D]; stored_k/v [T, H, D], the cache's copies (decoded, sinks exact); k/v [T, H, D] exact;
    float32 -> [Hq, T, D]. A query reads the stored copies of the positions before its chunk and the exact
    ones of its chunk up to itself; ``stored_bias`` [Hq, T, T] is added to its scores of stored keys.
    ``sliding_window`` W: a query at position p reads positions above p - W only (a sliding-window layer).

    One attention per chunk over positions 0..end-1 (stored before the chunk, exact inside it), so the
    work is that of a causal prefill, not of a [T, 2T] masked one (5x less at T = 1024)."""
    t = k.shape[0]
    g = q.shape[0] // k.shape[1]
    pos = torch.arange(t, device=k.device)
    out = torch.empty_like(q)
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        lo = 0 if sliding_window is None else max(0, start + 1 - sliding_window)  # older positions: masked anyway
        keys = torch.cat([stored_k[lo:start], k[start:end]]).repeat_interleave(g, dim=1).transpose(0, 1)
        values = torch.cat([stored_v[lo:start], v[start:end]]).repeat_interleave(g, dim=1).transpose(0, 1)
        qp, kp = pos[start:end, None], pos[None, lo:end]
        mask = kp <= qp
        if sliding_window is not None:
            mask = mask & (kp > qp - sliding_window)
        if stored_bias is not None:
            bias = torch.zeros(q.shape[0], end - start, end - lo, dtype=q.dtype, device=q.device)
            bias[:, :, : start - lo] = stored_bias[:, start:end, lo:start]
            mask = torch.where(mask, bias, -torch.inf)
        out[:, start:end] = torch.nn.functional.scaled_dot_product_attention(
            q[:, start:end], keys, values, attn_mask=mask, scale=scale
        )
    return out


def first_scored(chunk: int = CHUNK_TOKENS) -> int:
    """The first position whose prediction ``served_loss`` scores: the tokens predicted from the second
    chunk on, the first ones whose attention reads packed keys."""
    return chunk + 1


def reads_packed_keys(window_tokens: int, chunk: int = CHUNK_TOKENS) -> bool:
    """Whether ``served_loss`` scores any token of a window this long."""
    return window_tokens > first_scored(chunk)


SERVED_ATTN_IMPLEMENTATION = "spectralquant_served_prefill"
_ACTIVE: ContextVar[ServedPrefill | None] = ContextVar("spectralquant_served_prefill", default=None)


@dataclass(frozen=True)
class ServedPrefill:
    """The attention serving computes over a packed cache, for one codec per layer (keys decode at the
    codec's own gain, as the backend's do)."""

    codecs: Sequence[LayerCodec]
    chunk: int = CHUNK_TOKENS
    sink_tokens: int = 1

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               sliding_window: int | None = None) -> torch.Tensor:
        """q [Hq, T, D], k/v [T, H, D] float32 -> [Hq, T, D]; ``sliding_window``: the layer's, if any."""
        codec = self.codecs[layer].to(k.device)
        kh, vh = decode_slots(encode_slots(k, v, codec), codec)
        exact = (torch.arange(k.shape[0], device=k.device) < self.sink_tokens)[:, None, None]
        kh = torch.where(exact, k.to(SINK_DTYPE).float(), kh)
        vh = torch.where(exact, v.to(SINK_DTYPE).float(), vh)
        return chunked_prefill_attention(q, kh, vh, k, v, scale, self.chunk, sliding_window=sliding_window)


def _served_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, H, T, D] -> ([B, T, Hq, D], None)."""
    served = _ACTIVE.get()
    if served is None:
        raise RuntimeError(f"{SERVED_ATTN_IMPLEMENTATION} attention called outside served_loss()")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")  # Gemma 3's and Qwen2's sliding-window layers pass theirs
    out = torch.stack([
        served.attend(module.layer_idx, query[b].float(), key[b].transpose(0, 1).float(), value[b].transpose(0, 1).float(),
                      scale, window)
        for b in range(query.shape[0])
    ])  # fmt: skip
    return out.transpose(1, 2).to(query.dtype), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SERVED_ATTN_IMPLEMENTATION, _served_attention_forward)
    AttentionMaskInterface.register(SERVED_ATTN_IMPLEMENTATION, sdpa_mask)


def served_loss(model: torch.nn.Module, window: torch.Tensor, position_offset: int, served: ServedPrefill) -> float:
    """Mean next-token loss (nats) of window int64 [T] run through ``served``, over the tokens predicted
    from the second chunk on (the ones whose prediction reads packed keys)."""
    _register()
    window = window.to(next(model.parameters()).device)
    previous = model.config._attn_implementation
    token = _ACTIVE.set(served)
    try:
        model.set_attn_implementation(SERVED_ATTN_IMPLEMENTATION)
        positions = position_offset + torch.arange(window.numel(), device=window.device)[None]
        with torch.no_grad():
            logits = model(input_ids=window[None], position_ids=positions, use_cache=False).logits[0].float()
    finally:
        _ACTIVE.reset(token)
        model.set_attn_implementation(previous)
    first = first_scored(served.chunk)
    lp = torch.log_softmax(logits[first - 1 : -1], -1)
    return float(-lp.gather(1, window[first:, None]).mean())
