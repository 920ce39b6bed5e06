"""The eval report: a markdown table, a quality-vs-compression plot (PNG) and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_spectralquant.files import save_figure, write_atomic


LABELS = {"bf16": "reference", "spectralquant": "SpectralQuant", "turboquant": "TQ layout (ours)",
          "vllm": "vLLM format (emulated)", "noise_floor": "noise floor (emulated)"}


def _delta(r: dict) -> str:
    se = r.get("ppl_delta_se_pct")
    return f"{r['ppl_delta_pct']:+.2f} %" + (f" ± {se:.2f}" if se is not None else "")


def _bytes(b: float) -> str:
    return f"{b:.0f}" if float(b).is_integer() else f"{b:.2f}"


def _artifact_line(artifact: dict | None) -> list[str]:
    if not artifact:
        return []
    layered = ", ".join(artifact["layer_budgets"]) or "none"
    # Reports written before the key gain existed have no "key_gains" (their artifacts had none).
    gains = ", ".join(f"{n} {g:g}" for n, g in artifact.get("key_gains", {}).items()) or "none"
    return ["", f"SpectralQuant artifact: `{artifact['path']}` (created {artifact['created']}; {artifact['tokens']:,} tokens of "
                f"{artifact['corpus']} in windows of {artifact['window']}, key weight {artifact['key_weight']}, layer budgets: {layered}, "
                f"key decode gains: {gains})."]


def markdown(report: dict) -> str:
    lines = [
        f"# SpectralQuant eval: {report['model']} ({report['date']})",
        "",
        f"Serving dtype {report['serving_dtype']}; reference: {report['reference']}. Perplexity over "
        f"{report['perplexity']['windows']} x {report['perplexity']['window_tokens']} held-out tokens, prefill chunk "
        f"{report['perplexity']['prefill_chunk']} ({report['perplexity']['scoring']}); {len(report['needle']['trials'])} needles; "
        f"greedy agreement over {report['greedy']['prompts']} prompts x {report['greedy']['tokens']} tokens. "
        f"{report.get('spread', '')}. Emulated rows: vLLM's own quantiser at store time on a dense cache; their bytes "
        "are vLLM's allocation (averaged over layers) and their capacity is analytic (bytes), marked *.",
        *_artifact_line(report.get("artifact")),
        "",
        "| method | preset | bytes/head-token | compression | perplexity | Δ ppl ± SE | needle pass | greedy agreement | KV capacity (tokens) | vs bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        analytic = "*" if r.get("kv_capacity_source", "vLLM log") != "vLLM log" else ""
        cap = f"{r['kv_capacity_tokens']:,}{analytic}" if r["kv_capacity_tokens"] else "-"
        vs = f"{r['kv_capacity_vs_bf16']:.2f}x{analytic}" if r["kv_capacity_vs_bf16"] else "-"
        lines.append(
            f"| {LABELS.get(r['method'], r['method'])} | {r['preset'] or '-'} | {_bytes(r['bytes_per_head_token'])} | {r['compression']:.2f}x | "
            f"{r['ppl']:.3f} | {_delta(r)} | {r['needle_pass_rate']:.2f} | {r['greedy_agreement']:.2f} | {cap} | {vs} |"
        )
    floor = report.get("noise_floor") or {}
    if floor.get("rows") or floor.get("fp8_vs_bf16_rounded"):
        lines += ["", "**Noise floor** (harmless changes):"]
        for name, f in floor.get("rows", {}).items():
            se = f" ± {f['ppl_delta_se_pct']:.2f}" if f.get("ppl_delta_se_pct") is not None else ""
            lines.append(f"- {name} vs reference: Δ ppl {f['ppl_delta_pct']:+.2f} %{se}, needles {f['needle_pass_rate']:.2f}, "
                         f"greedy agreement {f['greedy_agreement']:.2f}")
        if floor.get("fp8_vs_bf16_rounded"):
            f = floor["fp8_vs_bf16_rounded"]
            se = f" ± {f['ppl_delta_se_pct']:.2f}" if f.get("ppl_delta_se_pct") is not None else ""
            lines.append(f"- fp8 vs bf16_rounded (paired): Δ ppl {f['ppl_delta_pct']:+.2f} %{se}")
    if report.get("goal"):
        lines += ["", "**Goal** (each SpectralQuant preset at lower perplexity than each vLLM format with the same or more bytes):", "",
                  "| SpectralQuant | bytes | vLLM format | bytes | ppl | vLLM ppl | SQ vs vLLM (paired) | met |", "|---|---|---|---|---|---|---|---|"]
        for g in report["goal"]:
            rel = "-" if g["ppl_vs_vllm_pct"] is None else f"{g['ppl_vs_vllm_pct']:+.2f} %" + (
                f" ± {g['ppl_vs_vllm_se_pct']:.2f}" if g["ppl_vs_vllm_se_pct"] is not None else "")
            lines.append(f"| {g['spectralquant']} | {_bytes(g['bytes'])} | {g['vllm']} | {_bytes(g['vllm_bytes'])} | {g['ppl']:.3f} | "
                         f"{g['vllm_ppl']:.3f} | {rel} | {'yes' if g['lower_ppl'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    colors = {"bf16": "black", "spectralquant": "tab:blue", "turboquant": "tab:orange", "vllm": "tab:red", "noise_floor": "tab:gray"}
    for method in colors:
        pts = sorted((r for r in report["results"] if r["method"] == method), key=lambda r: r["compression"])
        if not pts:
            continue
        se = [r.get("ppl_delta_se_pct") or 0.0 for r in pts]
        style = "o-" if len(pts) > 1 and method in ("spectralquant", "turboquant") else "o"
        ax.errorbar([r["compression"] for r in pts], [r["ppl_delta_pct"] for r in pts], yerr=se, fmt=style, color=colors[method],
                    capsize=3, label=LABELS.get(method, method))
        for r in pts:
            ax.annotate(r["preset"] or "bf16", (r["compression"], r["ppl_delta_pct"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("compression vs bf16 (bytes per head-token)")
    ax.set_ylabel("perplexity change vs reference (%, ± SE)")
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
