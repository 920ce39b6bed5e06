"""The calibration-time key-gain choice (calibrate/key_gain.py, ``spectralquant calibrate --key-gain auto``)."""

from __future__ import annotations

import pytest
import torch

from vllm_spectralquant.artifact import fingerprint_of, load_artifact
from vllm_spectralquant.calibrate.errors import CalibrationError
from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate
from vllm_spectralquant.calibrate.key_gain import ServedPrefill, pick_gain, served_loss, with_key_gain
from vllm_spectralquant.cli import main as cli
from vllm_spectralquant.models.capture import load_model


def test_a_gain_must_beat_one_by_two_standard_errors():
    """Lower mean loss alone is not enough: the paired difference must exceed 2 standard errors."""
    base = [3.0, 3.2, 2.9, 3.1]
    clear = [x - 0.02 + 0.001 * i for i, x in enumerate(base)]  # -0.0185 +- 0.0006
    noisy = [x + d for x, d in zip(base, [-0.05, 0.04, -0.05, 0.03])]  # -0.0075 +- 0.023
    assert pick_gain((1.0, 1.02, 1.04), [base, noisy, clear]).gain == 1.04
    assert pick_gain((1.0, 1.02), [base, noisy]).gain == 1.0
    worse = [x + 0.01 for x in base]
    assert pick_gain((1.0, 1.02), [base, worse]).gain == 1.0
    assert "1.02: +1.00 ± 0.00" in pick_gain((1.0, 1.02), [base, worse]).describe()


def test_served_prefill_with_every_token_exact_is_the_model(tiny_artifact, tiny_calib_model_dir):
    """With every position a sink (kept exact in bf16), the served loss is the model's own loss up to bf16
    rounding; with packed keys it moves, and a gain moves it again."""
    model, _ = load_model(tiny_calib_model_dir, dtype=torch.float32)
    art = load_artifact(tiny_artifact.artifact)
    codecs = [art.layer_codec("sq2_5bit", i) for i in range(3)]
    window = torch.randint(0, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=window[None], use_cache=False).logits[0]
    lp = torch.log_softmax(logits[128:-1], -1)
    exact = float(-lp.gather(1, window[129:, None]).mean())
    plain = with_key_gain(codecs, 1.0)
    all_sinks = served_loss(model, window, 0, ServedPrefill(plain, 1.0, sink_tokens=300))
    assert all_sinks == pytest.approx(exact, rel=2e-3)
    packed = served_loss(model, window, 0, ServedPrefill(plain, 1.0))
    gained = served_loss(model, window, 0, ServedPrefill(plain, 1.04))
    assert packed != pytest.approx(exact, rel=1e-4) and gained != packed
    assert model.config._attn_implementation != "spectralquant_served_prefill"  # restored after each call


def test_key_gain_auto_records_the_choice(tmp_path, tiny_calib_model_dir, text_corpus):
    """``--key-gain auto`` writes each preset's chosen gain into the manifest and the report; the codes
    are those of ``--key-gain 1``; windows too short for a packed chunk are refused up front."""
    out, none = tmp_path / "auto", tmp_path / "none"
    for path, gain in ((out, "auto"), (none, "1")):
        rc = cli(["calibrate", str(tiny_calib_model_dir), "--corpus", str(text_corpus), "--tokens", "1024", "--window",
                  "256", "--out", str(path), "--quiet", "--presets", "sq2_5bit", "sq4bit", "--key-gain", gain])
        assert rc == 0
    art = load_artifact(out, expect=fingerprint_of(tiny_calib_model_dir))
    ref = load_artifact(none)
    report = (out / "report.md").read_text()
    assert "chosen by the served loss of calibration windows" in report
    for name in ("sq2_5bit", "sq4bit"):
        gain = art.manifest.preset(name).key_gain
        assert gain in (1.0, 1.02, 1.04)
        assert f"- `{name}`: gain {gain:g} (loss vs 1" in report
        assert ("key.gain" in art.presets[name]) == (gain != 1.0)
        assert torch.equal(art.presets[name]["key.codebooks"], ref.presets[name]["key.codebooks"])
        assert torch.equal(art.presets[name]["key.bits"], ref.presets[name]["key.bits"])
    with pytest.raises(CalibrationError, match=r"--key-gain auto .* needs --window above 129 \(got 128\)"):
        calibrate(CalibrationConfig(model_dir=tiny_calib_model_dir, corpus=text_corpus, tokens=256, window=128,
                                    out_dir=tmp_path / "short", key_gain="auto"))
    with pytest.raises(CalibrationError, match="--key-gain-windows must be at least 2"):
        calibrate(CalibrationConfig(model_dir=tiny_calib_model_dir, corpus=text_corpus, tokens=1024, window=256,
                                    out_dir=tmp_path / "one", key_gain="auto", key_gain_windows=1))
    assert not (tmp_path / "short").exists() and not (tmp_path / "one").exists()


def test_key_gain_option_text(capsys, tiny_calib_model_dir):
    with pytest.raises(SystemExit):
        cli(["calibrate", str(tiny_calib_model_dir), "--key-gain", "sharp"])
    assert "expected a number or 'auto', got 'sharp'" in capsys.readouterr().err
