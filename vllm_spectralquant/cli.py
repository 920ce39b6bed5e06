"""The ``spectralquant`` command. Subcommands import what they need lazily."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence


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

    out = write_example_model(args.dir or default_example_model_dir(), overwrite=args.overwrite)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectralquant", description="SpectralQuant KV cache for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the kv-cache presets and their sizes")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.add_argument("--head-dim", type=int, nargs="+", default=[64, 128], help="head dims to list (default: 64 128)")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("example-model", help="write the embedded SmolLM2-135M-Instruct as a Hugging Face folder")
    p.add_argument("dir", nargs="?", help="output folder (default: $SPECTRALQUANT_HOME/models/SmolLM2-135M-Instruct)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_example_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vllm_spectralquant.format.errors import FormatError

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:  # output piped into e.g. `head`
        return 0
    except (FormatError, OSError) as e:
        print(f"spectralquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
