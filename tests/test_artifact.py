"""Artifact loading refuses every kind of damage with a message that names it."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vllm_spectralquant.artifact import ArtifactError, fingerprint_of, load_artifact, read_manifest
from vllm_spectralquant.artifact.fingerprint import fingerprint
from vllm_spectralquant.artifact.store import file_sha256


@pytest.fixture
def artifact_copy(tiny_artifact, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_artifact.artifact, dst)
    return dst


def _rewrite_manifest(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def _refresh_checksum(path, name):
    def change(m):
        for f in m["files"]:
            if f["path"] == name:
                f["sha256"] = file_sha256(path / name)
                f["bytes"] = (path / name).stat().st_size

    _rewrite_manifest(path, change)


def test_flipped_byte_is_a_checksum_mismatch(artifact_copy):
    f = artifact_copy / "preset-sq3bit.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for .*preset-sq3bit.safetensors"):
        load_artifact(artifact_copy)


def test_truncated_safetensors(artifact_copy):
    f = artifact_copy / "bases.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="bases.safetensors has 1000 bytes.*truncated"):
        load_artifact(artifact_copy)
    # Even with a manifest that agrees, the file itself is unreadable.
    _refresh_checksum(artifact_copy, "bases.safetensors")
    with pytest.raises(ArtifactError, match="cannot read .*bases.safetensors"):
        load_artifact(artifact_copy)


def test_manifest_of_another_model(artifact_copy, tiny_calib_model_dir):
    cfg = json.loads((tiny_calib_model_dir / "config.json").read_text())
    other = fingerprint(dict(cfg, num_hidden_layers=5, rope_theta=500000.0))
    with pytest.raises(ArtifactError, match=r"different model.*num_layers: artifact has 3, model has 5.*rope"):
        load_artifact(artifact_copy, expect=other)
    same_shape = fingerprint(dict(cfg, rms_norm_eps=1e-3))
    with pytest.raises(ArtifactError, match=r"config.json differs in rms_norm_eps"):
        load_artifact(artifact_copy, expect=same_shape)
    load_artifact(artifact_copy, expect=fingerprint_of(tiny_calib_model_dir))  # the right model is fine


def test_missing_preset(artifact_copy):
    with pytest.raises(ArtifactError, match="preset sq9 is not in the artifact"):
        load_artifact(artifact_copy, presets=["sq9"])
    (artifact_copy / "preset-sq4bit.safetensors").unlink()
    with pytest.raises(ArtifactError, match="preset-sq4bit.safetensors is missing"):
        load_artifact(artifact_copy, presets=["sq4bit"])
    load_artifact(artifact_copy, presets=["sq3bit"])  # the others still load


def test_nan_and_inf_tensors(artifact_copy):
    f = artifact_copy / "bases.safetensors"
    tensors = load_file(f)
    tensors["value.scale"][1, 0, 3] = float("inf")
    save_file(tensors, f)
    _refresh_checksum(artifact_copy, "bases.safetensors")
    with pytest.raises(ArtifactError, match="'value.scale' contains NaN or inf"):
        load_artifact(artifact_copy)


def test_wrong_shapes_and_bad_parameters(artifact_copy):
    f = artifact_copy / "preset-sq3bit.safetensors"
    tensors = load_file(f)
    tensors["key.bits"] = torch.full_like(tensors["key.bits"], 8)  # far over the byte budget
    save_file(tensors, f)
    _refresh_checksum(artifact_copy, f.name)
    art = load_artifact(artifact_copy)
    with pytest.raises(ArtifactError, match="preset sq3bit, layer 0: bit allocation needs"):
        art.layer_codec("sq3bit", 0)
    tensors["key.bits"] = tensors["key.bits"][:, :1].contiguous()
    save_file(tensors, f)
    _refresh_checksum(artifact_copy, f.name)
    with pytest.raises(ArtifactError, match="'key.bits' has shape"):
        load_artifact(artifact_copy)


def test_versions_and_missing_manifest(artifact_copy, tmp_path):
    _rewrite_manifest(artifact_copy, lambda m: m.update(format_version=99))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_artifact(artifact_copy)
    _rewrite_manifest(artifact_copy, lambda m: m.update(schema_version=2))
    with pytest.raises(ArtifactError, match="schema_version 2"):
        load_artifact(artifact_copy)
    (artifact_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(artifact_copy)
    with pytest.raises(ArtifactError, match="no SpectralQuant artifact at .*nowhere.*spectralquant calibrate"):
        load_artifact(tmp_path / "nowhere")


def test_manifest_paths_cannot_escape(artifact_copy):
    _rewrite_manifest(artifact_copy, lambda m: m["files"].append({"path": "../evil", "sha256": "0" * 64, "bytes": 1}))
    with pytest.raises(ArtifactError, match="must be a plain file name"):
        read_manifest(artifact_copy)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_only_ever_raise_artifact_error(tiny_artifact, tmp_path_factory, data):
    """Random edits of a valid manifest (values replaced, keys dropped, garbage bytes) -> ArtifactError or success."""
    src = json.loads((tiny_artifact.artifact / "manifest.json").read_text())
    path = tmp_path_factory.mktemp("fuzz")
    mode = data.draw(st.sampled_from(["replace", "drop", "bytes"]))
    if mode == "bytes":
        raw = data.draw(st.binary(max_size=200))
        (path / "manifest.json").write_bytes(raw)
    else:
        doc = json.loads(json.dumps(src))
        target = doc
        keys = data.draw(st.lists(st.sampled_from(["model", "corpus", "presets", "files", "schema_version", "format_version", "created"]), min_size=1, max_size=1))
        key = keys[0]
        if mode == "drop":
            target.pop(key, None)
        else:
            target[key] = data.draw(_json)
        (path / "manifest.json").write_text(json.dumps(doc))
    try:
        read_manifest(path)
    except ArtifactError:
        pass


def test_layer_slot_sizes_are_checked(artifact_copy):
    """Per-layer slot sizes: the count must be the model's layers, the mean at most the preset's, and every
    layer's codes must fit its own slot."""

    def set_slots(slots):
        def change(m):
            next(p for p in m["presets"] if p["name"] == "sq3bit")["layer_slot_bytes"] = slots

        return change

    slot = read_manifest(artifact_copy).preset("sq3bit").slot_bytes
    good = read_manifest(artifact_copy).preset("sq3bit").layer_slot_bytes
    _rewrite_manifest(artifact_copy, set_slots([slot, slot]))
    with pytest.raises(ArtifactError, match="lists 2 layer_slot_bytes for a model of 3 layers"):
        read_manifest(artifact_copy)
    _rewrite_manifest(artifact_copy, set_slots([slot + 1] * 3))
    with pytest.raises(ArtifactError, match="mean of at most slot_bytes"):
        read_manifest(artifact_copy)
    # Shrink the layer whose codes use the most bytes: its codes no longer fit.
    widest = max(range(3), key=lambda i: good[i])
    smaller = list(good)
    smaller[widest] -= 4
    _rewrite_manifest(artifact_copy, set_slots(smaller))
    with pytest.raises(ArtifactError, match=f"layer {widest}: bit allocation needs .* in this layer's"):
        load_artifact(artifact_copy).layer_codec("sq3bit", widest)


