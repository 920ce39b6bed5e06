"""From calibration statistics to codec parameters.

Two stages, as in the calibration job:

1. :func:`fit_basis` (first-pass statistics -> :class:`LayerBasis`, preset-independent): centered PCA of
   keys and of values, per-coordinate sigma, and the importance weight of every coordinate (see
   ``allocation.py``). Key basis columns are ordered by importance (eigenvalue x query energy), value
   columns by eigenvalue, so a group holds 8 coordinates of similar importance.
2. :func:`fit_codec` (basis + codebook tables -> :class:`LayerCodec` for one preset): water-filling
   of the preset's byte budget over K and V groups, then each group's codebook at its bit width.

Between them, the second pass histograms the normalised coordinates (:func:`normalized_coordinates`)
so codebooks fit the real distribution (:mod:`codebook_fit`); without it, Gaussian Lloyd-Max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_spectralquant.calibrate.anchor import anchor_mean
from vllm_spectralquant.calibrate.allocation import allocate_bits, allocate_layer_budgets, error_curve
from vllm_spectralquant.calibrate.basis import Spectrum, sigma_from_variance, spectrum
from vllm_spectralquant.calibrate.codebook_fit import CodebookTable, fit_table, gaussian_table
from vllm_spectralquant.calibrate.stats import LayerHistograms, LayerStats, add_to_histogram, hist_centers
from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import GROUP_SIZE, MAX_BITS, Preset, TokenScale


@dataclass(frozen=True)
class ComponentBasis:
    """Rotation of one component for all KV heads (float64)."""

    mean: torch.Tensor  # [H, D]
    basis: torch.Tensor  # [H, D, D], columns ordered by importance
    sigma: torch.Tensor  # [H, D] per rotated coordinate
    weight: torch.Tensor  # [H, D] importance of each rotated coordinate (allocation units)
    spectrum: Spectrum  # eigenvalues descending (for reports)


@dataclass(frozen=True)
class LayerBasis:
    key: ComponentBasis
    value: ComponentBasis
    #: float64 [H]: relative attention-output error per unit of the cost model's error
    #: (``AttentionProfile.error_scale``); zeros when the attention was not profiled.
    error_scale: torch.Tensor
    #: float64 [H, D] / bool [H]: the value the head's coded attention sinks carry and whether it has
    #: any (``AttentionProfile.sink_value``); None when the attention was not profiled.
    sink_value: torch.Tensor | None = None
    sink_found: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.key.mean.shape[0]

    @property
    def head_dim(self) -> int:
        return self.key.mean.shape[1]


def fit_basis(stats: LayerStats, softmax_scale: float, sink_tokens: int = 1) -> LayerBasis:
    """PCA bases, sigmas and importance weights from first-pass statistics.

    ``sink_tokens``: the leading tokens served exactly (manifest ``sinks.tokens``), whose attention the
    error scale leaves out.
    """
    if stats.key.count < 2:
        raise FormatError(f"need at least 2 calibration tokens, got {stats.key.count}")
    k_spec = spectrum(stats.key.covariance())
    v_spec = spectrum(stats.value.covariance())
    g = stats.num_queries_per_kv
    q_moment = stats.query.second_moment()  # [H, D, D], summed over the group's query heads
    q_energy = torch.einsum("hdi,hde,hei->hi", k_spec.eigvecs, q_moment, k_spec.eigvecs)
    value_spread = v_spec.eigvals.sum(-1)  # tr(Cov_V) per head
    k_weight = softmax_scale**2 * value_spread[:, None] * q_energy * k_spec.eigvals
    v_weight = g * v_spec.eigvals

    def component(stats_mean: torch.Tensor, spec: Spectrum, weight: torch.Tensor) -> ComponentBasis:
        order = torch.argsort(weight, dim=-1, descending=True, stable=True)
        basis = torch.gather(spec.eigvecs, 2, order[:, None, :].expand_as(spec.eigvecs))
        variance = torch.gather(spec.eigvals, 1, order)
        return ComponentBasis(
            mean=stats_mean,
            basis=basis,
            sigma=sigma_from_variance(variance),
            weight=torch.gather(weight, 1, order),
            spectrum=spec,
        )

    sink_value, sink_found = stats.attention.sink_value(sink_tokens)
    return LayerBasis(
        component(stats.key.mean(), k_spec, k_weight),
        component(stats.value.mean(), v_spec, v_weight),
        stats.attention.error_scale(sink_tokens),
        sink_value,
        sink_found,
    )


def normalized_coordinates(comp: ComponentBasis, x: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] -> sigma-normalised rotated coordinates [N, H, D] (float64)."""
    x = x.detach().to(device="cpu", dtype=torch.float64)
    return torch.einsum("nhd,hde->nhe", x - comp.mean, comp.basis) / comp.sigma


