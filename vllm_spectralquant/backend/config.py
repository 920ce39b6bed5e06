"""The serving configuration: what a kv-cache dtype and head size mean for this run, derived purely.

``SpectralQuantConfig.from_cache_dtype(cache_dtype, head_size, sink_tokens=..., artifact=..., model=...)``
returns the preset, the sink policy (hence the cache geometry of any block size) and, for SpectralQuant
presets, the artifact binding (which artifact, verified against which model). It is a function of its
arguments, cached by them, like vLLM's ``TurboQuantConfig.from_cache_dtype``; nothing is recorded as a
side effect. ``SpectralQuantConfig.from_vllm_config`` reads those arguments from vLLM's config (the
``--additional-config '{"spectralquant": {"artifact": DIR, "sink_tokens": N}}'`` options, the model;
``sink_tokens`` defaults to what calibration measured, ``manifest.sinks``),
and the cache spec and the attention impl both derive what they need from it, in any order:

* ``SpectralQuantBackend.customize_spec`` needs the geometry only (no artifact is loaded);
* ``SpectralQuantImpl`` loads and verifies the artifact at startup (``load_artifact``, cached by binding)
  and keeps its layer's codec on itself.

vLLM calls ``customize_spec`` with the spec alone, and in the worker's ``get_kv_cache_spec`` no vLLM
config is current. There, :meth:`SpectralQuantConfig.for_spec` takes the configs already derived in
this process for the spec's head size (the impls of the model were built before), which must agree.

Tests isolate themselves with :meth:`SpectralQuantConfig.cache_clear`.
This module imports vLLM only inside :meth:`SpectralQuantConfig.for_spec` and the TP helper.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_spectralquant.artifact import Artifact, ArtifactError, default_artifact_dir, load_artifact, read_manifest
from vllm_spectralquant.artifact.fingerprint import fingerprint, read_config
from vllm_spectralquant.artifact.manifest import ModelFingerprint
from vllm_spectralquant.errors import SpectralQuantError
from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.format.presets import Preset, check_head_dim, get_preset
from vllm_spectralquant.format.turboquant import turboquant_codec
from vllm_spectralquant.models.shape import ModelShape

logger = logging.getLogger("vllm.spectralquant")  # under "vllm": shown by vLLM's log handlers

CONFIG_KEY = "spectralquant"
KNOWN_OPTIONS = {"artifact", "sink_tokens"}


class ServingConfigError(SpectralQuantError, ValueError):
    """A serving configuration the backend cannot use (options, dtype, missing artifact location); the message names the fix."""


@dataclass(frozen=True)
class ServedModel:
    """The model vLLM serves: its shape and fingerprint, and its folder when it is a local one.

    Compared and hashed by name, folder and config digest (a cache key); shape and fingerprint follow from them.
    """

    name: str
    model_dir: Path | None
    config_sha256: str
    shape: ModelShape = field(compare=False)
    fingerprint: ModelFingerprint = field(compare=False, repr=False)

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any], model_dir: Path | None = None) -> ServedModel:
        fp = fingerprint(config)
        return cls(name, model_dir, fp.config_sha256, ModelShape.from_config(config), fp)


@dataclass(frozen=True)
class ArtifactBinding:
    """Which artifact a SpectralQuant preset is served from, and the model it must have been calibrated for."""

    path: Path
    preset: str
    model: ServedModel | None  # None: load without comparing fingerprints


@dataclass(frozen=True)
class SpectralQuantConfig:
    """One kv-cache dtype at one head size: preset, sink policy and (SpectralQuant) artifact binding."""

    preset: Preset
    head_size: int
    sink_tokens: int
    artifact: ArtifactBinding | None  # None for the TurboQuant layout (no calibration)
    #: Bytes per head-token of each layer when calibration spread the preset's bytes over the layers
    #: (``manifest.presets[].layer_slot_bytes``); None: every layer has the preset's.
    layer_slot_bytes: tuple[int, ...] | None = None

    # ------------------------------------------------------------------------------------ deriving

    @classmethod
    def from_cache_dtype(
        cls,
        cache_dtype: str,
        head_size: int,
        *,
        sink_tokens: int | None = None,
        artifact: str | Path | None = None,
        model: ServedModel | None = None,
    ) -> SpectralQuantConfig:
        """The configuration of ``cache_dtype`` (``spectralquant_sq3bit`` or ``sq3bit``) at ``head_size``.

        ``artifact`` defaults to ``MODEL_DIR/spectralquant`` of a local ``model``. Cached by the arguments.
        """
        key = (cache_dtype, head_size, sink_tokens, None if artifact is None else str(artifact), model)
        with _lock:
            hit = _configs.get(key)
        if hit is not None:
            return hit
        preset = get_preset(cache_dtype)
        check_head_dim(head_size, preset.method)
        binding = None
        if preset.method == "spectralquant":
            if artifact is not None:
                path = Path(os.path.expanduser(str(artifact)))
            elif model is not None and model.model_dir is not None:
                path = default_artifact_dir(model.model_dir)
            else:
                where = f"model {model.name} is not a local folder" if model is not None else "no model folder given"
                raise ServingConfigError(
                    f"{preset.kv_cache_dtype} needs a calibration artifact: pass --additional-config "
                    f'\'{{"{CONFIG_KEY}": {{"artifact": "DIR"}}}}\' ({where})'
                )
            binding = ArtifactBinding(path, preset.name, model)
        calibrated_sinks, layer_slots = (preset.sink_tokens, None) if binding is None else calibrated_layout(binding.path, preset)
        if sink_tokens is None:
            sink_tokens = calibrated_sinks
        config = cls(preset, head_size, int(sink_tokens), binding, layer_slots)
        with _lock:
            new = key not in _configs
            config = _configs.setdefault(key, config)
        if new:
            logger.info("SpectralQuant backend: %s", config.describe())
        return config

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, head_size: int, cache_dtype: str | None = None) -> SpectralQuantConfig:
        """The configuration for this run: options from ``--additional-config``, the model from vLLM's model config."""
        opts = serving_options(vllm_config)
        if cache_dtype is None:
            cache_dtype = vllm_config.cache_config.cache_dtype
        return cls.from_cache_dtype(
            cache_dtype,
            head_size,
            sink_tokens=opts.get("sink_tokens"),
            artifact=opts.get("artifact"),
            model=served_model(vllm_config.model_config),
        )

    @classmethod
    def for_spec(cls, head_size: int) -> SpectralQuantConfig:
        """The configuration behind a cache spec (vLLM passes ``customize_spec`` the spec alone).

        From vLLM's current config when there is one that names a SpectralQuant dtype; else from the
        configurations already derived in this process for ``head_size``, whose geometries must agree.
        """
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        cache_dtype = getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", None)
        if isinstance(cache_dtype, str) and cache_dtype.startswith("spectralquant_"):
            return cls.from_vllm_config(vllm_config, head_size)
        with _lock:
            known = [c for c in _configs.values() if c.head_size == head_size]
        layouts = {(c.preset.slot_bytes(head_size), c.layer_slot_bytes, c.sink_tokens) for c in known}  # what pages depend on
        if len(layouts) > 1:
            names = sorted({c.preset.kv_cache_dtype for c in known})
            raise ServingConfigError(f"layers of head size {head_size} ask for different SpectralQuant caches {names}; use one kv-cache dtype")
        if not known:
            raise ServingConfigError(
                f"no SpectralQuant configuration for head size {head_size}: vLLM's config is not current and no "
                "SpectralQuant attention layer was built in this process"
            )
        return known[0]

    @staticmethod
    def cache_clear() -> None:
        """Forget every derived configuration, loaded artifact and served-model record (tests use it)."""
        with _lock:
            _configs.clear()
            _artifacts.clear()
            _models.clear()

    # ------------------------------------------------------------------------------------ using

    def slot_bytes(self, layer: int | None) -> int:
        """Bytes per head-token of ``layer``'s slots (None: a layer the caller cannot name)."""
        if self.layer_slot_bytes is None:
            return self.preset.slot_bytes(self.head_size)
        if layer is None:
            raise ServingConfigError(
                f"the artifact of {self.preset.kv_cache_dtype} gives each layer its own slot size "
                f"({min(self.layer_slot_bytes)}..{max(self.layer_slot_bytes)} B), and vLLM asked for the page "
                "size of a layer it did not name; recalibrate without --layer-budgets for this setup"
            )
        if not 0 <= layer < len(self.layer_slot_bytes):
            raise ServingConfigError(
                f"layer {layer} is outside the artifact's {len(self.layer_slot_bytes)} layers ({self.artifact.path})"
            )
        return self.layer_slot_bytes[layer]

    def geometry(self, block_size: int, layer: int | None = None) -> CacheGeometry:
        """The page geometry of ``layer`` (any layer, when every layer has the preset's slot size)."""
        return CacheGeometry(self.head_size, self.slot_bytes(layer), block_size, self.sink_tokens)

    def mean_slot_bytes(self) -> float:
        """Bytes per head-token averaged over the layers (what capacity follows)."""
        slots = self.layer_slot_bytes
        return self.preset.slot_bytes(self.head_size) if slots is None else sum(slots) / len(slots)

    def load_artifact(self) -> Artifact | None:
        """The verified artifact (None for the TurboQuant layout); loaded once per binding."""
        if self.artifact is None:
            return None
        b = self.artifact
        with _lock:
            hit = _artifacts.get(b)
        if hit is not None:
            return hit
        art = load_artifact(b.path, expect=None if b.model is None else b.model.fingerprint, presets=[b.preset])
        logger.info("SpectralQuant: loaded artifact %s (preset %s, %d layers)", b.path, b.preset, art.model.num_layers)
        with _lock:
            return _artifacts.setdefault(b, art)

    def layer_codec(self, layer: int, num_kv_heads: int, kv_head_offset: int = 0) -> LayerCodec:
        """The codec of ``layer`` for KV heads ``kv_head_offset .. + num_kv_heads`` (a tensor-parallel rank's)."""
        art = self.load_artifact()
        if art is None:
            return turboquant_codec(self.preset, self.head_size, num_kv_heads)
        return art.layer_codec(self.preset.name, layer, slice(kv_head_offset, kv_head_offset + num_kv_heads))

    def describe(self) -> str:
        slots = self.layer_slot_bytes
        size = (
            f"{self.preset.slot_bytes(self.head_size)} B per head-token"
            if slots is None
            else f"{self.mean_slot_bytes():.2f} B per head-token on average (layers {min(slots)}..{max(slots)} B)"
        )
        return f"{self.preset.kv_cache_dtype} ({self.preset.method} layout), {size} + exact sink tokens: {self.sink_tokens}"


