"""Choosing each preset's decode-only key gain by the model's own loss on calibration windows.

Packed keys decode as ``mean + g (k_hat - mean)`` (``ComponentCodec.gain``; codes and bytes do not
change). Quantisation shrinks ``k_hat`` towards the mean, flattening the attention over packed keys;
``g > 1`` sharpens it again and also amplifies the coding noise. Where the balance lies depends on the
model: served, g = 1.04 takes SmolLM2-135M's sq2_5bit from +1.34 to +0.66 % perplexity and costs
Qwen2.5-Coder-1.5B a point on every preset (BENCHMARKS.md, twelfth session).

Local criteria do not see it: on SmolLM2's calibration windows the attention-output error and the
attention KL of every layer are smallest at g = 1 for every preset (thirteenth session), while its
perplexity improves up to 1.04. So the gain is chosen on what the eval measures: the next-token loss
of calibration windows run as serving runs them (chunked prefill: a query sees the packed keys and
values of the chunks before its own, the exact ones of its own chunk, and the first ``sink_tokens``
positions exact in bf16), for each candidate gain, paired per window against g = 1. A gain other than
1 is kept only where its mean improvement exceeds ``MARGIN_SE`` standard errors of that paired
difference, so a model that does not gain stays at 1.

The model runs through transformers (no vLLM), one forward per window, preset and candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch

from vllm_spectralquant.format.codec import decode_slots, encode_slots
from vllm_spectralquant.format.paged import SINK_DTYPE
from vllm_spectralquant.format.params import LayerCodec

#: Candidate gains besides 1 (BENCHMARKS.md, twelfth session: SmolLM2's optimum lies at 1.02-1.05, flat
#: beyond; Qwen2.5 loses from 1.02 on).
GAIN_CANDIDATES = (1.02, 1.04)
#: Tokens of every prefill chunk that serving packs before later chunks attend to them (the eval's
#: ``max_num_batched_tokens`` and the probe's chunk).
CHUNK_TOKENS = 128
#: A gain must beat g = 1 by this many standard errors of the paired per-window loss difference.
MARGIN_SE = 2.0
#: ``--key-gain auto``: choose each preset's gain here.
KEY_GAIN_AUTO = "auto"
#: Calibration windows the choice runs on (each costs a forward pass per preset and candidate). SmolLM2's
#: sq2_5bit gains 0.24 ± 0.11 (1e-2 nats) from 1.02 on 16 windows, which 4 windows cannot resolve
#: (−0.10 ± 0.16); Qwen2.5's losses from any gain show at 4 (BENCHMARKS.md, thirteenth session).
GAIN_WINDOWS = 16

SERVED_ATTN_IMPLEMENTATION = "spectralquant_served_prefill"
_ACTIVE: ContextVar[ServedPrefill | None] = ContextVar("spectralquant_served_prefill", default=None)


@dataclass(frozen=True)
class ServedPrefill:
    """The attention serving computes over a packed cache, for one codec per layer and one key gain."""

    codecs: Sequence[LayerCodec]
    gain: float
    chunk: int = CHUNK_TOKENS
    sink_tokens: int = 1

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q [Hq, T, D], k/v [T, H, D] float32 -> [Hq, T, D]."""
        codec = self.codecs[layer].to(k.device)
        t = k.shape[0]
        kh, vh = decode_slots(encode_slots(k, v, codec), codec)
        mean = codec.key.mean.float()
        kh = mean + self.gain * (kh - mean)
        pos = torch.arange(t, device=k.device)
        exact = (pos < self.sink_tokens)[:, None, None]
        kh = torch.where(exact, k.to(SINK_DTYPE).float(), kh)
        vh = torch.where(exact, v.to(SINK_DTYPE).float(), vh)
        start = (pos // self.chunk) * self.chunk
        # Keys: packed copies of all T, then exact copies of all T; a query reads the packed ones
        # before its chunk and the exact ones of its chunk up to itself.
        mask = torch.cat([pos[None, :] < start[:, None], (pos[None, :] <= pos[:, None]) & (pos[None, :] >= start[:, None])], 1)
        g = q.shape[0] // k.shape[1]
        keys = torch.cat([kh, k]).repeat_interleave(g, dim=1).transpose(0, 1)
        values = torch.cat([vh, v]).repeat_interleave(g, dim=1).transpose(0, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def _served_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, H, T, D] -> ([B, T, Hq, D], None)."""
    served = _ACTIVE.get()
    if served is None:
        raise RuntimeError(f"{SERVED_ATTN_IMPLEMENTATION} attention called outside served_loss()")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.stack([
        served.attend(module.layer_idx, query[b].float(), key[b].transpose(0, 1).float(), value[b].transpose(0, 1).float(), scale)
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
    first = served.chunk + 1
    lp = torch.log_softmax(logits[first - 1 : -1], -1)
    return float(-lp.gather(1, window[first:, None]).mean())


@dataclass(frozen=True)
class GainChoice:
    """Per-window losses of one preset at gain 1 and at each candidate, and the gain chosen."""

    gains: tuple[float, ...]  # 1 first
    loss: list[list[float]]  # [gain][window], nats
    gain: float

    def paired(self, i: int) -> tuple[float, float]:
        """(mean, standard error) of candidate i's per-window loss minus gain 1's (nats)."""
        d = [a - b for a, b in zip(self.loss[i], self.loss[0])]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else math.inf
        return mean, se

    def describe(self) -> str:
        parts = []
        for i, g in enumerate(self.gains[1:], 1):
            m, se = self.paired(i)
            parts.append(f"{g:g}: {100 * m:+.2f} ± {100 * se:.2f}")
        return f"gain {self.gain:g} (loss vs 1, 1e-2 nats: " + ", ".join(parts) + ")"


def pick_gain(gains: Sequence[float], loss: list[list[float]]) -> GainChoice:
    """The choice from per-window losses [gain][window] (``gains[0]`` = 1): the candidate with the lowest
    mean loss among those beating 1 by more than ``MARGIN_SE`` paired standard errors, else 1."""
    choice = GainChoice(tuple(gains), loss, 1.0)
    best, best_mean = 1.0, 0.0
    for i, g in enumerate(choice.gains[1:], 1):
        m, se = choice.paired(i)
        if m < best_mean and -m > MARGIN_SE * se:
            best, best_mean = g, m
    return replace(choice, gain=best)


def choose_key_gains(
    model: torch.nn.Module,
    windows: torch.Tensor,
    position_offsets: Sequence[int],
    codecs: Mapping[str, Sequence[LayerCodec]],
    *,
    gains: Sequence[float] = GAIN_CANDIDATES,
    chunk: int = CHUNK_TOKENS,
    sink_tokens: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, GainChoice]:
    """Each preset's key gain: the candidate (or 1) with the lowest mean served loss over windows [N, T],
    where it beats 1 by more than ``MARGIN_SE`` paired standard errors; else 1.

    ``codecs``: preset name -> one codec per layer (any gain they carry is ignored). ``progress(1)``
    after every forward pass.
    """
    if windows.shape[1] <= chunk + 1:
        raise ValueError(f"windows of {windows.shape[1]} tokens never read packed keys with {chunk}-token chunks")
    candidates = (1.0, *(float(g) for g in gains if float(g) != 1.0))
    out = {}
    for name, layer_codecs in codecs.items():
        plain = with_key_gain(layer_codecs, 1.0)
        loss = []
        for g in candidates:
            served = ServedPrefill(plain, g, chunk, sink_tokens)
            row = []
            for w, offset in zip(windows, position_offsets):
                row.append(served_loss(model, w, int(offset), served))
                if progress is not None:
                    progress(1)
            loss.append(row)
        out[name] = pick_gain(candidates, loss)
    return out


def with_key_gain(codecs: Sequence[LayerCodec], gain: float) -> list[LayerCodec]:
    """The codecs with every layer's keys decoding at ``gain`` (1: no gain tensor)."""
    def one(c: LayerCodec) -> LayerCodec:
        h = c.key.mean.shape[0]
        return replace(c, key=replace(c.key, gain=None if gain == 1.0 else torch.full((h,), float(gain))))

    return [one(c) for c in codecs]
