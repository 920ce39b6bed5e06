"""The artifact manifest (``manifest.json``), validated by pydantic.

The manifest names every file of the artifact with its sha256, the model it was calibrated for
(a fingerprint of its attention shape, RoPE, dtype and config.json), the corpus, and the presets.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vllm_spectralquant.format.params import GAIN_RANGE
from vllm_spectralquant.format.presets import PRESETS

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
BASES_FILE = "bases.safetensors"

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def preset_file(name: str) -> str:
    return f"preset-{name}.safetensors"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _plain(cls, v: str) -> str:
        # Only plain names inside the artifact folder (no "..", no sub-folders, no absolute paths).
        if not _PLAIN_NAME.match(v):
            raise ValueError(f"file path {v!r} must be a plain file name inside the artifact folder")
        return v


class ModelFingerprint(_Strict):
    """What identifies the model an artifact belongs to."""

    architecture: str
    model_type: str
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rope: dict[str, Any]
    dtype: str | None
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    config: dict[str, Any]

    @model_validator(mode="after")
    def _heads(self) -> ModelFingerprint:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return self


class CorpusInfo(_Strict):
    source: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tokens: int = Field(gt=0)
    window: int = Field(gt=1)
    max_position: int = Field(gt=1)
    skip_first_tokens: int = Field(ge=0)
    key_weight: float = Field(default=1.0, gt=0)  # bit-allocation weight of keys vs the cost model
    # Token every window starts with, as served sequences do (corpus.leading_special_token); None: running text.
    first_token_id: int | None = Field(default=None, ge=0)


class PresetEntry(_Strict):
    name: str
    slot_bytes: int = Field(gt=0)  # the preset's bytes per head-token: every layer's, or their mean
    #: Bytes per head-token of each layer when calibration spread the preset's bytes over the layers by
    #: measured attention error (their mean is at most ``slot_bytes``); absent: every layer has ``slot_bytes``.
    layer_slot_bytes: list[int] | None = Field(default=None, min_length=1)
    compression_vs_bf16: float = Field(gt=0)
    file: str
    key_rel_mse: float = Field(ge=0)
    value_rel_mse: float = Field(ge=0)
    #: The packed keys' decode gain (tensor ``key.gain`` of the preset file; calibrate/fit.py); 1: none,
    #: as in every artifact written before the gain existed.
    key_gain: float = Field(default=1.0, ge=GAIN_RANGE[0], le=GAIN_RANGE[1])
    #: Calibration windows the key gain was chosen on (calibrate/key_gain.py, the default); 0: set by
    #: ``--key-gain G``, or not chosen (windows too short, or an artifact from before 2026-12-06).
    key_gain_chosen_on: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _layer_slots_fit_the_mean(self) -> PresetEntry:
        slots = self.layer_slot_bytes
        if slots is not None and (min(slots) < 1 or sum(slots) > self.slot_bytes * len(slots)):
            raise ValueError(
                f"layer_slot_bytes of {self.name} must be positive with a mean of at most slot_bytes "
                f"({self.slot_bytes}), got mean {sum(slots) / len(slots):.2f}"
            )
        return self

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        p = PRESETS.get(v)
        if p is None or p.method != "spectralquant":
            known = ", ".join(n for n, q in PRESETS.items() if q.method == "spectralquant")
            raise ValueError(f"unknown SpectralQuant preset {v!r} (known: {known})")
        return v


class SinkInfo(_Strict):
    """Where the calibration windows put their attention sinks (vllm_spectralquant/calibrate/sinks.py)."""

    tokens: int = Field(ge=1, le=16)  # exact leading tokens the backend keeps by default
    share_by_position: list[float] = Field(min_length=1)  # fraction of windows with a sink at position 0, 1, ...

    @field_validator("share_by_position")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= x <= 1.0 for x in v):
            raise ValueError("share_by_position must hold fractions between 0 and 1")
        return v


class Manifest(_Strict):
    schema_version: Literal[1]
    format_version: int = Field(ge=1)
    package_version: str
    created: str
    model: ModelFingerprint
    corpus: CorpusInfo
    presets: list[PresetEntry] = Field(min_length=1)
    files: list[FileEntry] = Field(min_length=1)
    sinks: SinkInfo | None = None  # None: an artifact from before sinks were measured (the preset's default)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [p.name for p in self.presets]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate presets in {names}")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("duplicate file entries")
        for need in [BASES_FILE] + [p.file for p in self.presets]:
            if need not in paths:
                raise ValueError(f"file {need!r} is not listed in files")
        for p in self.presets:
            if p.file != preset_file(p.name):
                raise ValueError(f"preset {p.name} must be stored in {preset_file(p.name)!r}, not {p.file!r}")
            if p.layer_slot_bytes is not None and len(p.layer_slot_bytes) != self.model.num_layers:
                raise ValueError(
                    f"preset {p.name} lists {len(p.layer_slot_bytes)} layer_slot_bytes for a model of "
                    f"{self.model.num_layers} layers"
                )
        return self

    def preset(self, name: str) -> PresetEntry | None:
        return next((p for p in self.presets if p.name == name), None)
