"""Attention fidelity: how far attention outputs move when K/V go through a codec (real queries).

For a window of post-RoPE q [T, Hq, D], k, v [T, H, D], the reference is causal attention over the
exact K/V; the candidate uses K/V decoded from packed slots, with the first ``sink_tokens``
positions stored exactly (bf16), as the paged cache does. Errors accumulate per (layer, KV head)
over windows, tokens and the query heads of the group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_spectralquant.format.codec import decode_slots, encode_slots
from vllm_spectralquant.format.paged import SINK_DTYPE
from vllm_spectralquant.format.params import LayerCodec


def roundtrip_kv(k: torch.Tensor, v: torch.Tensor, codec: LayerCodec, sink_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [T, H, D] as the packed cache returns them: decoded codes, exact bf16 sinks."""
    kh, vh = decode_slots(encode_slots(k, v, codec), codec)
    n = min(sink_tokens, k.shape[0])
    kh[:n] = k[:n].to(SINK_DTYPE).float()
    vh[:n] = v[:n].to(SINK_DTYPE).float()
    return kh, vh


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, Hq, D], k, v [T, H, D] (GQA) -> float32 [T, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    qh = q.float().transpose(0, 1)
    kh = k.float().repeat_interleave(g, dim=1).transpose(0, 1)
    vh = v.float().repeat_interleave(g, dim=1).transpose(0, 1)
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    return o.transpose(0, 1)


@dataclass
class FidelityAccumulator:
    """Per-(layer, KV head) sums of squared error, squared reference norm, cosines and counts."""

    num_layers: int
    num_kv_heads: int
    err2: torch.Tensor = field(init=False)
    ref2: torch.Tensor = field(init=False)
    cos: torch.Tensor = field(init=False)
    count: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_kv_heads)
        self.err2, self.ref2, self.cos, self.count = (torch.zeros(shape, dtype=torch.float64) for _ in range(4))

    def add(self, layer: int, ref: torch.Tensor, got: torch.Tensor) -> None:
        """ref, got: [T, Hq, D] attention outputs of one window."""
        t, hq, d = ref.shape
        h = self.num_kv_heads
        r, o = ref.double().reshape(t, h, hq // h, d), got.double().reshape(t, h, hq // h, d)
        self.err2[layer] += ((o - r) ** 2).sum((0, 2, 3))
        self.ref2[layer] += (r**2).sum((0, 2, 3))
        self.cos[layer] += torch.nn.functional.cosine_similarity(o, r, dim=-1).sum((0, 2))
        self.count[layer] += t * (hq // h)

    def rel_err(self) -> torch.Tensor:
        """[L, H] relative error of the attention output."""
        return (self.err2 / self.ref2.clamp(min=1e-300)).sqrt()

    def mean_cos(self) -> torch.Tensor:
        return self.cos / self.count.clamp(min=1)
