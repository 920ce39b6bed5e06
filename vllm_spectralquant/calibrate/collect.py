"""Run a model over token windows and accumulate calibration statistics from its post-RoPE Q/K/V.

Pass 1 (``bases=None``) accumulates :class:`LayerStats`; pass 2 (``bases`` given) accumulates
:class:`LayerHistograms` of the normalised coordinates in those bases. The first ``skip_first``
tokens of every window are left out of both: they are attention sinks, stored exactly by the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vllm_spectralquant.calibrate.fit import LayerBasis, update_histograms
from vllm_spectralquant.calibrate.stats import LayerHistograms, LayerStats, ModelStats
from vllm_spectralquant.models.capture import run_with_capture


@dataclass(frozen=True)
class AttentionShape:
    """What calibration needs to know of a model's attention layers."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> AttentionShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5


def collect(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    bases: Sequence[LayerBasis] | None = None,
    position_offsets: Sequence[int] | None = None,
    batch_size: int = 4,
    skip_first: int = 1,
    progress: Callable[[int], None] | None = None,
) -> ModelStats:
    """Accumulate statistics over token windows.

    Args:
        windows: int64 [N, T] token ids.
        bases: per-layer bases for the second pass (histograms); None for the first pass.
        position_offsets: per window, the position of its first token (default 0): RoPE is relative,
            so a window run at positions p..p+T-1 gives the hidden states of position 0..T-1 but keys
            rotated as at long positions.
        progress: called with the number of tokens after each batch.
    """
    shape = AttentionShape.from_config(model.config)
    n, t = windows.shape
    g = shape.num_heads // shape.num_kv_heads
    layers = [LayerStats.zeros(shape.num_kv_heads, shape.head_dim, g) for _ in range(shape.num_layers)]
    hists = None if bases is None else [LayerHistograms.zeros(shape.num_kv_heads, shape.head_dim) for _ in range(shape.num_layers)]
    offsets = torch.as_tensor(list(position_offsets) if position_offsets is not None else [0] * n, dtype=torch.long)

    def on_qkv(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        q, k, v = (x[:, skip_first:].reshape(-1, *x.shape[2:]) for x in (q, k, v))
        if hists is None:
            layers[layer].update(q, k, v)
        else:
            update_histograms(hists[layer], bases[layer], k, v)

    tokens = 0
    for start in range(0, n, batch_size):
        ids = windows[start : start + batch_size]
        pos = offsets[start : start + batch_size, None] + torch.arange(t)[None, :]
        run_with_capture(model, ids, on_qkv, position_ids=pos)
        tokens += ids.numel()
        if progress is not None:
            progress(tokens)
    return ModelStats(layers if bases is None else [], hists, tokens)
