"""The eval report: a markdown table, a quality-vs-compression plot (PNG) and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_spectralquant.files import save_figure, write_atomic


def markdown(report: dict) -> str:
    lines = [
        f"# SpectralQuant eval: {report['model']} ({report['date']})",
        "",
        f"Serving dtype {report['serving_dtype']}; reference: {report['reference']}. Perplexity over "
        f"{report['perplexity']['windows']} x {report['perplexity']['window_tokens']} held-out tokens, prefill chunk "
        f"{report['perplexity']['prefill_chunk']} ({report['perplexity']['scoring']}); {len(report['needle']['trials'])} needles; "
        f"greedy agreement over {report['greedy']['prompts']} prompts x {report['greedy']['tokens']} tokens.",
        "",
        "| method | preset | bytes/head-token | compression | perplexity | Δ ppl | needle pass | greedy agreement | KV capacity (tokens) | vs bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        cap = f"{r['kv_capacity_tokens']:,}" if r["kv_capacity_tokens"] else "-"
        vs = f"{r['kv_capacity_vs_bf16']:.2f}x" if r["kv_capacity_vs_bf16"] else "-"
        lines.append(
            f"| {r['method']} | {r['preset'] or '-'} | {r['bytes_per_head_token']} | {r['compression']:.2f}x | {r['ppl']:.3f} | "
            f"{r['ppl_delta_pct']:+.2f} % | {r['needle_pass_rate']:.2f} | {r['greedy_agreement']:.2f} | {cap} | {vs} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"bf16": "black", "spectralquant": "tab:blue", "turboquant": "tab:orange"}
    for method in colors:
        pts = [r for r in report["results"] if r["method"] == method]
        if not pts:
            continue
        ax.plot([r["compression"] for r in pts], [r["ppl_delta_pct"] for r in pts], "o-" if len(pts) > 1 else "o", color=colors[method], label=method)
        for r in pts:
            ax.annotate(r["preset"] or "bf16", (r["compression"], r["ppl_delta_pct"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("compression vs bf16 (bytes per head-token)")
    ax.set_ylabel("perplexity change vs reference (%)")
    ax.set_title(f"{report['model']}: quality vs compression")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def write(report: dict, json_path: Path | None, md_path: Path | None, png_path: Path | None) -> None:
    if json_path:
        write_atomic(Path(json_path), json.dumps(report, indent=2).encode())
    if md_path:
        write_atomic(Path(md_path), markdown(report).encode())
    if png_path:
        plot(report, Path(png_path))