def update_histograms(hist: LayerHistograms, basis: LayerBasis, k: torch.Tensor, v: torch.Tensor) -> None:
    """Second pass: count the normalised coordinates of keys k and values v [N, H, D]."""
    add_to_histogram(hist.key, normalized_coordinates(basis.key, k))
    add_to_histogram(hist.value, normalized_coordinates(basis.value, v))


@dataclass(frozen=True)
class LayerCodebooks:
    """Fitted (or Gaussian) codebooks of every group at every width: [H, G] tables."""

    key: CodebookTable
    value: CodebookTable


def fit_codebooks(hists: list[LayerHistograms | None], num_kv_heads: int, head_dim: int) -> list[LayerCodebooks]:
    """Codebook tables of many layers, fitted in one batch (much faster than layer by layer).

    A layer without histograms (None) gets Gaussian Lloyd-Max tables.
    """
    g = head_dim // GROUP_SIZE
    fitted = [h for h in hists if h is not None]
    tables: list[CodebookTable] = []
    if fitted:
        stacked = torch.stack([torch.stack([h.key, h.value]) for h in fitted])  # [L, 2, H, G, NB]
        big = fit_table(hist_centers(), stacked)
        tables = [CodebookTable(big.levels[i, c], big.mse[i, c]) for i in range(len(fitted)) for c in (0, 1)]
    out, it = [], iter(tables)
    for h in hists:
        if h is None:
            out.append(LayerCodebooks(gaussian_table((num_kv_heads, g)), gaussian_table((num_kv_heads, g))))
        else:
            out.append(LayerCodebooks(next(it), next(it)))
    return out


