"""Model fingerprints from a Hugging Face config.json, and comparing them with a clear message."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from vllm_spectralquant.artifact.errors import ArtifactError
from vllm_spectralquant.artifact.manifest import ModelFingerprint
from vllm_spectralquant.models.errors import ModelError
from vllm_spectralquant.models.shape import ModelShape, text_config

#: config.json keys that change without changing the model (tooling versions, local paths).
VOLATILE_KEYS = frozenset({"transformers_version", "_name_or_path", "use_cache", "_attn_implementation_autoset"})
ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "rope_type")


def read_config(model_dir: Path | str) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ArtifactError(f"{path} not found: expected a Hugging Face model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from e


def stable_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(config.items()) if k not in VOLATILE_KEYS}


def fingerprint(config: dict[str, Any]) -> ModelFingerprint:
    """Fingerprint of a model from its config.json contents."""
    text = text_config(config)
    try:
        shape = ModelShape.from_config(config)
    except ModelError as e:
        raise ArtifactError(str(e).replace("the model config", "config.json", 1)) from e
    stable = stable_config(config)
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    return ModelFingerprint(
        architecture=str(archs[0]),
        model_type=str(config.get("model_type", "unknown")),
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        rope={k: text[k] for k in ROPE_KEYS if k in text},
        dtype=text.get("dtype") or text.get("torch_dtype") or config.get("dtype") or config.get("torch_dtype"),
        config_sha256=digest,
        config=stable,
    )


def fingerprint_of(model_dir: Path | str) -> ModelFingerprint:
    return fingerprint(read_config(model_dir))


def mismatches(expected: ModelFingerprint, actual: ModelFingerprint) -> list[str]:
    """Human-readable differences, most important first (empty when the models match)."""
    out = []
    for field in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope", "dtype"):
        a, b = getattr(expected, field), getattr(actual, field)
        if a != b:
            out.append(f"{field}: artifact has {a!r}, model has {b!r}")
    if expected.config_sha256 != actual.config_sha256:
        keys = sorted(set(expected.config) | set(actual.config))
        diff = [k for k in keys if expected.config.get(k) != actual.config.get(k)]
        shown = ", ".join(f"{k} ({expected.config.get(k)!r} vs {actual.config.get(k)!r})" for k in diff[:5])
        more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
        out.append(f"config.json differs in {shown}{more}")
    return out
