"""Run a model over token windows and accumulate calibration statistics from its post-RoPE Q/K/V.

One forward pass per batch of windows yields that batch's :class:`ModelStats`: float64 moment sums
per layer and KV head, plus a deterministic subsample of raw K/V (tokens whose global index is a
multiple of ``sample_stride``) from which the codebook histograms are built once the bases are
known. Batches are merged in batch order, so the result does not depend on how batches were
spread over workers.

The first ``skip_first`` tokens of every window are left out: they are attention sinks, which the
cache stores exactly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_spectralquant.calibrate.fit import LayerBasis, update_histograms
from vllm_spectralquant.calibrate.sinks import key_outlier_scores
from vllm_spectralquant.calibrate.stats import LayerHistograms, LayerStats
from vllm_spectralquant.models.capture import run_with_capture
from vllm_spectralquant.models.shape import ModelShape


@dataclass
class KVSample:
    """Raw K/V of the subsampled tokens of one layer: float32 [n, H, D] each."""

    key: torch.Tensor
    value: torch.Tensor

    def merge(self, other: KVSample) -> KVSample:
        return KVSample(torch.cat([self.key, other.key]), torch.cat([self.value, other.value]))


@dataclass
class ModelStats:
    """Statistics of every attention layer over some windows; ``merge`` in window order."""

    layers: list[LayerStats]
    samples: list[KVSample]
    tokens: int
    #: float32 [windows, T]: each token's key outlier score, maximised over layers (calibrate/sinks.py).
    key_outliers: torch.Tensor
    forward_seconds: float = 0.0  # model forward (capture included)
    stats_seconds: float = 0.0  # accumulating the sums and samples

    def merge(self, other: ModelStats) -> ModelStats:
        return ModelStats(
            [a.merge(b) for a, b in zip(self.layers, other.layers)],
            [a.merge(b) for a, b in zip(self.samples, other.samples)],
            self.tokens + other.tokens,
            torch.cat([self.key_outliers, other.key_outliers]),
            self.forward_seconds + other.forward_seconds,
            self.stats_seconds + other.stats_seconds,
        )


def collect_batch(
    model: torch.nn.Module,
    windows: torch.Tensor,
    window_ids: Sequence[int],
    position_offsets: Sequence[int],
    *,
    skip_first: int = 1,
    sample_stride: int = 8,
    profile_attention: bool = False,
) -> ModelStats:
    """Statistics of one batch of windows.

    Args:
        windows: int64 [B, T] token ids; window b has global index ``window_ids[b]``.
        position_offsets: position of each window's first token. RoPE is relative, so a window run at
            positions p..p+T-1 has the hidden states of positions 0..T-1 but keys rotated as at p.
        sample_stride: keep raw K/V of tokens whose global index (window_id * T + t) is a multiple.
        profile_attention: also profile each layer's attention (``LayerStats.attention``: the windows'
            attention computed once more per layer), which layer budgets need; off by default.
    """
    shape = ModelShape.from_config(model.config)
    b, t = windows.shape
    g = shape.num_heads // shape.num_kv_heads
    layers = [LayerStats.zeros(shape.num_kv_heads, shape.head_dim, g) for _ in range(shape.num_layers)]
    samples: list[KVSample | None] = [None] * shape.num_layers
    ids = torch.as_tensor(list(window_ids), dtype=torch.long)
    pos_in_window = torch.arange(t)
    use = (pos_in_window >= skip_first)[None, :].expand(b, t)
    keep = use & (((ids[:, None] * t + pos_in_window[None, :]) % sample_stride) == 0)

    stats_seconds = 0.0
    key_outliers = torch.zeros(b, t)

    def on_qkv(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        nonlocal stats_seconds
        t = time.perf_counter()
        layers[layer].update(q[use], k[use], v[use])
        if profile_attention:
            layers[layer].attention.update(q, k, v, shape.softmax_scale)
        samples[layer] = KVSample(k[keep].contiguous(), v[keep].contiguous())
        torch.maximum(key_outliers, key_outlier_scores(k).cpu(), out=key_outliers)
        stats_seconds += time.perf_counter() - t

    positions = torch.as_tensor(list(position_offsets), dtype=torch.long)[:, None] + pos_in_window[None, :]
    started = time.perf_counter()
    run_with_capture(model, windows, on_qkv, position_ids=positions, return_logits=False)
    total = time.perf_counter() - started
    return ModelStats(layers, samples, int(use.sum()), key_outliers, total - stats_seconds, stats_seconds)


def histograms_from_samples(bases: Sequence[LayerBasis], samples: Sequence[KVSample]) -> list[LayerHistograms]:
    """Histograms of the sampled tokens' normalised coordinates in each layer's bases."""
    out = []
    for basis, sample in zip(bases, samples):
        hist = LayerHistograms.zeros(basis.num_kv_heads, basis.head_dim)
        update_histograms(hist, basis, sample.key, sample.value)
        out.append(hist)
    return out
