"""`spectralquant eval` end to end (quick mode): JSON shape, report files, proof the compressed path ran."""

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_eval_quick(tmp_path, example_model_dir, smollm2_artifact, capsys):
    from vllm_spectralquant.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", str(example_model_dir), "--quick", "--presets", "sq4bit", "tq2_5bit", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "SmolLM2-135M-Instruct" and report["complete"] is True
    # Quick mode: 512-token windows, prefill chunk 128 -> the first chunk's 129 predictions are not scored.
    assert report["perplexity"]["scored_tokens_per_window"] == 512 - 128 - 1
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


class _PromptLogprobsClient:
    """Stands in for the OpenAI client: token i gets logprob -i (so sums identify the scored tokens)."""

    class completions:  # noqa: N801 - mirrors client.completions.create
        @staticmethod
        def create(prompt, **_):
            from types import SimpleNamespace

            entries = [None] + [{str(t): {"logprob": -float(i)}} for i, t in enumerate(prompt) if i > 0]
            return SimpleNamespace(choices=[SimpleNamespace(model_extra={"prompt_logprobs": entries})])


def test_prompt_nll_scores_only_tokens_from_first_scored_on():
    from vllm_spectralquant.evaluation.metrics import perplexity, prompt_nll

    tokens = list(range(100, 110))
    assert prompt_nll(_PromptLogprobsClient, tokens) == (sum(range(1, 10)), 9)
    assert prompt_nll(_PromptLogprobsClient, tokens, first_scored=5) == (5 + 6 + 7 + 8 + 9, 5)
    assert perplexity(_PromptLogprobsClient, [tokens, tokens], first_scored=9) == pytest.approx(2.718281828 ** 9)
    with pytest.raises(ValueError, match="first_scored"):
        prompt_nll(_PromptLogprobsClient, tokens, first_scored=10)


def _report_with_rows():
    from vllm_spectralquant.evaluation.run import MethodResult

    common = dict(compression=1.0, ppl_delta_pct=0.0, needle_pass_rate=1.0, greedy_agreement=1.0, kv_capacity_tokens=10,
                  kv_capacity_vs_bf16=1.0, needles=[True], seconds=1.0)
    ref = MethodResult(method="bf16", preset=None, kv_cache_dtype="auto", bytes_per_head_token=256, ppl=10.0, **common)
    sq = MethodResult(method="spectralquant", preset="sq4bit", kv_cache_dtype="spectralquant_sq4bit", bytes_per_head_token=67, ppl=10.1, **common)
    settings = {"model": "m", "serving_dtype": "float32", "perplexity": {"windows": 8}, "needle": {"trials": []}, "greedy": {"prompts": 16}}
    return settings, [ref, sq]


def test_resume_keeps_preset_rows_of_a_report_with_the_same_settings(tmp_path):
    from dataclasses import asdict

    from vllm_spectralquant.evaluation.run import EvalConfig, EvalError, _resumable

    settings, rows = _report_with_rows()
    cfg = EvalConfig(model_dir=tmp_path, resume={**settings, "complete": False, "results": [asdict(r) for r in rows]})
    kept, ref = _resumable(cfg, settings)
    assert list(kept) == ["spectralquant_sq4bit"] and kept["spectralquant_sq4bit"].ppl == 10.1 and ref.ppl == 10.0
    with pytest.raises(EvalError, match="other settings.*perplexity"):
        _resumable(cfg, {**settings, "perplexity": {"windows": 4}})


def test_resume_without_an_earlier_report_is_a_clear_error(tmp_path, capsys):
    from vllm_spectralquant.cli import main

    assert main(["eval", str(tmp_path), "--resume", "--json", str(tmp_path / "none.json")]) == 2
    assert "--resume: no earlier report" in capsys.readouterr().err
