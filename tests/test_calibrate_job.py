"""`spectralquant calibrate`: the job end to end, its bad-input errors, and Ray sharding."""

import json
import shutil

import pytest
import torch

from vllm_spectralquant.artifact import fingerprint_of, load_artifact
from vllm_spectralquant.artifact.errors import ArtifactError
from vllm_spectralquant.calibrate.errors import CalibrationError
from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate, current_artifact, prepare_windows, window_offsets
from vllm_spectralquant.cli import main as cli
from vllm_spectralquant.models.errors import ModelError


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_artifact_is_complete_and_verified(tiny_artifact, tiny_calib_model_dir):
    path = tiny_artifact.artifact
    art = load_artifact(path, expect=fingerprint_of(tiny_calib_model_dir))
    m = art.manifest
    assert [p.name for p in m.presets] == ["sq2_5bit", "sq3bit", "sq4bit"]
    assert m.corpus.tokens == 2048 and m.corpus.window == 128 and m.corpus.max_position == 1024
    assert {"report.md", "spectra.png", "deff_heatmap.png", "bits.png"} <= {f.path for f in m.files}
    for preset in ("sq2_5bit", "sq4bit"):
        entry = m.preset(preset)
        # The preset's bytes are spread over the layers by measured attention error; their mean is the preset's.
        assert entry.layer_slot_bytes is not None and sum(entry.layer_slot_bytes) == 3 * entry.slot_bytes
        for layer in range(3):
            codec = art.layer_codec(preset, layer)
            assert codec.num_kv_heads == 2 and codec.head_dim == 32
            assert codec.slot_bytes == entry.layer_slot_bytes[layer]
            assert int((codec.key.code_bytes + codec.value.code_bytes).max()) <= codec.data_bytes
    # Tensor-parallel slice: one KV head.
    assert art.layer_codec("sq3bit", 1, slice(1, 2)).num_kv_heads == 1
    # Keys carry more energy in fewer directions than values in these models; the error ordering holds.
    p = {e.name: e for e in m.presets}
    assert p["sq2_5bit"].key_rel_mse > p["sq3bit"].key_rel_mse > p["sq4bit"].key_rel_mse
    assert _leftovers(path.parent) == []


def test_windows_spread_over_the_context():
    assert window_offsets(5, 128, 1024) == [0, 224, 448, 672, 896]
    assert window_offsets(1, 128, 1024) == [0]
    assert window_offsets(3, 128, 128) == [0, 0, 0]


