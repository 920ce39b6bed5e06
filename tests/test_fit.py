"""Fitting SpectralQuant parameters: statistics, PCA, codebooks, bit allocation, whole codecs."""

import itertools

import pytest
import torch

from vllm_spectralquant.calibrate.allocation import allocate_bits, expected_error
from vllm_spectralquant.calibrate.basis import dims_for_variance, effective_dims, participation_ratio
from vllm_spectralquant.calibrate.codebook_fit import fit_levels, fit_table
from vllm_spectralquant.calibrate.fit import fit_codecs_from_samples
from vllm_spectralquant.calibrate.stats import LayerStats, MomentStats, hist_centers
from vllm_spectralquant.fidelity import FidelityAccumulator, causal_attention, roundtrip_kv
from vllm_spectralquant.format import PRESETS, turboquant_codec
from vllm_spectralquant.format.codebooks import gaussian_lloyd_max


def test_moment_stats_merge_is_exact():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, 8, generator=gen, dtype=torch.float64)
    whole = MomentStats.zeros(2, 8)
    whole.update(x)
    a, b = MomentStats.zeros(2, 8), MomentStats.zeros(2, 8)
    a.update(x[:123])
    b.update(x[123:])
    merged = a.merge(b)
    assert merged.count == 300
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=0, atol=1e-12)
    # And it is the covariance numpy-style.
    ref = torch.stack([torch.cov(x[:, h].T, correction=0) for h in range(2)])
    torch.testing.assert_close(whole.covariance(), ref, rtol=1e-10, atol=1e-12)


def test_query_moments_are_summed_over_the_group():
    q = torch.randn(50, 6, 4, dtype=torch.float64)
    stats = LayerStats.zeros(2, 4, 3)
    stats.update(q, torch.randn(50, 2, 4), torch.randn(50, 2, 4))
    want = torch.einsum("nhgd,nhge->hde", q.view(50, 2, 3, 4), q.view(50, 2, 3, 4)) / 50
    torch.testing.assert_close(stats.query.second_moment(), want)


def test_effective_dims():
    eig = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert participation_ratio(eig).tolist() == pytest.approx([100 / 30, 1.0])
    # Cumulative variance 0.4, 0.7, 0.9, 1.0: three dims hold exactly 90 %.
    assert dims_for_variance(eig, 0.9).tolist() == [3, 1]
    assert dims_for_variance(eig, 0.95).tolist() == [4, 1]
    assert dims_for_variance(eig, 0.7).tolist() == [2, 1]
    assert set(effective_dims(eig)) == {"participation_ratio", "dims_90", "dims_95", "dims_99"}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_histogram_lloyd_max_recovers_gaussian(bits):
    centers = hist_centers()
    weights = torch.exp(-0.5 * centers**2)[None]
    levels, mse = fit_levels(centers, weights, bits)
    theory_levels, theory_mse = gaussian_lloyd_max(bits)
    assert mse.item() == pytest.approx(theory_mse, rel=0.01)
    torch.testing.assert_close(levels[0], torch.from_numpy(theory_levels), atol=0.01, rtol=0)


def test_fitted_codebooks_beat_gaussian_on_skewed_data():
    torch.manual_seed(0)
    x = torch.distributions.Gamma(2.0, 1.0).sample((200000,))
    u = ((x - x.mean()) / x.std()).double()
    hist = torch.histc(u, 4096, -16, 16)[None]
    table = fit_table(hist_centers(), hist)
    for b in (2, 3):
        # MSE of the N(0,1) Lloyd-Max levels applied to this skewed data.
        levels = torch.from_numpy(gaussian_lloyd_max(b)[0])
        nearest = levels[(u[:, None] - levels[None]).abs().argmin(-1)]
        gaussian_mse = ((u - nearest) ** 2).mean().item()
        assert table.mse[0, b].item() < 0.9 * gaussian_mse
    assert (table.mse[0, 1:] <= table.mse[0, :-1] + 1e-9).all()  # more bits never hurt


def test_allocation_is_optimal_on_small_problems():
    gen = torch.Generator().manual_seed(1)
    dist = torch.tensor([gaussian_lloyd_max(b)[1] for b in range(9)], dtype=torch.float64)
    for _ in range(5):
        w = torch.rand(4, generator=gen, dtype=torch.float64) ** 3
        budget = int(torch.randint(2, 14, (1,), generator=gen))
        bits = allocate_bits(w, dist.expand(4, -1), budget)
        assert int(bits.sum()) == budget
        best = min(
            (c for c in itertools.product(range(9), repeat=4) if sum(c) == budget),
            key=lambda c: sum(float(w[i]) * float(dist[b]) for i, b in enumerate(c)),
        )
        got = expected_error(w, dist.expand(4, -1), bits).item()
        assert got == pytest.approx(expected_error(w, dist.expand(4, -1), torch.tensor(best)).item(), rel=1e-12)


