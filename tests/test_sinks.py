"""Attention-sink measurement at calibration, and the backend's default taken from it."""

import json
import shutil

import pytest
import torch

from vllm_spectralquant.artifact import load_artifact, read_manifest
from vllm_spectralquant.artifact.errors import ArtifactError
from vllm_spectralquant.backend.config import SpectralQuantConfig
from vllm_spectralquant.calibrate.sinks import (
    MAX_SINK_TOKENS,
    PROBE_POSITIONS,
    choose_sink_tokens,
    key_outlier_scores,
    sink_positions,
)


def _keys_with_sink(positions_by_window, t=64, h=2, d=16, seed=0):
    """Keys [B, T, H, D]: Gaussian tokens, plus one massive key at the given position of each window."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(len(positions_by_window), t, h, d, generator=g)
    for b, p in enumerate(positions_by_window):
        if p is not None:
            k[b, p, 1] += 40.0  # one head carries the sink, as in real models
    return k


def test_a_massive_key_is_found_where_it_is():
    scores = key_outlier_scores(_keys_with_sink([0, 1, None, 3]))
    is_sink = sink_positions(scores)
    assert is_sink.shape == (4, PROBE_POSITIONS)
    assert is_sink[0].nonzero().flatten().tolist() == [0]
    assert is_sink[1].nonzero().flatten().tolist() == [1]
    assert not is_sink[2].any()  # no sink: every leading token is ordinary
    assert is_sink[3].nonzero().flatten().tolist() == [3]


def test_choice_covers_every_sink_seen_within_bounds():
    none = torch.zeros(5, PROBE_POSITIONS, dtype=torch.bool)
    assert choose_sink_tokens(none) == 1  # never fewer than position 0
    at = none.clone()
    at[2, 1] = True  # one window of five sinks at position 1
    assert choose_sink_tokens(at) == 2
    last = none.clone()
    last[0, MAX_SINK_TOKENS - 1] = True
    assert choose_sink_tokens(last) == MAX_SINK_TOKENS
    late = none.clone()
    late[0, PROBE_POSITIONS - 1] = True  # beyond what can be kept exact: reported, not paid for
    assert choose_sink_tokens(late) == 1
    late[3, 1] = True
    assert choose_sink_tokens(late) == 2


def test_short_windows_probe_half_their_tokens():
    scores = key_outlier_scores(_keys_with_sink([1, None], t=6))
    is_sink = sink_positions(scores)
    assert is_sink.shape == (2, 3)
    assert bool(is_sink[0, 1]) and not bool(is_sink[0, 0])
    with pytest.raises(ValueError, match="at least 2"):
        sink_positions(torch.zeros(2, 1))


def test_calibration_records_sinks_and_serving_follows_them(tiny_artifact, tmp_path):
    m = read_manifest(tiny_artifact.artifact)
    assert m.sinks is not None and 1 <= m.sinks.tokens <= MAX_SINK_TOKENS
    assert len(m.sinks.share_by_position) == PROBE_POSITIONS
    assert "Attention sinks" in (tiny_artifact.artifact / "report.md").read_text()

    # The backend's default is the manifest's; an explicit option wins; an old artifact without the
    # field gets the preset's default.
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact.artifact, art)
    raw = json.loads((art / "manifest.json").read_text())
    raw["sinks"]["tokens"] = 3
    (art / "manifest.json").write_text(json.dumps(raw))
    SpectralQuantConfig.cache_clear()
    assert SpectralQuantConfig.from_cache_dtype("sq3bit", 32, artifact=art).sink_tokens == 3
    assert SpectralQuantConfig.from_cache_dtype("sq3bit", 32, artifact=art, sink_tokens=1).sink_tokens == 1
    assert SpectralQuantConfig.from_cache_dtype("sq3bit", 32, artifact=art).geometry(128, 0).sink_tokens == 3
    del raw["sinks"]
    (art / "manifest.json").write_text(json.dumps(raw))
    SpectralQuantConfig.cache_clear()
    assert SpectralQuantConfig.from_cache_dtype("sq3bit", 32, artifact=art).sink_tokens == 1
    assert load_artifact(art).manifest.sinks is None

    # A bad sinks entry is a manifest error that names the field.
    raw["sinks"] = {"tokens": 0, "share_by_position": [1.0]}
    (art / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="sinks"):
        read_manifest(art)
    SpectralQuantConfig.cache_clear()