def test_windows_start_like_served_sequences(tiny_tokenizer, text_corpus, tmp_path):
    """A tokenizer that adds a BOS gets it at the start of every window (where such a model keeps its sink)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    cfg = CalibrationConfig(model_dir=tmp_path, out_dir=tmp_path / "a", corpus=text_corpus, tokens=512, window=128)
    plain, _, info = prepare_windows(cfg, tiny_tokenizer, 1024)
    assert info.first_token_id is None and (plain[:, 0] != tiny_tokenizer.bos_token_id).all()
    with_bos = copy.deepcopy(tiny_tokenizer)
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    windows, _, info = prepare_windows(cfg, with_bos, 1024)
    assert info.first_token_id == bos and (windows[:, 0] == bos).all()
    assert torch.equal(windows[:, 1:], plain[:, 1:])  # the rest is the same running text


def test_existing_output_is_refused_then_overwritten(tmp_path, tiny_calib_model_dir, text_corpus):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = CalibrationConfig(model_dir=tiny_calib_model_dir, out_dir=out, corpus=text_corpus, tokens=256, window=128, presets=["sq3bit"])
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite"):
        calibrate(cfg)
    assert (out / "keep.txt").exists()
    cfg.overwrite = True
    calibrate(cfg)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert _leftovers(tmp_path) == []


def test_corpus_too_small_says_found_and_needed(tmp_path, tiny_calib_model_dir):
    small = tmp_path / "small.txt"
    small.write_text("just a few words " * 10)
    out = tmp_path / "art"
    cfg = CalibrationConfig(model_dir=tiny_calib_model_dir, out_dir=out, corpus=small, tokens=1024, window=128)
    with pytest.raises(CalibrationError, match=r"the corpus has 170 tokens, 1024 are needed"):
        calibrate(cfg)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_interrupted_run_leaves_nothing_that_looks_valid(tmp_path, tiny_calib_model_dir, text_corpus, monkeypatch):
    import vllm_spectralquant.calibrate.report as report

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", boom)
    out = tmp_path / "art"
    cfg = CalibrationConfig(model_dir=tiny_calib_model_dir, out_dir=out, corpus=text_corpus, tokens=256, window=128, presets=["sq3bit"])
    with pytest.raises(KeyboardInterrupt):
        calibrate(cfg)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_options(tmp_path, tiny_calib_model_dir, text_corpus):
    base = dict(model_dir=tiny_calib_model_dir, corpus=text_corpus, tokens=256, window=128)
    with pytest.raises(CalibrationError, match="cannot calibrate preset 'tq3bit'.*need no calibration"):
        calibrate(CalibrationConfig(**base, out_dir=tmp_path / "a", presets=["tq3bit"]))
    with pytest.raises(CalibrationError, match="exceeds the model's context"):
        calibrate(CalibrationConfig(**base, out_dir=tmp_path / "b", max_position=5000))
    with pytest.raises(CalibrationError, match="model folder .* does not exist"):
        calibrate(CalibrationConfig(**dict(base, model_dir=tmp_path / "nope"), out_dir=tmp_path / "c"))
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ArtifactError, match="cannot create"):
        calibrate(CalibrationConfig(**base, out_dir=afile / "sub" / "art"))
    with pytest.raises(CalibrationError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        calibrate(CalibrationConfig(**base, out_dir=tmp_path / "d", ray_address="127.0.0.1:9"))
    with pytest.raises(CalibrationError, match=r"--key-gain must be .auto. or a number in \[0.5, 2.0\], got 3"):
        calibrate(CalibrationConfig(**base, out_dir=tmp_path / "e", key_gain=3))


def test_layer_budgets_for_named_presets_only(tmp_path, tiny_calib_model_dir, text_corpus):
    """``--layer-budgets sq4bit``: that preset's layers get their own sizes (mean = the preset's), the
    other presets stay uniform; a preset that is not fitted is refused before anything loads."""
    out = tmp_path / "art"
    rc = cli(["calibrate", str(tiny_calib_model_dir), "--corpus", str(text_corpus), "--tokens", "512", "--window", "128",
              "--out", str(out), "--quiet", "--layer-budgets", "sq4bit"])
    assert rc == 0
    m = load_artifact(out, expect=fingerprint_of(tiny_calib_model_dir)).manifest
    assert m.preset("sq2_5bit").layer_slot_bytes is None and m.preset("sq3bit").layer_slot_bytes is None
    slots = m.preset("sq4bit").layer_slot_bytes
    assert slots is not None and sum(slots) == 3 * m.preset("sq4bit").slot_bytes
    base = dict(model_dir=tiny_calib_model_dir, corpus=text_corpus, tokens=256, window=128, presets=["sq2_5bit", "sq3bit"])
    with pytest.raises(CalibrationError, match=r"--layer-budgets sq4bit: not among the presets being fitted \(sq2_5bit, sq3bit\)"):
        calibrate(CalibrationConfig(**base, out_dir=tmp_path / "b", layer_budgets=["spectralquant_sq4bit"]))
    assert not (tmp_path / "b").exists()


def test_key_gain_option(tmp_path, tiny_calib_model_dir, text_corpus):
    """``--key-gain 1`` writes presets without a gain (bytes and codes as with the default gain);
    ``--key-gain 1.1`` gives every preset that gain."""
    def run(out, gain):
        rc = cli(["calibrate", str(tiny_calib_model_dir), "--corpus", str(text_corpus), "--tokens", "512", "--window", "128",
                  "--out", str(out), "--quiet", "--presets", "sq2_5bit", "sq4bit", "--key-gain", gain])
        assert rc == 0
        return load_artifact(out, expect=fingerprint_of(tiny_calib_model_dir))

    none, more = run(tmp_path / "none", "1"), run(tmp_path / "more", "1.1")
    for name in ("sq2_5bit", "sq4bit"):
        assert none.manifest.preset(name).key_gain == 1.0 and "key.gain" not in none.presets[name]
        assert more.manifest.preset(name).key_gain == 1.1
        assert torch.equal(none.presets[name]["key.codebooks"], more.presets[name]["key.codebooks"])
        assert torch.allclose(more.presets[name]["key.gain"], torch.tensor(1.1))


def test_an_artifact_is_current_only_when_fitted_as_by_default(tmp_path, tiny_artifact, tiny_calib_model_dir, tiny_llama_dir):
    """``current_artifact`` (what ``ensure_calibrated``, the demo and the served tests reuse): the model's own,
    with chosen key gains and at least the tokens asked for; anything else is None, never an error."""
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact.artifact, art)
    assert current_artifact(tiny_calib_model_dir, out_dir=tmp_path / "none", tokens=2048) is None
    assert current_artifact(tiny_calib_model_dir, out_dir=art, tokens=2048) is None  # its gain was set, not chosen
    raw = json.loads((art / "manifest.json").read_text())
    for entry in raw["presets"]:
        entry["key_gain_chosen_on"] = 4
    (art / "manifest.json").write_text(json.dumps(raw))
    assert current_artifact(tiny_calib_model_dir, out_dir=art, tokens=2048) == art
    assert current_artifact(tiny_calib_model_dir, out_dir=art, tokens=4096) is None  # fitted on fewer tokens
    assert current_artifact(tiny_llama_dir, out_dir=art, tokens=2048) is None  # another model
    (art / "manifest.json").write_text("{")
    assert current_artifact(tiny_calib_model_dir, out_dir=art, tokens=2048) is None


def test_layer_budgets_before_the_model_folder_is_named(tmp_path, capsys):
    """``--layer-budgets`` takes preset names, so a model folder after it is refused as one (argparse
    would otherwise report the folder as a missing argument)."""
    with pytest.raises(SystemExit):
        cli(["calibrate", "--layer-budgets", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"argument --layer-budgets: invalid choice: '{tmp_path}'" in err and "'sq4bit'" in err


def test_layer_budgets_refuse_sliding_window_models(tmp_path, tiny_calib_model_dir, text_corpus):
    import json
    import shutil

    model = tmp_path / "sliding"
    shutil.copytree(tiny_calib_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(sliding_window=64, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    (model / "config.json").write_text(json.dumps(config))
    cfg = CalibrationConfig(model_dir=model, corpus=text_corpus, tokens=256, window=128, layer_budgets=True)
    with pytest.raises(CalibrationError, match="--layer-budgets does not support models with sliding-window layers"):
        calibrate(cfg)
    assert not (model / "spectralquant").exists()


def test_unsupported_models_are_named(tmp_path, tiny_calib_model_dir, text_corpus):
    import shutil

    for key, value, msg in (("kv_lora_rank", 64, "MLA"), ("attn_logit_softcapping", 50.0, "logits soft-capping")):
        model = tmp_path / key
        shutil.copytree(tiny_calib_model_dir, model)
        cfg = json.loads((model / "config.json").read_text())
        cfg[key] = value
        (model / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ModelError, match=msg):
            calibrate(CalibrationConfig(model_dir=model, corpus=text_corpus, tokens=256, window=128))
        assert not (model / "spectralquant").exists()


def test_cli_calibrate_and_inspect(tmp_path, tiny_calib_model_dir, text_corpus, capsys):
    out = tmp_path / "art"
    rc = cli(["calibrate", str(tiny_calib_model_dir), "--out", str(out), "--corpus", str(text_corpus),
              "--tokens", "256", "--window", "128", "--presets", "sq3bit", "--quiet"])
    assert rc == 0 and "report.md" in capsys.readouterr().out
    assert cli(["inspect", str(out), "--model", str(tiny_calib_model_dir)]) == 0
    assert "verified" in capsys.readouterr().out
    assert cli(["calibrate", str(tiny_calib_model_dir), "--out", str(out), "--corpus", str(text_corpus), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_ray_two_workers_give_the_same_artifact(tmp_path, tiny_calib_model_dir, text_corpus):
    """A local Ray cluster of 2 workers computes the same sums as one process (batches merge in order)."""
    pytest.importorskip("ray")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray actors use one thread each; same float32 forward here
    try:
        common = dict(model_dir=tiny_calib_model_dir, corpus=text_corpus, tokens=1024, window=128, presets=["sq3bit"])
        one = calibrate(CalibrationConfig(**common, out_dir=tmp_path / "one"))
        two = calibrate(CalibrationConfig(**common, out_dir=tmp_path / "two", num_workers=2))
    finally:
        torch.set_num_threads(threads)
    a, b = load_artifact(one.artifact), load_artifact(two.artifact)
    for name, t in a.bases.items():
        torch.testing.assert_close(b.bases[name], t, rtol=1e-6, atol=1e-7, msg=name)
    for name, t in a.presets["sq3bit"].items():
        torch.testing.assert_close(b.presets["sq3bit"][name], t, rtol=1e-6, atol=1e-7, msg=name)
    assert one.tokens == two.tokens


def test_ray_job_script(tmp_path, tiny_calib_model_dir, text_corpus):
    """calibration/job.py (what `ray job submit` runs) calls the library with a YAML config."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parent.parent
    cfg = tmp_path / "config.yaml"
    out = tmp_path / "art"
    cfg.write_text(yaml.safe_dump({"model_dir": str(tiny_calib_model_dir), "out_dir": str(out), "corpus": str(text_corpus),
                                   "tokens": 512, "window": 128, "presets": ["sq2_5bit"]}))
    run = subprocess.run([sys.executable, str(repo / "calibration" / "job.py"), "--config", str(cfg), "--ray-address", "local"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"artifact: {out}" in run.stdout
    load_artifact(out, expect=fingerprint_of(tiny_calib_model_dir))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_dir: x\nlearning_rate: 3\n")
    run = subprocess.run([sys.executable, str(repo / "calibration" / "job.py"), "--config", str(bad)], capture_output=True, text=True)
    assert run.returncode != 0 and "unknown options ['learning_rate']" in run.stderr


@pytest.mark.slow
def test_calibrate_smollm2(tmp_path, example_model_dir, capsys):
    """The real embedded model: keys are lower-rank than values, and every layer's codec is valid."""
    result = calibrate(CalibrationConfig(model_dir=example_model_dir, out_dir=tmp_path / "art", tokens=4096, presets=["sq2_5bit"]))
    art = load_artifact(result.artifact, expect=fingerprint_of(example_model_dir))
    assert art.manifest.corpus.max_position == 8192  # windows spread over the whole context
    k_eig, v_eig = art.bases["key.eigvals"].double(), art.bases["value.eigvals"].double()
    pr = lambda e: (e.sum(-1) ** 2 / (e**2).sum(-1)).mean().item()  # noqa: E731
    assert pr(k_eig) < pr(v_eig)
    for layer in range(30):
        art.layer_codec("sq2_5bit", layer)
    # SmolLM2 attends to sinks in mid-text (layers 3-10): those heads' value means are anchored, per preset.
    own, shared = art.presets["sq2_5bit"]["value.mean"], art.bases["value.mean"]
    moved = (own - shared).abs().amax(-1) > 0  # [L, H]
    assert 0 < int(moved.sum()) < moved.numel()
    layer, head = (int(i) for i in moved.nonzero()[0])
    assert torch.equal(art.layer_codec("sq2_5bit", layer).value.mean[head], own[layer, head])
    art.presets["sq2_5bit"].pop("value.mean")  # an artifact written before anchoring: the shared mean
    assert torch.equal(art.layer_codec("sq2_5bit", layer).value.mean[head], shared[layer, head])
    report = (result.artifact / "report.md").read_text()
    assert "SmolLM2-135M-Instruct" in report and "| 29 |" in report
    # The key gain is chosen by default, on the 4096 calibration tokens cut into 4 windows of 1024.
    assert art.manifest.preset("sq2_5bit").key_gain_chosen_on == 4
    assert "- `sq2_5bit`: gain " in report
    assert f"**Sink-anchored values**: {int(moved.sum())} of 90" in report
    assert cli(["example-model"]) == 0
    assert str(example_model_dir) in capsys.readouterr().out
