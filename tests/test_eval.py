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


def test_resume_refuses_rows_of_another_artifact(tmp_path, tiny_artifact):
    """The report records the artifact (manifest sha256, calibration settings); --resume keeps
    SpectralQuant rows only when this run uses the same one, and says so when an older report
    does not record it."""
    from dataclasses import asdict

    from vllm_spectralquant.evaluation.report import markdown
    from vllm_spectralquant.evaluation.run import EvalConfig, EvalError, _resumable, artifact_record

    record = artifact_record(tiny_artifact.artifact)
    assert record["tokens"] == 2048 and record["window"] == 128 and record["layer_budgets"] == ["sq2_5bit", "sq3bit", "sq4bit"]
    assert record["key_gains"] == {"sq2_5bit": 1.04, "sq3bit": 1.04, "sq4bit": 1.04}  # conftest.TINY_KEY_GAIN
    assert len(record["manifest_sha256"]) == 64 and artifact_record(tmp_path / "none") is None
    settings, rows = _report_with_rows()
    resume = {**settings, "complete": False, "results": [asdict(r) for r in rows]}
    cfg = EvalConfig(model_dir=tmp_path, resume={**resume, "artifact": record})
    assert list(_resumable(cfg, settings, record)[0]) == ["spectralquant_sq4bit"]
    other = {**record, "manifest_sha256": "0" * 64, "path": "/elsewhere", "created": "yesterday"}
    with pytest.raises(EvalError, match=r"rows \(spectralquant_sq4bit\) were measured with the artifact /elsewhere created yesterday"):
        _resumable(EvalConfig(model_dir=tmp_path, resume={**resume, "artifact": other}), settings, record)
    said = []
    assert list(_resumable(EvalConfig(model_dir=tmp_path, resume=resume), settings, record, said.append)[0]) == ["spectralquant_sq4bit"]
    assert "does not say which artifact" in said[0]
    report = {**settings, "date": "d", "reference": "r", "artifact": record, "results": [],
              "perplexity": {"windows": 8, "window_tokens": 1024, "prefill_chunk": 128, "scoring": "s"},
              "greedy": {"prompts": 16, "tokens": 64}}
    assert f"SpectralQuant artifact: `{record['path']}`" in markdown(report) and "2,048 tokens" in markdown(report)


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


def test_paired_delta_and_its_standard_error():
    import math

    from vllm_spectralquant.evaluation.run import paired_delta

    ref = [3.0, 3.2, 2.9, 3.1]
    delta, se = paired_delta([x + 0.01 for x in ref], ref)  # the same shift in every window: no spread
    assert delta == pytest.approx(100 * (math.exp(0.01) - 1)) and se == pytest.approx(0.0, abs=1e-9)
    delta, se = paired_delta([3.02, 3.2, 2.92, 3.1], ref)  # shifts 0.02, 0, 0.02, 0: sd 0.01155, SE 0.00577
    assert delta == pytest.approx(100 * (math.exp(0.01) - 1)) and se == pytest.approx(100 * math.exp(0.01) * 0.011547 / 2, rel=1e-3)
    assert paired_delta([3.0], [2.0])[1] is None


def test_methods_accept_emulated_vllm_formats_and_reject_unknown_names():
    from vllm_spectralquant.evaluation.run import EvalError, methods_for

    rows = methods_for(["sq3bit", "int4_per_token_head", "bf16_rounded"])
    assert [(m.method, m.kv_cache_dtype, m.needs_artifact, m.emulated) for m in rows] == [
        ("bf16", "auto", False, False),
        ("spectralquant", "spectralquant_sq3bit", True, False),
        ("vllm", "spectralquant_emulate_int4_per_token_head", False, True),
        ("noise_floor", "spectralquant_emulate_bf16_rounded", False, True),
    ]
    with pytest.raises(EvalError, match="emulated method: bf16_rounded"):
        methods_for(["int2"])


