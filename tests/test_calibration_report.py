"""The calibration report: markdown content, d_eff numbers against hand computation, valid PNGs."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_spectralquant.calibrate.report import (
    PresetReport,
    ReportData,
    dims_for_fraction,
    participation_ratio,
    write_report,
)

LAYERS, KV_HEADS, HEAD_DIM = 4, 3, 64
GROUPS = HEAD_DIM // 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _random_spectra(gen: torch.Generator) -> torch.Tensor:
    """float64 [L, H, D] descending, decaying eigenvalues."""
    decay = torch.exp(-torch.arange(HEAD_DIM, dtype=torch.float64) / 8)
    noise = torch.rand(LAYERS, KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64) + 0.5
    return (decay * noise).sort(-1, descending=True).values


def _preset(name: str, mean_bits: int, gen: torch.Generator, key_mse: torch.Tensor) -> PresetReport:
    ramp = torch.linspace(2, -2, GROUPS).round().long()  # more bits for the leading groups
    bits = (mean_bits + ramp).clamp(0, 8).expand(LAYERS, KV_HEADS, GROUPS).clone()
    return PresetReport(
        name=name,
        slot_bytes=2 * GROUPS * mean_bits + 8,
        compression_vs_bf16=4 * HEAD_DIM / (2 * GROUPS * mean_bits + 8),
        key_bits=bits,
        value_bits=(bits - 1).clamp(min=0),
        key_rel_mse=key_mse,
        value_rel_mse=torch.full((LAYERS, KV_HEADS), 0.02) * (1 + 0.1 * torch.rand(LAYERS, KV_HEADS, generator=gen)),
    )


def _report_data(key_mse: torch.Tensor | None = None) -> ReportData:
    gen = torch.Generator().manual_seed(0)
    key_eigvals = _random_spectra(gen)
    key_eigvals[0] = 1.0  # layer 0: flat spectrum, PR = D and dims95 = ceil(0.95 D) by hand
    if key_mse is None:
        key_mse = torch.full((LAYERS, KV_HEADS), 0.01)
    return ReportData(
        model_name="tiny-test/Llama-Synthetic",
        num_layers=LAYERS,
        num_heads=6,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        tokens=65536,
        corpus="lee_background",
        max_position=4096,
        seconds={"forward": 12.5, "statistics": 3.25, "fit": 1.5, "total": 17.25},
        key_eigvals=key_eigvals,
        value_eigvals=_random_spectra(gen),
        key_mean_energy=torch.rand(LAYERS, KV_HEADS, generator=gen, dtype=torch.float64) * 0.5,
        value_mean_energy=torch.rand(LAYERS, KV_HEADS, generator=gen, dtype=torch.float64) * 0.1,
        presets=[_preset("sq3bit", 3, gen, key_mse), _preset("sq4bit", 4, gen, key_mse / 2)],
    )


def _layer_row(report: str, layer: int) -> str:
    rows = [line for line in report.splitlines() if line.startswith(f"| {layer} |")]
    assert len(rows) == 1, rows
    return rows[0]


def test_effective_dims_by_hand():
    flat = torch.ones(HEAD_DIM, dtype=torch.float64)
    assert participation_ratio(flat).item() == pytest.approx(HEAD_DIM)
    assert dims_for_fraction(flat, 0.95).item() == math.ceil(0.95 * HEAD_DIM)
    assert dims_for_fraction(torch.ones(100, dtype=torch.float64), 0.95).item() == 95  # exact share, no rounding loss
    # Two equal directions and zeros: PR 2, and both are needed for 90 %.
    two = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert participation_ratio(two).item() == pytest.approx(2.0)
    assert dims_for_fraction(two, 0.90).item() == 2
    geometric = 0.5 ** torch.arange(10, dtype=torch.float64)
    expected_pr = geometric.sum().item() ** 2 / (geometric**2).sum().item()
    assert participation_ratio(geometric).item() == pytest.approx(expected_pr)
    assert dims_for_fraction(geometric, 0.99).item() == 7  # 1 - 2^-7 / (1 - 2^-10) > 0.99 first at k = 7


def test_report_files_and_content(tmp_path):
    data = _report_data()
    written = write_report(tmp_path, data)
    names = {p.name for p in written}
    assert names == {"report.md", "spectra.png", "deff_heatmap.png", "bits.png"}
    assert all(p.parent == tmp_path for p in written)
    assert not list(tmp_path.glob(".*.tmp"))  # temp files were renamed away

    for png in ("spectra.png", "deff_heatmap.png", "bits.png"):
        payload = (tmp_path / png).read_bytes()
        assert payload.startswith(PNG_MAGIC), png
        assert 5_000 < len(payload) < 200_000, (png, len(payload))

    report = (tmp_path / "report.md").read_text()
    assert data.model_name in report
    for name in ("sq3bit", "sq4bit"):
        assert name in report
    for layer in range(LAYERS):
        _layer_row(report, layer)
    for png in ("spectra.png", "deff_heatmap.png", "bits.png"):
        assert f"]({png})" in report  # relative link
    assert "No layer's expected error exceeds" in report

    # Layer 0 keys are flat: PR = D, dims95 = ceil(0.95 D) in every head.
    assert f"| 0 | {HEAD_DIM:.1f} / {math.ceil(0.95 * HEAD_DIM):.1f} |" in report
    # Other layers match the helpers' numbers, averaged over heads.
    pr = participation_ratio(data.value_eigvals[2]).mean().item()
    dims95 = dims_for_fraction(data.value_eigvals[2], 0.95).double().mean().item()
    assert f"{pr:.1f} / {dims95:.1f}" in _layer_row(report, 2).split(" | ")[2]
    # Compact bits: sq3bit keys get 3 + ramp per group, values one less.
    ramp = torch.linspace(2, -2, GROUPS).round().long()
    key_bits = ",".join(str(b) for b in (3 + ramp).clamp(0, 8).tolist())
    value_bits = ",".join(str(b) for b in (2 + ramp).clamp(0, 8).tolist())
    assert f"`K {key_bits} \\| V {value_bits}`" in _layer_row(report, 1)


def test_report_flags_layer_with_large_error(tmp_path):
    key_mse = torch.full((LAYERS, KV_HEADS), 0.01)
    key_mse[2] = 0.05  # 5x the others; model mean 0.02, so layer 2 is 2.5x the mean
    write_report(tmp_path, _report_data(key_mse))
    report = (tmp_path / "report.md").read_text()
    assert "**Flagged**" in report
    assert "sq3bit K: layer 2 (2.5x)" in report
    assert "sq4bit K: layer 2 (2.5x)" in report
    assert "layer 1 " not in report.split("**Flagged**")[1].split("\n")[0]


def test_report_rejects_mismatched_shapes(tmp_path):
    data = _report_data()
    bad = ReportData(**{**data.__dict__, "key_mean_energy": torch.zeros(LAYERS, KV_HEADS + 1)})
    with pytest.raises(ValueError, match="key_mean_energy"):
        write_report(tmp_path, bad)