def group_weights(weight: torch.Tensor) -> torch.Tensor:
    """Per-coordinate weights [H, D] -> per-group sums [H, G]."""
    h, d = weight.shape
    return weight.reshape(h, d // GROUP_SIZE, GROUP_SIZE).sum(-1)


#: Keys' importance relative to the cost model. Measured on SmolLM2-135M (held-out perplexity with every
#: position quantised, sq2_5bit): 1.0 -> +23.3 %, 0.5 -> +18.8 %, 0.25 -> +18.7 %, 0.1 -> +33.7 %; the cost
#: model overweights key errors by about 2x. Choosing it per layer by attention-output error did worse (+20 %).
DEFAULT_KEY_WEIGHT = 0.5


def _head_allocation_inputs(basis: LayerBasis, codebooks: LayerCodebooks, key_weight_scale: float):
    """Per KV head: (group weights [2G], distortion [2G, MAX_BITS + 1]), keys then values."""
    kw = group_weights(basis.key.weight) * key_weight_scale
    vw = group_weights(basis.value.weight)
    return [
        (torch.cat([kw[head], vw[head]]), torch.cat([codebooks.key.mse[head], codebooks.value.mse[head]]))
        for head in range(basis.num_kv_heads)
    ]


def layer_error_curve(
    basis: LayerBasis, codebooks: LayerCodebooks, max_budget: int, key_weight_scale: float = DEFAULT_KEY_WEIGHT
) -> torch.Tensor:
    """float64 [max_budget + 1]: the layer's relative attention-output error at each slot budget (code bytes),
    summed over its KV heads; comparable between layers (``LayerBasis.error_scale``)."""
    curves = [error_curve(w, dist, max_budget) for w, dist in _head_allocation_inputs(basis, codebooks, key_weight_scale)]
    return (torch.stack(curves) * basis.error_scale[:, None]).sum(0)


#: Layer budgets stay within these multiples of the preset's mean. The floor is measured: with 0.5,
#: SmolLM2's sq2_5bit and sq3bit gave layer 0 and the late layers ~0.6x and lost the 4k needle at depth
#: 0.25 (the profile comes from 512-token windows, where long-range retrieval barely shows).
LAYER_BUDGET_RANGE = (0.75, 2.0)


def layer_budgets(
    bases: list[LayerBasis], tables: list[LayerCodebooks], preset: Preset, key_weight_scale: float = DEFAULT_KEY_WEIGHT
) -> list[int]:
    """Code bytes per head-token of every layer, the preset's on average, where the relative
    attention-output error falls most (the statistics must include the attention profile)."""
    if not bases or any(float(b.error_scale.sum()) <= 0 for b in bases):
        raise FormatError("layer budgets need the attention profile of every layer (collect with profile_attention)")
    d = bases[0].head_dim
    mean = preset.data_bytes(d)
    lo = math.ceil(mean * LAYER_BUDGET_RANGE[0])
    hi = min(math.floor(mean * LAYER_BUDGET_RANGE[1]), 2 * d * MAX_BITS // GROUP_SIZE)
    curves = [layer_error_curve(b, t, hi, key_weight_scale) for b, t in zip(bases, tables)]
    return allocate_layer_budgets(curves, mean, lo, hi)


def fit_codec(
    basis: LayerBasis,
    codebooks: LayerCodebooks,
    preset: Preset,
    key_weight_scale: float = DEFAULT_KEY_WEIGHT,
    data_bytes: int | None = None,
    anchor_sinks: bool = True,
    key_gain: float = 1.0,
) -> LayerCodec:
    """The SpectralQuant codec of one layer for ``preset``.

    ``key_weight_scale`` multiplies the keys' importance against the values' (1 = the cost model).
    ``data_bytes``: this layer's own code bytes per head-token (:func:`layer_budgets`); None: the preset's.
    ``anchor_sinks``: shift the value mean so the sinks' value codes exactly (``anchor.py``), where the
    attention profile found sinks.
    ``key_gain``: the packed keys' decode-only gain (1: none; calibrate/key_gain.py chooses one).
    """
    if preset.method != "spectralquant":
        raise FormatError(f"fit_codec fits SpectralQuant presets; {preset.name} is {preset.method}")
    h, d = basis.num_kv_heads, basis.head_dim
    g = d // GROUP_SIZE
    budget = preset.data_bytes(d) if data_bytes is None else data_bytes
    k_bits = torch.zeros(h, g, dtype=torch.int32)
    v_bits = torch.zeros(h, g, dtype=torch.int32)
    for head, (weights, dist) in enumerate(_head_allocation_inputs(basis, codebooks, key_weight_scale)):
        bits = allocate_bits(weights, dist, budget)
        k_bits[head], v_bits[head] = bits[:g], bits[g:]

    def component(cb: ComponentBasis, table: CodebookTable, bits: torch.Tensor) -> ComponentCodec:
        return ComponentCodec(
            basis=cb.basis.float(),
            mean=cb.mean.float(),
            scale=cb.sigma.float(),
            bits=bits,
            codebooks=table.select(bits).float(),
            token_scale=TokenScale.NONE,
        )

    value = component(basis.value, codebooks.value, v_bits)
    if anchor_sinks and basis.sink_found is not None and bool(basis.sink_found.any()):
        # Values only: keys carry RoPE, so a sink's key differs with its position.
        value = anchor_mean(value, basis.sink_value, basis.sink_found)
    key = component(basis.key, codebooks.key, k_bits).with_gain(key_gain)
    slot = None if data_bytes is None else data_bytes + preset.meta_bytes
    return LayerCodec(preset, key, value, slot).validate()


def fit_codecs_from_samples(
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    presets: list[Preset],
    softmax_scale: float,
    *,
    fitted_codebooks: bool = True,
    skip_first: int = 1,
) -> list[dict[str, LayerCodec]]:
    """Fit every layer from in-memory samples: per layer, windows q [W, T, Hq, D], k, v [W, T, H, D].

    The first ``skip_first`` tokens of every window are left out: they are attention sinks, which
    the cache stores exactly. Returns, per layer, {preset name: LayerCodec}.
    """
    bases, hists = [], []
    for q, k, v in samples:
        q, k, v = (x[:, skip_first:].reshape(-1, *x.shape[2:]) for x in (q, k, v))
        h, d = k.shape[1], k.shape[2]
        stats = LayerStats.zeros(h, d, q.shape[1] // h)
        stats.update(q, k, v)
        basis = fit_basis(stats, softmax_scale)
        hist = None
        if fitted_codebooks:
            hist = LayerHistograms.zeros(h, d)
            update_histograms(hist, basis, k, v)
        bases.append(basis)
        hists.append(hist)
    tables = fit_codebooks(hists, bases[0].num_kv_heads, bases[0].head_dim) if bases else []
    return [
        {p.name: fit_codec(basis, tab, p) for p in presets if p.method == "spectralquant"}
        for basis, tab in zip(bases, tables)
    ]