def test_key_gain_is_recorded_loaded_and_checked(artifact_copy):
    """Calibration writes each preset's key decode gain as a tensor and in the manifest; loading uses it
    for decoding only and refuses a tensor and a manifest that disagree, or a gain out of range."""
    from conftest import TINY_KEY_GAIN

    art = load_artifact(artifact_copy)
    assert art.manifest.preset("sq3bit").key_gain == TINY_KEY_GAIN
    codec = art.layer_codec("sq3bit", 1)
    torch.testing.assert_close(codec.key.decode_scale, codec.key.scale * TINY_KEY_GAIN)
    assert codec.value.gain is None

    f = artifact_copy / "preset-sq3bit.safetensors"
    tensors = load_file(f)
    tensors["key.gain"] = tensors["key.gain"] * 1.01
    save_file(tensors, f)
    _refresh_checksum(artifact_copy, f.name)
    with pytest.raises(ArtifactError, match="'key.gain' has mean .* but the manifest records key_gain"):
        load_artifact(artifact_copy)
    del tensors["key.gain"]
    save_file(tensors, f)
    _refresh_checksum(artifact_copy, f.name)
    with pytest.raises(ArtifactError, match="lacks tensor 'key.gain' but the manifest records"):
        load_artifact(artifact_copy)

    def gain(value):
        def change(m):
            next(p for p in m["presets"] if p["name"] == "sq3bit")["key_gain"] = value

        return change

    _rewrite_manifest(artifact_copy, gain(1.0))  # an artifact from before the gain: no tensor, gain 1
    assert load_artifact(artifact_copy).layer_codec("sq3bit", 0).key.gain is None
    _rewrite_manifest(artifact_copy, gain(5.0))
    with pytest.raises(ArtifactError, match="key_gain"):
        read_manifest(artifact_copy)
