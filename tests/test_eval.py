"""`spectralquant eval`: scoring, --resume and its errors. The end-to-end run (`eval --quick` as the
README writes it) is tests/test_readme_commands.py::test_eval_quick_as_written."""

import pytest


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


def test_cli_needle_options_reach_the_config(tmp_path, monkeypatch):
    """--needle-lengths and --needle-depths override the defaults (and --quick's), as given."""
    from vllm_spectralquant.cli import main
    from vllm_spectralquant.evaluation import run

    seen = []

    def fake_evaluate(cfg, log, on_result):
        seen.append(cfg)
        raise run.EvalError("stop here")

    monkeypatch.setattr(run, "evaluate", fake_evaluate)
    argv = ["eval", str(tmp_path), "--quick", "--needle-lengths", "1024", "8192", "--needle-depths", "0.5",
            "--json", str(tmp_path / "out.json")]
    assert main(argv) == 2
    (cfg,) = seen
    assert list(cfg.needle_lengths) == [1024, 8192] and cfg.needle_depths == (0.5,)
    assert cfg.ppl_window_tokens == 512  # the rest of --quick stays
