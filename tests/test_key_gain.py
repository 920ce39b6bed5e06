"""The calibration-time key-gain choice (calibrate/key_gain.py: ``spectralquant calibrate``'s default, or ``--key-gain auto``)."""

from __future__ import annotations

import pytest
import torch

from vllm_spectralquant.artifact import fingerprint_of, load_artifact
from vllm_spectralquant.calibrate.errors import CalibrationError
from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate
from vllm_spectralquant.calibrate.key_gain import pick_gain, with_key_gain
from vllm_spectralquant.calibrate.served_prefill import ServedPrefill, served_loss
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
    all_sinks = served_loss(model, window, 0, ServedPrefill(plain, sink_tokens=300))
    assert all_sinks == pytest.approx(exact, rel=2e-3)
    packed = served_loss(model, window, 0, ServedPrefill(plain))
    gained = served_loss(model, window, 0, ServedPrefill(with_key_gain(codecs, 1.04)))
    assert packed != pytest.approx(exact, rel=1e-4) and gained != packed
    assert model.config._attn_implementation != "spectralquant_served_prefill"  # restored after each call


@pytest.mark.parametrize("t,window", [(300, None), (300, 100), (257, 128), (64, None)])
def test_chunked_prefill_attention_is_the_masked_attention(t, window):
    """One attention per chunk equals one attention over [stored | exact] columns with the serving mask:
    stored copies of the positions before the query's chunk, exact ones of its chunk up to itself, and
    (a sliding-window layer) nothing at or beyond ``window`` positions back; the stored-key bias included."""
    from vllm_spectralquant.calibrate.served_prefill import chunked_prefill_attention

    g = torch.Generator().manual_seed(t + (window or 0))
    q, k, v = (torch.randn(s, generator=g) for s in ((6, t, 16), (t, 2, 16), (t, 2, 16)))
    sk, sv = k + 0.3 * torch.randn(k.shape, generator=g), v + 0.3 * torch.randn(v.shape, generator=g)
    bias = torch.randn(6, t, t, generator=g)
    pos = torch.arange(t)
    start = (pos // 128) * 128
    near = torch.ones(t, t, dtype=torch.bool) if window is None else pos[None, :] > pos[:, None] - window
    mask = torch.cat([(pos[None, :] < start[:, None]) & near, (pos[None, :] <= pos[:, None]) & (pos[None, :] >= start[:, None]) & near], 1)
    keys, values = (torch.cat([a, b]).repeat_interleave(3, dim=1).transpose(0, 1) for a, b in ((sk, k), (sv, v)))
    for stored_bias in (None, bias):
        full = mask if stored_bias is None else torch.where(mask, torch.cat([bias, torch.zeros_like(bias)], -1), -torch.inf)
        want = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=full, scale=0.25)
        got = chunked_prefill_attention(q, sk, sv, k, v, 0.25, stored_bias=stored_bias, sliding_window=window)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_gain_windows_are_the_text_cut_again_from_position_zero():
    """The choice's windows are consecutive calibration text, cut into windows of the asked length,
    evenly spread in spread order; a leading special token (Gemma's BOS) starts each, and the ones that
    started the calibration windows are not part of the text."""
    from vllm_spectralquant.calibrate.job import gain_window_tokens, gain_windows

    text = torch.arange(4096)
    calib = text.view(8, 512)
    cut = gain_windows(calib, 16, 1024)
    assert cut.shape == (4, 1024) and [int(w[0]) for w in cut] == [0, 2048, 1024, 3072]
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 1024)) for w in cut)
    assert [int(w[0]) for w in gain_windows(calib, 2, 1024)] == [0, 3072]  # the first and the last
    bos = calib.clone()
    bos[:, 0] = -1
    with_bos = gain_windows(bos, 16, 1024, first_token=-1)
    assert with_bos.shape == (3, 1024) and bool((with_bos[:, 0] == -1).all()) and int((with_bos == -1).sum()) == 3
    assert int(with_bos[0, 511]) == 513  # 511 text tokens of the first window, then the second's from its index 1
    assert gain_window_tokens(CalibrationConfig(model_dir=".", tokens=16384)) == 1024
    assert gain_window_tokens(CalibrationConfig(model_dir=".", tokens=1024, window=256)) == 512  # two windows at least


