"""Human report of a calibration run: ``report.md`` plus three PNG plots next to the artifact.

A reader uses it to decide whether calibration went well: how low-rank keys and values are
(participation ratio and dims for 90/95/99 % of the variance, computed here from the eigenvalues),
how each preset spread its bits over layers, groups and K/V, and which layers are expected to be
noticeably worse than the rest.

Plots use ``matplotlib.figure.Figure`` with an explicit Agg canvas, never pyplot, so writing a report
changes no global matplotlib state (backend, current figure) of the process that calls it.
Every file is written to a temporary name in ``out_dir`` and renamed, so a reader never sees a
half-written file; the plots are written before ``report.md``, which links them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vllm_spectralquant.calibrate.sinks import MAX_SINK_TOKENS
from vllm_spectralquant.files import save_figure, write_atomic

#: Coordinates per group; one bit more for a group costs one byte.
GROUP_SIZE = 8
#: Largest bit width of one code (the plot's y range).
MAX_BITS_PER_CODE = 8
#: Variance fractions reported as "dims for x %".
VARIANCE_FRACTIONS = (0.90, 0.95, 0.99)
#: A layer is flagged when its expected error exceeds this multiple of the model mean.
FLAG_FACTOR = 2.0
DPI = 100

SPECTRA_PNG = "spectra.png"
DEFF_HEATMAP_PNG = "deff_heatmap.png"
BITS_PNG = "bits.png"
REPORT_MD = "report.md"


@dataclass(frozen=True)
class PresetReport:
    """Outcome of one preset's bit allocation."""

    name: str  # e.g. "sq3bit"
    slot_bytes: int  # bytes per head-token (the mean over layers when they have their own)
    compression_vs_bf16: float
    key_bits: torch.Tensor  # int [L, H, G]   bits per code of each 8-coordinate group (0..8), G = head_dim // 8
    value_bits: torch.Tensor  # int [L, H, G]
    key_rel_mse: torch.Tensor  # float [L, H]  expected relative MSE of keys (sum_j lambda_j D(b_j) / sum_j lambda_j)
    value_rel_mse: torch.Tensor  # float [L, H]
    layer_slot_bytes: list[int] | None = None  # each layer's slot when calibration spread the bytes
    key_gain: float = 1.0  # the packed keys' decode gain (calibrate/key_gain.py)
    key_gain_choice: str | None = None  # how ``--key-gain auto`` chose it (calibrate/key_gain.py GainChoice.describe)


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows; L layers, H KV heads, D head_dim."""

    model_name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tokens: int  # calibration tokens
    corpus: str  # short description (file name or "lee_background")
    max_position: int
    seconds: dict[str, float]  # timings, e.g. {"forward": .., "statistics": .., "fit": .., "total": ..}
    key_eigvals: torch.Tensor  # float64 [L, H, D], centered-covariance eigenvalues, descending
    value_eigvals: torch.Tensor  # float64 [L, H, D]
    key_mean_energy: torch.Tensor  # float64 [L, H]  |mean|^2 / E|x|^2 (share of the mean in the uncentered energy)
    value_mean_energy: torch.Tensor  # float64 [L, H]
    presets: list[PresetReport]
    sink_tokens: int | None = None  # exact leading tokens the calibration windows call for
    sink_share: list[float] | None = None  # fraction of windows with a sink at position 0, 1, ...
    anchored_heads: int | None = None  # (layer, KV head) pairs whose value mean is sink-anchored


# --- effective dimension ------------------------------------------------------------------------


def participation_ratio(eigvals: torch.Tensor) -> torch.Tensor:
    """(sum l)^2 / sum l^2 over the last axis: float64 [...] from eigenvalues [..., D]; 0 for a zero spectrum."""
    lam = eigvals.to(torch.float64).clamp(min=0)  # eigh can return tiny negatives for rank-deficient data
    return lam.sum(-1) ** 2 / (lam**2).sum(-1).clamp(min=1e-300)


def dims_for_fraction(eigvals: torch.Tensor, fraction: float) -> torch.Tensor:
    """Smallest k whose k leading eigenvalues hold >= ``fraction`` of the variance: int64 [...] from [..., D].

    Eigenvalues must be descending. The small tolerance keeps exact shares such as 95/100 from
    losing to float rounding.
    """
    lam = eigvals.to(torch.float64).clamp(min=0)
    share = lam.cumsum(-1) / lam.sum(-1, keepdim=True).clamp(min=1e-300)
    k = (share < fraction - 1e-12).sum(-1) + 1
    return k.clamp(max=lam.shape[-1])


def bits_per_coordinate(group_bits: torch.Tensor) -> torch.Tensor:
    """Mean bits per coordinate, sum_g bits_g * 8 / head_dim: float64 [...] from group bits [..., G]."""
    return group_bits.to(torch.float64).mean(-1)  # head_dim = 8 G, so the sum over 8 G is the mean


def _save_figure(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, dpi=DPI)


# --- validation ---------------------------------------------------------------------------------


def _check_shapes(data: ReportData) -> None:
    """Fail with a readable message instead of a broadcasting error deep inside a plot."""
    L, H, D = data.num_layers, data.num_kv_heads, data.head_dim
    if D % GROUP_SIZE:
        raise ValueError(f"head_dim {D} is not a multiple of {GROUP_SIZE}")
    expected: list[tuple[str, torch.Tensor, tuple[int, ...]]] = [
        ("key_eigvals", data.key_eigvals, (L, H, D)),
        ("value_eigvals", data.value_eigvals, (L, H, D)),
        ("key_mean_energy", data.key_mean_energy, (L, H)),
        ("value_mean_energy", data.value_mean_energy, (L, H)),
    ]
    for p in data.presets:
        expected += [
            (f"{p.name}.key_bits", p.key_bits, (L, H, D // GROUP_SIZE)),
            (f"{p.name}.value_bits", p.value_bits, (L, H, D // GROUP_SIZE)),
            (f"{p.name}.key_rel_mse", p.key_rel_mse, (L, H)),
            (f"{p.name}.value_rel_mse", p.value_rel_mse, (L, H)),
        ]
    for name, tensor, shape in expected:
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {shape} (layers, kv heads[, dims/groups])"
            )


# --- plots --------------------------------------------------------------------------------------


def _sample_layers(num_layers: int, count: int = 5) -> list[int]:
    """First, a few evenly spaced middle layers, and last (distinct, ascending)."""
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


def _plot_spectra(data: ReportData, path: Path) -> Path:
    """Two panels (keys, values): eigenvalue / sum against component index, mean over heads, log y."""
    layers = _sample_layers(data.num_layers)
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    # 0.9: the top of viridis is too pale on white.
    colours = [colormaps["viridis"](0.9 * i / max(len(layers) - 1, 1)) for i in range(len(layers))]
    x = np.arange(1, data.head_dim + 1)
    for ax, title, eig in zip(axes, ("keys", "values"), (data.key_eigvals, data.value_eigvals)):
        lam = eig.to(torch.float64).clamp(min=0)
        normalised = (lam / lam.sum(-1, keepdim=True).clamp(min=1e-300)).mean(1)  # [L, D]
        for layer, colour in zip(layers, colours):
            # Zero eigenvalues have no place on a log axis; a floor keeps the line continuous.
            y = normalised[layer].clamp(min=1e-12).numpy()
            ax.plot(x, y, color=colour, lw=1.3, label=f"layer {layer}")
        ax.set_yscale("log")
        ax.set_title(f"{title}: normalised eigen-spectrum (mean over KV heads)", fontsize=9)
        ax.set_xlabel("principal component")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("eigenvalue / sum")
    axes[1].legend(fontsize=8, loc="best")
    return _save_figure(fig, path)


def _plot_deff_heatmap(pr_key: torch.Tensor, pr_value: torch.Tensor, head_dim: int, path: Path) -> Path:
    """Two heatmaps layer x KV head of the participation ratio, one shared colour scale."""
    L, H = pr_key.shape
    vmin = float(min(pr_key.min(), pr_value.min()))
    vmax = float(max(pr_key.max(), pr_value.max()))
    fig = Figure(figsize=(3.0 + 0.6 * min(H, 16), min(1.8 + 0.12 * L, 10.0)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    image = None
    for ax, title, pr in zip(axes, ("keys", "values"), (pr_key, pr_value)):
        image = ax.imshow(pr.numpy(), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, origin="upper")
        ax.set_title(f"{title}: participation ratio", fontsize=9)
        ax.set_xlabel("KV head")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("layer")
    fig.colorbar(image, ax=list(axes), label=f"PR (of head_dim {head_dim})")
    return _save_figure(fig, path)


def _plot_bits(data: ReportData, path: Path) -> Path:
    """One panel per preset: mean bits per coordinate per layer, K solid and V dashed.

    Separate panels because presets' K and V curves often sit at the same heights and would hide
    each other in one panel.
    """
    n = max(len(data.presets), 1)
    fig = Figure(figsize=(min(3.2 * n + 0.6, 14.0), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n, sharey=True, squeeze=False)[0])
    layers = np.arange(data.num_layers)
    for ax, preset in zip(axes, data.presets):
        k = bits_per_coordinate(preset.key_bits).mean(1).numpy()
        v = bits_per_coordinate(preset.value_bits).mean(1).numpy()
        ax.plot(layers, k, color="C0", ls="-", marker="o", ms=3, label="K")
        ax.plot(layers, v, color="C1", ls="--", marker="s", ms=3, label="V")
        ax.set_title(f"{preset.name} ({preset.compression_vs_bf16:.2f}x vs bf16)", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0, top=MAX_BITS_PER_CODE + 0.2)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("bits / coordinate (mean over KV heads)", fontsize=9)
    if data.presets:
        axes[0].legend(fontsize=8, loc="upper right")
    return _save_figure(fig, path)


# --- markdown -----------------------------------------------------------------------------------


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 100 else f"{seconds:.3g} s"


def _fmt_mse(x: float) -> str:
    return f"{x:.2e}" if (x != 0 and (abs(x) < 1e-3 or abs(x) >= 10)) else f"{x:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _compact_bits(key_bits: torch.Tensor, value_bits: torch.Tensor) -> str:
    """``K 6,5,4,... | V 5,4,...`` from group bits [H, G] each: mean over heads, rounded.

    The pipe is escaped so the cell stays one cell in a GitHub table (GFM honours ``\\|`` in code spans).
    """

    def groups(bits: torch.Tensor) -> str:
        return ",".join(str(int(b)) for b in bits.to(torch.float64).mean(0).round())

    return f"`K {groups(key_bits)} \\| V {groups(value_bits)}`"


def _flagged_layers(data: ReportData) -> list[str]:
    """Per preset and component, layers whose mean expected error exceeds FLAG_FACTOR x the model mean."""
    findings = []
    for p in data.presets:
        for component, mse in (("K", p.key_rel_mse), ("V", p.value_rel_mse)):
            per_layer = mse.to(torch.float64).mean(1)
            model_mean = float(per_layer.mean())
            if model_mean <= 0:
                continue
            bad = (per_layer > FLAG_FACTOR * model_mean).nonzero().flatten().tolist()
            if bad:
                ratios = ", ".join(f"{i} ({float(per_layer[i]) / model_mean:.1f}x)" for i in bad)
                findings.append(f"{p.name} {component}: layer {ratios}")
    return findings


def _markdown(data: ReportData, pr_key: torch.Tensor, pr_value: torch.Tensor) -> str:
    key_dims = {f: dims_for_fraction(data.key_eigvals, f) for f in VARIANCE_FRACTIONS}
    value_dims = {f: dims_for_fraction(data.value_eigvals, f) for f in VARIANCE_FRACTIONS}
    L, D = data.num_layers, data.head_dim
    mean = lambda t: float(t.to(torch.float64).mean())  # noqa: E731

    out = [f"# SpectralQuant calibration report: {data.model_name}", ""]
    timings = ", ".join(f"{name} {_fmt_seconds(s)}" for name, s in data.seconds.items()) or "n/a"
    out += [
        f"- **Model**: `{data.model_name}`: {L} layers, {data.num_heads} query heads / "
        f"{data.num_kv_heads} KV heads, head_dim {D}",
        f"- **Calibration**: {data.tokens:,} tokens of {data.corpus}, positions up to {data.max_position:,}",
        f"- **Timings**: {timings}",
    ]
    if data.sink_tokens is not None:
        share = ", ".join(f"{i}: {x:.0%}" for i, x in enumerate(data.sink_share or []) if x > 0) or "none found"
        out += [
            f"- **Attention sinks**: the first {data.sink_tokens} token(s) of every sequence are kept exact "
            f"(windows with a sink at each leading position: {share}; sinks from position {MAX_SINK_TOKENS} "
            "on are not kept)",
        ]
    if data.anchored_heads is not None:
        out += [
            f"- **Sink-anchored values**: {data.anchored_heads} of {L * data.num_kv_heads} (layer, KV head) pairs "
            "have coded attention sinks; their value mean is shifted so the sinks' value decodes exactly "
            "(calibrate/anchor.py)",
        ]
    out += [
        "",
        "## Summary",
        "",
        "Effective dimension of the centered keys and values (mean over layers and KV heads). "
        "PR is the participation ratio (sum l)^2 / sum l^2; dims x % is the number of leading principal "
        f"components holding x % of the variance (of {D}). Mean share is |mean|^2 / E|x|^2, the energy "
        "removed by centering.",
        "",
    ]
    dims_header = [f"dims {round(f * 100)} %" for f in VARIANCE_FRACTIONS]
    spectrum_rows = []
    for name, pr, dims, energy in (
        ("keys", pr_key, key_dims, data.key_mean_energy),
        ("values", pr_value, value_dims, data.value_mean_energy),
    ):
        spectrum_rows.append(
            [name, f"{mean(pr):.1f}"] + [f"{mean(dims[f]):.1f}" for f in VARIANCE_FRACTIONS] + [f"{mean(energy):.1%}"]
        )
    out += _table(["", "PR"] + dims_header + ["mean share"], spectrum_rows)
    out += [""]

    if data.presets:
        preset_rows = [
            [
                f"`{p.name}`",
                str(p.slot_bytes),
                f"{p.compression_vs_bf16:.2f}x",
                f"{mean(bits_per_coordinate(p.key_bits)):.2f}",
                f"{mean(bits_per_coordinate(p.value_bits)):.2f}",
                _fmt_mse(mean(p.key_rel_mse)),
                _fmt_mse(mean(p.value_rel_mse)),
                f"{p.key_gain:g}",
            ]
            for p in data.presets
        ]
        out += _table(
            ["preset", "slot bytes", "vs bf16", "K bits/coord", "V bits/coord", "K rel. MSE", "V rel. MSE", "K decode gain"],
            preset_rows,
        )
        out += [""]
        choices = [p for p in data.presets if p.key_gain_choice]
        if choices:
            out += ["Key decode gains chosen by the served loss of calibration windows (calibrate/key_gain.py; "
                    "a gain other than 1 must beat 1 by 2 paired standard errors, and a candidate worse than 1 "
                    "by 2 is dropped at the next look, every 4 windows):", ""]
            out += [f"- `{p.name}`: {p.key_gain_choice}" for p in choices] + [""]
        for p in data.presets:
            if p.layer_slot_bytes is not None:
                out += [
                    f"`{p.name}` slot bytes per layer (spread by measured attention error, mean {p.slot_bytes}): "
                    + ", ".join(str(b) for b in p.layer_slot_bytes),
                    "",
                ]

    findings = _flagged_layers(data)
    if findings:
        out += [
            f"**Flagged**: layers whose expected error is more than {FLAG_FACTOR:g}x the model mean: "
            + "; ".join(findings)
            + ".",
            "",
        ]
    else:
        out += [f"No layer's expected error exceeds {FLAG_FACTOR:g}x the model mean.", ""]

    out += [
        "## Per layer",
        "",
        "Mean over KV heads. Bits are per coordinate group of 8 (first group = most important "
        "coordinates), averaged over heads and rounded; rel. MSE is the expected relative error K / V.",
        "",
    ]
    header = ["layer", "K PR / dims95", "V PR / dims95"]
    for p in data.presets:
        header += [f"`{p.name}` bits", f"`{p.name}` rel. MSE K / V"]
    rows = []
    for layer in range(L):
        row = [
            str(layer),
            f"{mean(pr_key[layer]):.1f} / {mean(key_dims[0.95][layer]):.1f}",
            f"{mean(pr_value[layer]):.1f} / {mean(value_dims[0.95][layer]):.1f}",
        ]
        for p in data.presets:
            row += [
                _compact_bits(p.key_bits[layer], p.value_bits[layer]),
                f"{_fmt_mse(mean(p.key_rel_mse[layer]))} / {_fmt_mse(mean(p.value_rel_mse[layer]))}",
            ]
        rows.append(row)
    out += _table(header, rows)
    out += [
        "",
        "## Plots",
        "",
        f"![Normalised eigen-spectra of keys and values]({SPECTRA_PNG})",
        "",
        f"![Participation ratio per layer and KV head]({DEFF_HEATMAP_PNG})",
        "",
        f"![Bits per coordinate per layer]({BITS_PNG})",
        "",
    ]
    return "\n".join(out)


def write_report(out_dir: Path, data: ReportData) -> list[Path]:
    """Write report.md and PNG plots into out_dir (which exists); return the written paths.

    Returns ``[spectra.png, deff_heatmap.png, bits.png, report.md]``.
    """
    out_dir = Path(out_dir)
    _check_shapes(data)
    pr_key = participation_ratio(data.key_eigvals)  # [L, H]
    pr_value = participation_ratio(data.value_eigvals)
    written = [
        _plot_spectra(data, out_dir / SPECTRA_PNG),
        _plot_deff_heatmap(pr_key, pr_value, data.head_dim, out_dir / DEFF_HEATMAP_PNG),
        _plot_bits(data, out_dir / BITS_PNG),
    ]
    written.append(write_atomic(out_dir / REPORT_MD, _markdown(data, pr_key, pr_value).encode()))
    return written
