"""`make demo`: serve the embedded SmolLM2-135M with the SpectralQuant cache and ask it one question.

Steps: write the model folder (cached), calibrate it (cached in MODEL/spectralquant), start
`vllm serve --attention-backend CUSTOM --kv-cache-dtype spectralquant_<preset>` on 127.0.0.1,
send one chat request with the OpenAI client, print the answer and vLLM's KV capacity against a
bf16 cache in the same memory, and stop the server.

    python -m vllm_spectralquant.demo [--preset sq3bit] [--question "..."]
"""

from __future__ import annotations

import argparse
import sys
import time

from vllm_spectralquant.format.presets import get_preset
from vllm_spectralquant.models.shape import ModelShape


def bf16_capacity_tokens(shape: ModelShape, memory_bytes: int, block_size: int) -> int:
    """Tokens a bf16 cache holds in ``memory_bytes`` (vLLM's whole-block accounting)."""
    block_bytes = shape.num_layers * shape.num_kv_heads * block_size * 4 * shape.head_dim
    return memory_bytes // block_bytes * block_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sq3bit")
    ap.add_argument("--question", default="Give me three short tips for staying healthy.")
    ap.add_argument("--kv-cache-gib", type=int, default=1)
    args = ap.parse_args(argv)
    preset = get_preset(args.preset)

    from vllm_spectralquant.calibrate.job import ensure_calibrated
    from vllm_spectralquant.models.example_model import ensure_example_model
    from vllm_spectralquant.serving import ServerOptions, VllmServer

    t0 = time.monotonic()
    model = ensure_example_model()
    print(f"[1/4] model: {model}")
    if preset.method == "spectralquant":
        print("[2/4] calibrating, unless the artifact is cached (the first run: ~12 min on 2 CPU cores)", flush=True)
        artifact = ensure_calibrated(model)
        print(f"[2/4] artifact: {artifact} (report: {artifact / 'report.md'})")
    else:
        print(f"[2/4] {preset.name} is the TurboQuant layout: no calibration needed")
    opts = ServerOptions(model, preset.kv_cache_dtype, kv_cache_gib=args.kv_cache_gib)
    print(f"[3/4] starting: vllm serve {' '.join(opts.args())}")
    with VllmServer(opts) as server:
        print(f"      healthy at {server.base_url} after {time.monotonic() - t0:.0f}s")
        client = server.client()
        resp = client.chat.completions.create(
            model="model", messages=[{"role": "user", "content": args.question}], max_tokens=96, temperature=0
        )
        answer = resp.choices[0].message.content.strip()
        capacity = server.kv_capacity_tokens()
    shape = ModelShape.from_model_dir(model)
    bf16 = bf16_capacity_tokens(shape, args.kv_cache_gib << 30, block_size=128)
    print(f"[4/4] {args.question}\n\n{answer}\n")
    head_dim = shape.head_dim
    ratio = f"{capacity:,} tokens (bf16: {bf16:,} tokens) -> {capacity / bf16:.2f}x" if capacity else f"not in the server log (bf16: {bf16:,} tokens)"
    print(
        f"KV capacity with {preset.kv_cache_dtype} in {args.kv_cache_gib} GiB: {ratio}; "
        f"{preset.slot_bytes(head_dim)} B per head-token vs {4 * head_dim} B"
    )
    print(f"server stopped; {time.monotonic() - t0:.0f}s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