def test_report_shows_spread_noise_floor_and_goal():
    from dataclasses import asdict, replace

    from vllm_spectralquant.evaluation import report
    from vllm_spectralquant.evaluation.run import emulated_bytes, goal_check, noise_floor

    settings, (ref, sq) = _report_with_rows()
    ref = replace(ref, window_nll=[3.0, 3.1])
    sq = replace(sq, window_nll=[3.01, 3.11], ppl_delta_se_pct=0.0)
    floor = replace(sq, method="noise_floor", preset="bf16_rounded", kv_cache_dtype="spectralquant_emulate_bf16_rounded",
                    bytes_per_head_token=256, ppl=10.001, window_nll=[3.0001, 3.1001])
    fp8 = replace(floor, method="vllm", preset="fp8", kv_cache_dtype="spectralquant_emulate_fp8", bytes_per_head_token=128,
                  ppl=10.2, window_nll=[3.02, 3.12], kv_capacity_source="analytic (bytes)")
    rows = [ref, sq, floor, fp8]
    goal = goal_check(rows)
    assert [(g["spectralquant"], g["vllm"], g["lower_ppl"]) for g in goal] == [("sq4bit", "fp8", True)]
    nf = noise_floor(rows)
    assert set(nf["rows"]) == {"bf16_rounded"} and nf["fp8_vs_bf16_rounded"]["ppl_delta_pct"] > 0
    md = report.markdown({**settings, "date": "d", "reference": "r", "greedy": {"prompts": 1, "tokens": 1},
                          "perplexity": {"windows": 2, "window_tokens": 8, "prefill_chunk": 2, "scoring": "s"},
                          "results": [asdict(r) for r in rows], "noise_floor": nf, "goal": goal})
    assert "± 0.00" in md and "**Noise floor**" in md and "fp8 vs bf16_rounded" in md and "| sq4bit | 67 | fp8 | 128 |" in md
    assert "10*" in md  # analytic capacity is marked
    log = "INFO SpectralQuant emulation: spectralquant_emulate_fp8 128.000 B per head-token over 30 layers (every layer compressed)"
    assert emulated_bytes(log, "spectralquant_emulate_fp8") == 128.0
    with pytest.raises(Exception, match="no SpectralQuant emulation line"):
        emulated_bytes(log, "spectralquant_emulate_int4_per_token_head")


def test_needle_longer_than_the_context_is_refused_by_name(tiny_calib_model_dir, text_corpus):
    """A needle length the model cannot hold is an error (it used to be dropped, leaving a run with 0 needles)."""
    from vllm_spectralquant.evaluation.run import EvalConfig, EvalError, _inputs

    cfg = EvalConfig(model_dir=tiny_calib_model_dir, corpus=text_corpus, ppl_windows=2, ppl_window_tokens=64,
                     greedy_prompts=2, needle_lengths=[256, 512], needle_depths=(0.5,))
    with pytest.raises(EvalError, match=r"--needle-lengths 512: longer than the model's context \(512 tokens\) minus 16"):
        _inputs(cfg, max_context=512)
    windows, prompts, trials = _inputs(EvalConfig(**{**cfg.__dict__, "needle_lengths": [256]}), max_context=512)[:3]
    assert len(trials) == 1 and len(windows) == 2


def test_served_trials_start_like_served_sequences(tiny_tokenizer, text_corpus):
    """The eval's needle prompts (and the probe's) are build_trials' with the tokenizer's prefix put in front;
    their lengths and answers are unchanged."""
    from vllm_spectralquant.corpus import HeldOut, held_out
    from vllm_spectralquant.evaluation.needle import build_trials, served_trials

    text = held_out(tiny_tokenizer, text_corpus.read_text(encoding="utf-8"))
    text = HeldOut(text.ids, text.held, [1])  # as a tokenizer with a BOS would give
    plain = build_trials(tiny_tokenizer, text.ids.tolist(), [300, 600], [0.25, 0.75])
    served = served_trials(tiny_tokenizer, text, [300, 600], [0.25, 0.75])
    assert [t.prompt_ids for t in served] == [[1] + t.prompt_ids for t in plain]
    assert [(t.context_tokens, t.depth, t.value) for t in served] == [(t.context_tokens, t.depth, t.value) for t in plain]
    assert [len(t.prompt_ids) for t in served] == [301, 301, 601, 601]


def test_spectralquant_presets_without_an_artifact_fail_before_any_server(tmp_path, tiny_llama_dir):
    """No artifact: a clear error naming the folder and the command, before the reference's minutes."""
    from vllm_spectralquant.evaluation.run import EvalConfig, EvalError, evaluate

    started = []
    with pytest.raises(EvalError, match=r"sq4bit need a SpectralQuant artifact and there is none at .*none: run `spectralquant calibrate .*tiny-llama"):
        evaluate(EvalConfig(model_dir=tiny_llama_dir, presets=["sq4bit"], artifact=tmp_path / "none"), log=started.append)
    assert started == []