def _anisotropic(gen, n, h, d, scale=1.0):
    mix = torch.randn(h, d, d, generator=gen) * torch.logspace(0, -1.5, d)[None, None, :]
    z = torch.randn(n, h, d, generator=gen)
    return (torch.einsum("nhd,hed->nhe", z, mix) + 0.7) * scale


def test_fitted_codec_beats_turboquant_layout_on_anisotropic_data():
    """Calibrated bases + allocation beat the TQ layout at equal bytes on low-rank, offset data."""
    gen = torch.Generator().manual_seed(3)
    h, d, g, t = 2, 64, 3, 128
    k = _anisotropic(gen, 4 * t, h, d, 2.0).view(4, t, h, d)
    v = _anisotropic(gen, 4 * t, h, d).view(4, t, h, d)
    q = torch.randn(4, t, h * g, d, generator=gen)
    codecs = fit_codecs_from_samples([(q[:3], k[:3], v[:3])], list(PRESETS.values()), d**-0.5)[0]
    for tier in ("2_5bit", "3bit", "4bit"):
        errs = {}
        for name, codec in (("sq", codecs[f"sq{tier}"]), ("tq", turboquant_codec(PRESETS[f"tq{tier}"], d, h))):
            acc = FidelityAccumulator(1, h)
            ref = causal_attention(q[3], k[3], v[3], d**-0.5)
            kh, vh = roundtrip_kv(k[3], v[3], codec, sink_tokens=1)
            acc.add(0, ref, causal_attention(q[3], kh, vh, d**-0.5))
            errs[name] = acc.rel_err().mean().item()
        assert errs["sq"] < 0.5 * errs["tq"], (tier, errs)
        used = codecs[f"sq{tier}"].key.code_bytes + codecs[f"sq{tier}"].value.code_bytes
        assert (used == PRESETS[f"sq{tier}"].data_bytes(d)).all()  # the whole budget is spent


def test_layer_budgets_go_where_the_error_falls_most():
    from vllm_spectralquant.calibrate.allocation import allocate_layer_budgets, error_curve

    gen = torch.Generator().manual_seed(0)
    table = torch.stack([torch.tensor([1.0] + [4.0**-b for b in range(1, 9)]) for _ in range(8)])
    weights = torch.rand(8, generator=gen) + 0.5
    curve = error_curve(weights, table, 40)
    # The curve is the greedy allocation's error at every budget.
    for b in (0, 7, 23, 40):
        assert float(curve[b]) == pytest.approx(float(expected_error(weights, table, allocate_bits(weights, table, b))))
    # Three layers; the second's error counts 10x (a concentrated attention): it gets the most bytes.
    curves = [curve, 10 * curve, curve]
    budgets = allocate_layer_budgets(curves, 20, 15, 40)
    assert sum(budgets) == 60 and budgets[1] == max(budgets) and abs(budgets[0] - budgets[2]) <= 1 and min(budgets) >= 15
    # Equal curves: every layer keeps the mean.
    assert allocate_layer_budgets([curve] * 3, 20, 10, 40) == [20, 20, 20]
    with pytest.raises(Exception, match="outside the layer bounds"):
        allocate_layer_budgets(curves, 50, 15, 40)


def test_attention_profile_counts_what_the_codes_carry():
    """The error scale counts attention on coded keys only: the calibrated exact sinks are taken out."""
    from vllm_spectralquant.calibrate.stats import AttentionProfile

    t, d = 64, 8
    q = torch.zeros(1, t, 2, d)
    k = torch.randn(1, t, 1, d)
    v = torch.randn(1, t, 1, d)
    prof = AttentionProfile.zeros(1, d)
    prof.update(q, k, v, 1.0)  # zero queries: uniform attention over 0..i
    first = AttentionProfile.FIRST_QUERY
    for sinks in (0, 1, 2):
        # query i: i + 1 keys of weight 1/(i+1), of which i + 1 - sinks are coded; 2 query heads
        want = sum((i + 1 - sinks) / (i + 1) ** 2 for i in range(first, t)) * 2
        assert float(prof.coded_concentration(sinks)[0]) == pytest.approx(want, rel=1e-5)
        assert float(prof.error_scale(sinks)[0]) > 0
    assert prof.queries == 2 * (t - first)
    merged = prof.merge(prof)
    assert float(merged.coded_concentration(1)[0]) == pytest.approx(2 * float(prof.coded_concentration(1)[0]), rel=1e-5)
    assert merged.queries == 2 * prof.queries
    with pytest.raises(ValueError, match="sink_tokens"):
        prof.error_scale(AttentionProfile.LEADING + 1)
