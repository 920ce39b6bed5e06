"""Package-wide structure: one base exception, one model-shape reader, configuration errors of their own."""

import pytest

from vllm_spectralquant.errors import SpectralQuantError


def test_every_package_error_derives_from_spectralquant_error():
    from vllm_spectralquant.artifact.errors import ArtifactError
    from vllm_spectralquant.calibrate.errors import CalibrationError
    from vllm_spectralquant.corpus import CorpusError
    from vllm_spectralquant.evaluation.run import EvalError
    from vllm_spectralquant.files import PackageFileMissing
    from vllm_spectralquant.format.errors import FormatError
    from vllm_spectralquant.models.errors import ModelError

    from vllm_spectralquant.backend.config import ServingConfigError
    from vllm_spectralquant.extras import MissingExtraError

    for cls in (ArtifactError, CalibrationError, CorpusError, EvalError, FormatError, ModelError, PackageFileMissing,
                ServingConfigError, MissingExtraError):
        assert issubclass(cls, SpectralQuantError), cls
    for cls in (ArtifactError, CalibrationError, CorpusError, FormatError, ModelError):
        assert issubclass(cls, ValueError), cls  # as before the base existed


# ---- ModelShape: the one reader of model shapes ----


def _gemma3_like_dir(tmp_path, **overrides):
    """A small Gemma3-like text model folder: 5 of 6 layers use a 64-token sliding window."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_hidden_layers=6, vocab_size=256, max_position_embeddings=1024, sliding_window=64, **overrides,
    )
    path = tmp_path / "gemma3-like"
    config.save_pretrained(path)
    return path


def test_model_shape_from_configs(tmp_path):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from vllm_spectralquant.models.shape import ModelShape

    llama = LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                        max_position_embeddings=1024)
    for source in (llama, llama.to_dict(), {"text_config": llama.to_dict()}):  # object, config.json, multimodal
        shape = ModelShape.from_config(source)
        assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.max_context) == (3, 4, 2, 32, 1024)
        assert shape.layer_types == ("full_attention",) * 3 and shape.sliding_window is None
        assert shape.serving_refusal() is None
    assert ModelShape.from_config({"num_attention_heads": 2, "num_hidden_layers": 1, "hidden_size": 64, "n_positions": 77}).max_context == 77
    assert ModelShape.from_config(Qwen2Config(sliding_window=4096, use_sliding_window=False)).serving_refusal() is None
    mistral = ModelShape.from_config(MistralConfig(sliding_window=4096, num_hidden_layers=2).to_dict())
    assert mistral.layer_types == ("sliding_attention",) * 2 and mistral.layer_sliding_window(1) == 4096
    gemma = ModelShape.from_model_dir(_gemma3_like_dir(tmp_path))
    assert gemma.layer_types.count("sliding_attention") == 5 and gemma.layer_sliding_window(5) is None
    assert gemma.serving_refusal() is None  # sliding-window layers are served over the packed cache
    assert gemma.softmax_scale == gemma.query_pre_attn_scalar**-0.5
    capped = ModelShape.from_model_dir(_gemma3_like_dir(tmp_path / "capped", attn_logit_softcapping=50.0))
    assert capped.serving_refusal() == (
        "SpectralQuant KV cache does not support logits soft-capping (attn_logit_softcapping=50.0)"
    )
    from vllm_spectralquant.models.errors import ModelError

    with pytest.raises(ModelError, match="lacks the attention shape"):
        ModelShape.from_config({"hidden_size": 64})


def test_calibrate_refuses_a_model_the_backend_cannot_serve_before_loading_it(tmp_path, monkeypatch, text_corpus):
    """Soft-capped attention calibrates fine but cannot be served: refused up front, with the backend's words."""
    import vllm_spectralquant.models.capture as capture
    from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate
    from vllm_spectralquant.models.errors import ModelError
    from vllm_spectralquant.models.shape import ModelShape

    model = _gemma3_like_dir(tmp_path, attn_logit_softcapping=50.0)
    monkeypatch.setattr(capture, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(ModelError) as err:
        calibrate(CalibrationConfig(model_dir=model, corpus=text_corpus, tokens=256, window=128))
    assert str(err.value) == ModelShape.from_model_dir(model).serving_refusal()
    assert "logits soft-capping" in str(err.value)
    assert not (model / "spectralquant").exists()


def test_artifact_files_follow_the_schema_the_reader_checks(tiny_artifact):
    from safetensors import safe_open

    from vllm_spectralquant.artifact import load_artifact
    from vllm_spectralquant.artifact.schema import bases_schema, preset_optional_schema, preset_schema

    art = load_artifact(tiny_artifact.artifact)
    m = art.model
    dims = (m.num_layers, m.num_kv_heads, m.head_dim)
    with safe_open(str(art.path / "bases.safetensors"), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == bases_schema(*dims)
    for p in art.manifest.presets:
        with safe_open(str(art.path / p.file), "pt") as f:
            # The writer always writes the optional tensors too (readers accept artifacts without them).
            assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {**preset_schema(*dims), **preset_optional_schema(*dims)}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--key-weight", "-1"], "--key-weight must be positive, got -1.0"),
        (["--key-weight", "0"], "--key-weight must be positive"),
        (["--window", "1"], "the window at least 2"),
        (["--tokens", "64", "--window", "128"], r"--tokens \(64\) must be at least the window \(128\)"),
        (["--num-workers", "0"], "--num-workers must be at least 1"),
        (["--max-position", "100000"], "exceeds the model's context"),
        (["--max-position", "64"], "is smaller than the window"),
    ],
)
def test_calibrate_cli_arguments_are_checked_before_the_model_loads(args, message, tiny_calib_model_dir, tmp_path, monkeypatch, capsys):
    import re

    import vllm_spectralquant.models.capture as capture
    from vllm_spectralquant.cli import main as cli

    monkeypatch.setattr(capture, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    rc = cli(["calibrate", str(tiny_calib_model_dir), "--out", str(tmp_path / "art"), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not (tmp_path / "art").exists()


def test_missing_calibrate_extra_is_named_before_the_model_loads(tiny_calib_model_dir, tmp_path, monkeypatch, capsys):
    import sys

    import vllm_spectralquant.models.capture as capture
    from vllm_spectralquant.cli import main as cli

    monkeypatch.setattr(capture, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)
        rc = cli(["calibrate", str(tiny_calib_model_dir), "--out", str(tmp_path / "art"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "matplotlib" in err and 'pip install "vllm-spectralquant[calibrate]"' in err, err
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)
        rc = cli(["calibrate", str(tiny_calib_model_dir), "--out", str(tmp_path / "art"), "--quiet", "--num-workers", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "ray (--num-workers / --ray-address)" in err and "[calibrate]" in err, err
