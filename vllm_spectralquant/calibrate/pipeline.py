"""Merged statistics of a whole model -> bases, codebook tables and per-preset codecs (the fit).

Collection (:mod:`collect`) may run in one process or on Ray workers; this module only turns merged
statistics into parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from vllm_spectralquant.calibrate.collect import ModelStats, collect_batch, histograms_from_samples
from vllm_spectralquant.calibrate.fit import (
    DEFAULT_KEY_WEIGHT,
    LayerBasis,
    LayerCodebooks,
    fit_basis,
    fit_codebooks,
    fit_codec,
    layer_budgets,
)
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.format.presets import Preset
from vllm_spectralquant.models.shape import ModelShape


@dataclass(frozen=True)
class ModelFit:
    shape: ModelShape
    bases: list[LayerBasis]
    codebooks: list[LayerCodebooks]
    codecs: dict[str, list[LayerCodec]]  # preset name -> one codec per layer


def fit_model(
    stats: ModelStats,
    shape: ModelShape,
    presets: Sequence[Preset],
    *,
    fitted_codebooks: bool = True,
    key_weight_scale: float = DEFAULT_KEY_WEIGHT,
    key_gain: float = 1.0,
    layer_budget_presets: Collection[str] = (),
    sink_tokens: int = 1,
) -> ModelFit:
    """Bases from the moments, codebooks fitted to the sampled tokens (or Gaussian), a codec per preset.

    The presets named in ``layer_budget_presets`` have their bytes spread over the layers by the measured
    attention error (:func:`layer_budgets`; the preset's size is then the mean); every layer of the
    others gets the preset's bytes.
    ``key_gain``: every preset's key decode gain (1: none; calibrate/key_gain.py chooses one per preset).
    ``sink_tokens``: the leading tokens the cache keeps exact (the calibrated sink count), whose
    attention that error leaves out.
    """
    bases = [fit_basis(layer, shape.softmax_scale, sink_tokens) for layer in stats.layers]
    hists = histograms_from_samples(bases, stats.samples) if fitted_codebooks else [None] * len(bases)
    tables = fit_codebooks(hists, shape.num_kv_heads, shape.head_dim)
    codecs = {}
    for p in presets:
        if p.method != "spectralquant":
            continue
        budgets = layer_budgets(bases, tables, p, key_weight_scale) if p.name in layer_budget_presets else None  # None: uniform
        codecs[p.name] = [
            fit_codec(b, t, p, key_weight_scale, None if budgets is None else budgets[i], key_gain=key_gain)
            for i, (b, t) in enumerate(zip(bases, tables))
        ]
    return ModelFit(shape, bases, tables, codecs)


def collect_in_process(
    model: torch.nn.Module,
    windows: torch.Tensor,
    position_offsets: Sequence[int],
    *,
    batch_size: int = 4,
    sample_stride: int = 8,
    skip_first: int = 1,
    profile_attention: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ModelStats:
    """Collect over all windows [N, T] in this process, merging batches in order."""
    total: ModelStats | None = None
    for start in range(0, windows.shape[0], batch_size):
        ids = list(range(start, min(start + batch_size, windows.shape[0])))
        batch = collect_batch(
            model, windows[ids], ids, [position_offsets[i] for i in ids], skip_first=skip_first, sample_stride=sample_stride,
            profile_attention=profile_attention,
        )  # fmt: skip
        total = batch if total is None else total.merge(batch)
        if progress is not None:
            progress(batch.tokens)
    assert total is not None, "no windows"
    return total
