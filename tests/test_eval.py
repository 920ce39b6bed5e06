"""`spectralquant eval` end to end (quick mode): JSON shape, report files, proof the compressed path ran."""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_eval_quick(tmp_path, example_model_dir, smollm2_artifact, capsys):
    from vllm_spectralquant.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(example_model_dir), "--quick", "--presets", "sq4bit", "tq2_5bit", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "SmolLM2-135M-Instruct"
    rows = {(r["method"], r["preset"]): r for r in report["results"]}
    assert set(rows) == {("bf16", None), ("spectralquant", "sq4bit"), ("turboquant", "tq2_5bit")}
    ref = rows[("bf16", None)]
    for key in ("method", "preset", "bytes_per_head_token", "compression", "ppl", "ppl_delta_pct", "needle_pass_rate", "greedy_agreement"):
        assert all(key in r for r in report["results"])
    sq, tq = rows[("spectralquant", "sq4bit")], rows[("turboquant", "tq2_5bit")]
    assert sq["bytes_per_head_token"] == 67 and tq["bytes_per_head_token"] == 43
    # The compressed path ran: perplexity and capacity differ from the reference.
    assert sq["ppl"] != ref["ppl"] and tq["ppl"] != ref["ppl"]
    assert sq["kv_capacity_tokens"] > 3 * ref["kv_capacity_tokens"]
    assert 0 <= sq["greedy_agreement"] <= 1 and len(sq["needles"]) == 2
    # The 3.8x SpectralQuant preset costs far less perplexity than the 5.95x TQ layout.
    assert sq["ppl_delta_pct"] < tq["ppl_delta_pct"]
    assert out.with_suffix(".md").read_text().startswith("# SpectralQuant eval")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