_lock = threading.Lock()
_configs: dict[tuple, SpectralQuantConfig] = {}
_artifacts: dict[ArtifactBinding, Artifact] = {}
_models: dict[str, ServedModel] = {}


def calibrated_layout(artifact: Path, preset: Preset) -> tuple[int, tuple[int, ...] | None]:
    """What the artifact's calibration measured for the page layout: (exact leading tokens, each
    layer's slot bytes or None), from ``manifest.sinks`` and the preset's ``layer_slot_bytes``.

    An unreadable manifest falls back to the preset's defaults here: loading the artifact at startup
    then fails with the message that names the problem.
    """
    try:
        manifest = read_manifest(artifact)
    except ArtifactError:
        return preset.sink_tokens, None
    entry = manifest.preset(preset.name)
    slots = None if entry is None or entry.layer_slot_bytes is None else tuple(entry.layer_slot_bytes)
    return (preset.sink_tokens if manifest.sinks is None else manifest.sinks.tokens), slots


def serving_options(vllm_config: Any) -> dict:
    """The validated ``--additional-config '{"spectralquant": {...}}'`` options."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    opts = extra.get(CONFIG_KEY, {}) if isinstance(extra, dict) else {}
    if not isinstance(opts, dict):
        raise ServingConfigError(f'--additional-config "{CONFIG_KEY}" must be an object, e.g. {{"artifact": "DIR"}}')
    unknown = sorted(set(opts) - KNOWN_OPTIONS)
    if unknown:
        raise ServingConfigError(f'unknown --additional-config "{CONFIG_KEY}" options {unknown}; known: {sorted(KNOWN_OPTIONS)}')
    return opts


def served_model(model_config: Any) -> ServedModel:
    """The served model (read once per process): a local folder's config.json, else vLLM's loaded config."""
    name = str(model_config.model)
    with _lock:
        hit = _models.get(name)
    if hit is not None:
        return hit
    path = Path(name)
    if (path / "config.json").is_file():
        model = ServedModel.from_config(name, read_config(path), path)
    else:  # a hub id resolved by vLLM: compare against the loaded config (structure only)
        model = ServedModel.from_config(name, model_config.hf_config.to_dict())
    with _lock:
        return _models.setdefault(name, model)


