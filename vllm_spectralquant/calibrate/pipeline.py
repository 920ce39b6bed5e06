"""Statistics of a whole model -> bases, codebook tables and per-preset codecs (the calibration fit).

The collection passes (:mod:`collect`) may run in one process or be sharded over Ray workers and
merged; this module only turns merged statistics into parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vllm_spectralquant.calibrate.collect import AttentionShape, collect
from vllm_spectralquant.calibrate.fit import LayerBasis, LayerCodebooks, fit_basis, fit_codebooks, fit_codec
from vllm_spectralquant.calibrate.stats import ModelStats
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.format.presets import Preset


@dataclass(frozen=True)
class ModelFit:
    shape: AttentionShape
    bases: list[LayerBasis]
    codebooks: list[LayerCodebooks]
    codecs: dict[str, list[LayerCodec]]  # preset name -> one codec per layer


def fit_bases(stats: ModelStats, shape: AttentionShape) -> list[LayerBasis]:
    return [fit_basis(layer, shape.softmax_scale) for layer in stats.layers]


def fit_model(
    bases: list[LayerBasis], histograms: ModelStats | None, shape: AttentionShape, presets: Sequence[Preset]
) -> ModelFit:
    """Codebooks (fitted to the pass-2 histograms, or Gaussian without them) and a codec per preset."""
    hists = histograms.histograms if histograms is not None else [None] * len(bases)
    tables = fit_codebooks(list(hists), shape.num_kv_heads, shape.head_dim)
    codecs = {
        p.name: [fit_codec(b, t, p) for b, t in zip(bases, tables)] for p in presets if p.method == "spectralquant"
    }
    return ModelFit(shape, bases, tables, codecs)


def calibrate_in_process(
    model: torch.nn.Module,
    windows: torch.Tensor,
    presets: Sequence[Preset],
    *,
    position_offsets: Sequence[int] | None = None,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> tuple[ModelFit, ModelStats]:
    """Both passes in this process; returns the fit and the first-pass statistics."""
    shape = AttentionShape.from_config(model.config)
    first = collect(model, windows, position_offsets=position_offsets, batch_size=batch_size, progress=progress)
    bases = fit_bases(first, shape)
    second = collect(model, windows, bases=bases, position_offsets=position_offsets, batch_size=batch_size, progress=progress)
    return fit_model(bases, second, shape, presets), first