def test_a_clear_loser_is_dropped_at_a_look(monkeypatch):
    """Every LOOK_EVERY windows a candidate worse than 1 by 2 SE stops being scored; a preset whose
    candidates are all dropped stops; the progress still adds up to every planned pass."""
    from vllm_spectralquant.calibrate import key_gain

    calls: list[float] = []

    def fake_loss(model, window, offset, served):
        [gain] = served.codecs  # the fake with_key_gain below: the gain stands for the codecs
        calls.append(gain)
        w = int(window[0])
        noise = 0.01 * ((w * 7) % 5 - 2)  # per window, the same for every gain (paired)
        return 3.0 + noise + {1.0: 0.0, 1.02: 0.02 + 0.001 * (w % 3), 1.04: -0.01 - 0.001 * (w % 2)}[gain]

    monkeypatch.setattr(key_gain, "with_key_gain", lambda codecs, gain: [gain])
    monkeypatch.setattr(key_gain, "served_loss", fake_loss)
    windows = torch.arange(12)[:, None].repeat(1, 200)  # window w: every token w
    ticks: list[int] = []
    chosen = key_gain.choose_key_gains(None, windows, [0] * 12, {"sq2_5bit": []}, progress=ticks.append)["sq2_5bit"]
    assert chosen.gain == 1.04 and [len(r) for r in chosen.loss] == [12, 4, 12]
    assert "1.02: +2.0" in chosen.describe() and "dropped after 4 windows" in chosen.describe()
    assert sum(ticks) == key_gain.choice_passes(12, 1) and len(calls) == 12 + 4 + 12

    calls.clear()
    monkeypatch.setattr(key_gain, "served_loss", lambda m, w, o, served: fake_loss(m, w, o, served) + 0.05 * (served.codecs[0] != 1.0))
    both_worse = key_gain.choose_key_gains(None, windows, [0] * 12, {"sq2_5bit": []}, progress=ticks.append)["sq2_5bit"]
    assert both_worse.gain == 1.0 and len(calls) == 3 * 4  # stopped at the first look
    assert "(stopped after 4 of 12 windows of 200 tokens;" in both_worse.describe() and both_worse.describe().count("dropped after 4 windows") == 2
    assert "(12 windows of 200 tokens;" in chosen.describe()
    never = key_gain.choose_key_gains(None, windows, [0] * 12, {"sq2_5bit": []}, look_every=0)["sq2_5bit"]
    assert [len(r) for r in never.loss] == [12, 12, 12]


def test_spread_order_spreads_every_prefix():
    from vllm_spectralquant.calibrate.key_gain import spread_order

    for n in (1, 2, 5, 16, 23):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
    assert spread_order(16)[:4] == [0, 8, 4, 12]


def test_key_gain_is_chosen_by_default(tmp_path, tiny_calib_model_dir, text_corpus, caplog):
    """By default calibration chooses each preset's gain and records it in the manifest and the report;
    the codes are those of ``--key-gain 1``. Windows too short for a packed chunk keep gain 1 by default
    (with a warning), and ``--key-gain auto`` refuses them up front."""
    out, none = tmp_path / "auto", tmp_path / "none"
    for path, gain in ((out, []), (none, ["--key-gain", "1"])):
        rc = cli(["calibrate", str(tiny_calib_model_dir), "--corpus", str(text_corpus), "--tokens", "1024", "--window",
                  "256", "--out", str(path), "--quiet", "--presets", "sq2_5bit", "sq4bit", *gain])
        assert rc == 0
    art = load_artifact(out, expect=fingerprint_of(tiny_calib_model_dir))
    ref = load_artifact(none)
    report = (out / "report.md").read_text()
    assert "chosen by the served loss of calibration windows" in report
    for name in ("sq2_5bit", "sq4bit"):
        gain = art.manifest.preset(name).key_gain
        assert gain in (1.0, 1.02, 1.04)
        assert art.manifest.preset(name).key_gain_chosen_on == 2  # 1024 tokens cut into 2 windows of 512
        assert ref.manifest.preset(name).key_gain_chosen_on == 0
        assert f"- `{name}`: gain {gain:g} (2 windows of 512 tokens; loss vs 1" in report
        assert ("key.gain" in art.presets[name]) == (gain != 1.0)
        assert torch.equal(art.presets[name]["key.codebooks"], ref.presets[name]["key.codebooks"])
        assert torch.equal(art.presets[name]["key.bits"], ref.presets[name]["key.bits"])
    with caplog.at_level("WARNING"):
        short = calibrate(CalibrationConfig(model_dir=tiny_calib_model_dir, corpus=text_corpus, tokens=256, window=128,
                                            out_dir=tmp_path / "short-default", presets=["sq4bit"]))
    assert "key gains not chosen: windows of 128 tokens" in caplog.text
    assert load_artifact(short.artifact).manifest.preset("sq4bit").key_gain_chosen_on == 0
    with pytest.raises(CalibrationError, match=r"--key-gain auto .* half of --tokens above 129 \(got 1024 and 256\)"):
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


def test_progress_counts_tokens_and_choice_passes_apart(tmp_path, tiny_calib_model_dir, text_corpus):
    """Collection reports calibration tokens (its total is what the corpus gives, nothing else) and the
    choice its forward passes, each ending at its total."""
    from vllm_spectralquant.calibrate.key_gain import choice_passes

    tokens, choice = [], []
    calibrate(CalibrationConfig(model_dir=tiny_calib_model_dir, corpus=text_corpus, tokens=1024, window=256,
                                out_dir=tmp_path / "a", presets=["sq4bit"]),
              progress=lambda d, t: tokens.append((d, t)), gain_progress=lambda d, t: choice.append((d, t)))
    assert tokens[-1] == (4 * 255, 4 * 255)  # 4 windows, the first token of each left out
    # the choice: those 1024 tokens cut into 2 windows of 512
    assert choice[-1] == (choice_passes(2, 1), choice_passes(2, 1))
    assert all(t == choice_passes(2, 1) for _, t in choice) and len(choice) <= choice_passes(2, 1) + 1
