"""Which codec each attention layer of the served model uses, loaded and verified once per process.

The attention impl is built during model construction, when vLLM's config is current: that is
where we resolve the preset, the artifact (``--additional-config '{"spectralquant": {"artifact":
DIR}}'`` or ``MODEL_DIR/spectralquant``), verify it against the model, and record the preset for
``customize_spec`` (which runs later without a config).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_spectralquant.artifact import Artifact, ArtifactError, default_artifact_dir, load_artifact
from vllm_spectralquant.artifact.fingerprint import fingerprint, fingerprint_of
from vllm_spectralquant.format.paged import CacheGeometry
from vllm_spectralquant.format.params import LayerCodec
from vllm_spectralquant.format.presets import Preset, check_head_dim, get_preset
from vllm_spectralquant.format.turboquant import turboquant_codec

logger = logging.getLogger("vllm.spectralquant")  # under "vllm": shown by vLLM's log handlers

CONFIG_KEY = "spectralquant"
KNOWN_OPTIONS = {"artifact", "sink_tokens"}


@dataclass(frozen=True)
class ServingPolicy:
    """What the whole run uses: one preset, its artifact (SpectralQuant) and the sink policy."""

    preset: Preset
    sink_tokens: int
    artifact: Artifact | None
    kv_head_offset: int  # first KV head of this tensor-parallel rank
    num_kv_heads: int  # KV heads on this rank

    def geometry(self, head_dim: int, block_size: int) -> CacheGeometry:
        return CacheGeometry(head_dim, self.preset.slot_bytes(head_dim), block_size, self.sink_tokens)

    def layer_codec(self, layer: int, head_dim: int) -> LayerCodec:
        if self.artifact is None:
            return turboquant_codec(self.preset, head_dim, self.num_kv_heads)
        heads = slice(self.kv_head_offset, self.kv_head_offset + self.num_kv_heads)
        return self.artifact.layer_codec(self.preset.name, layer, heads)


_lock = threading.Lock()
_policy: ServingPolicy | None = None
_codecs: dict[tuple[int, str], LayerCodec] = {}


def active_policy() -> ServingPolicy | None:
    """The policy recorded by the first attention impl of this process (None before)."""
    return _policy


def _options(vllm_config) -> dict:
    extra = getattr(vllm_config, "additional_config", None) or {}
    opts = extra.get(CONFIG_KEY, {}) if isinstance(extra, dict) else {}
    if not isinstance(opts, dict):
        raise ArtifactError(f'--additional-config "{CONFIG_KEY}" must be an object, e.g. {{"artifact": "DIR"}}')
    unknown = sorted(set(opts) - KNOWN_OPTIONS)
    if unknown:
        raise ArtifactError(f'unknown --additional-config "{CONFIG_KEY}" options {unknown}; known: {sorted(KNOWN_OPTIONS)}')
    return opts


def _model_fingerprint(model_config):
    path = Path(str(model_config.model))
    if (path / "config.json").is_file():
        return fingerprint_of(path), path
    # A hub id resolved by vLLM: compare against the loaded config (structure only).
    return fingerprint(model_config.hf_config.to_dict()), None


def _tp_slice(num_kv_heads_local: int, total_kv_heads: int) -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (ImportError, AssertionError, AttributeError):
        return 0
    if world <= total_kv_heads:
        return rank * num_kv_heads_local
    return rank * total_kv_heads // world  # KV heads replicated over ranks


def resolve_policy(kv_cache_dtype: str, head_dim: int, num_kv_heads_local: int) -> ServingPolicy:
    """Resolve (once per process) the preset, artifact and sinks for this run; later calls must agree."""
    global _policy
    from vllm.config import get_current_vllm_config_or_none

    preset = get_preset(kv_cache_dtype)
    check_head_dim(head_dim, preset.method)
    with _lock:
        if _policy is not None:
            if _policy.preset != preset:
                raise ArtifactError(f"layers ask for both {_policy.preset.name} and {preset.name}; use one kv-cache dtype")
            return _policy
        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is None:
            raise RuntimeError("SpectralQuant: the attention layer was built outside a vLLM config context")
        opts = _options(vllm_config)
        sink_tokens = int(opts.get("sink_tokens", preset.sink_tokens))
        model_fp, model_dir = _model_fingerprint(vllm_config.model_config)
        artifact = None
        if preset.method == "spectralquant":
            if "artifact" in opts:
                path = Path(os.path.expanduser(str(opts["artifact"])))
            elif model_dir is not None:
                path = default_artifact_dir(model_dir)
            else:
                raise ArtifactError(
                    f"{kv_cache_dtype} needs a calibration artifact: pass --additional-config "
                    f'\'{{"{CONFIG_KEY}": {{"artifact": "DIR"}}}}\' (model {vllm_config.model_config.model} is not a local folder)'
                )
            artifact = load_artifact(path, expect=model_fp, presets=[preset.name])
            logger.info("SpectralQuant: loaded artifact %s (preset %s, %d layers)", path, preset.name, model_fp.num_layers)
        total_kv = model_fp.num_kv_heads
        _policy = ServingPolicy(preset, sink_tokens, artifact, _tp_slice(num_kv_heads_local, total_kv), num_kv_heads_local)
        logger.info(
            "SpectralQuant backend: %s (%s layout), %d B per head-token + exact sink tokens: %d",
            preset.kv_cache_dtype, preset.method, preset.slot_bytes(head_dim), sink_tokens,
        )
        return _policy


def layer_codec(policy: ServingPolicy, layer: int, head_dim: int, device: torch.device) -> LayerCodec:
    """The (cached) codec of ``layer`` on ``device``."""
    key = (layer, str(device))
    with _lock:
        codec = _codecs.get(key)
        if codec is None:
            codec = policy.layer_codec(layer, head_dim).to(device)
            _codecs[key] = codec
        return codec


def reset_for_tests() -> None:
    global _policy
    with _lock:
        _policy = None
        _codecs.clear()
