"""The attention shape of a model, read once from its Hugging Face config: :class:`ModelShape`.

Calibration (collect, capture), the artifact fingerprint, eval, the demo and the vLLM backend all take
head_dim, KV heads, layers and the maximum context from here, and decide here whether the backend can
serve the model (``ModelShape.serving_problems``), so a model the server would refuse is refused at
calibration with the same message. Pure Python: no torch, transformers or vLLM import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_spectralquant.models.errors import ModelError

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
#: Config keys holding the maximum context, in the order they are tried.
MAX_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len")


def unsupported_message(features: list[str]) -> str:
    """The one wording of "the backend cannot serve this" (the backend and calibration both raise it)."""
    return f"SpectralQuant KV cache does not support {', '.join(features)}"


def text_config(config: Any) -> Any:
    """The language model's part of a config (multimodal configs nest it); dicts and config objects alike."""
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", None) or config


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _layer_types(text: Any, num_layers: int, sliding_window: int | None) -> tuple[str, ...]:
    types = _get(text, "layer_types")
    if types:
        return tuple(str(t) for t in types)
    if sliding_window is None or _get(text, "use_sliding_window") is False:
        return (FULL_ATTENTION,) * num_layers
    pattern = _get(text, "sliding_window_pattern")  # Gemma 3 style: every pattern-th layer is full
    if isinstance(pattern, int) and pattern > 0:
        return tuple(FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(num_layers))
    first_sliding = _get(text, "max_window_layers")  # Qwen2 style: layers from max_window_layers on slide
    if isinstance(first_sliding, int) and _get(text, "use_sliding_window") is True:
        return tuple(SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION for i in range(num_layers))
    return (SLIDING_ATTENTION,) * num_layers


@dataclass(frozen=True)
class ModelShape:
    """What every part of the package needs to know of a model's attention layers."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int | None  # None when the config names none
    layer_types: tuple[str, ...]  # per layer: "full_attention", "sliding_attention", ...
    sliding_window: int | None  # the window of the sliding layers (None: no layer slides)
    logits_soft_cap: float | None = None
    query_pre_attn_scalar: float | None = None  # Gemma: scores are scaled by this**-0.5, not head_dim**-0.5

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a config.json dict or a transformers ``PretrainedConfig`` (multimodal: its text config)."""
        text = text_config(config)
        try:
            heads = int(_get(text, "num_attention_heads"))
            layers = int(_get(text, "num_hidden_layers"))
            head_dim = int(_get(text, "head_dim") or int(_get(text, "hidden_size")) // heads)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"the model config lacks the attention shape ({e}); is this a decoder-only transformer?") from e
        kv_heads = int(_get(text, "num_key_value_heads") or heads)
        max_context = next((int(v) for k in MAX_CONTEXT_KEYS if (v := _get(text, k))), None)
        window = _get(text, "sliding_window")
        window = int(window) if window else None
        types = _layer_types(text, layers, window)
        if len(types) != layers:
            raise ModelError(f"the model config lists {len(types)} layer_types for {layers} layers")
        if SLIDING_ATTENTION not in types:
            window = None
        cap = _get(text, "attn_logit_softcapping")
        scalar = _get(text, "query_pre_attn_scalar")
        return cls(
            layers, heads, kv_heads, head_dim, max_context, types, window, float(cap) if cap else None,
            float(scalar) if scalar else None,
        )  # fmt: skip

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> ModelShape:
        """From ``MODEL_DIR/config.json``."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelError(f"{path} not found: expected a Hugging Face model folder")
        try:
            return cls.from_config(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"cannot read {path}: {e}") from e

    @property
    def softmax_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_sliding_window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    def serving_problems(self) -> list[str]:
        """What the SpectralQuant backend cannot serve in this model (empty: it can serve it).

        Sliding-window layers are served (packed like global ones, the window applied in attention).
        """
        out = []
        other = sorted({t for t in self.layer_types if t not in (FULL_ATTENTION, SLIDING_ATTENTION)})
        if other:
            out.append(f"{', '.join(other)} layers (only full attention)")
        if self.logits_soft_cap:
            out.append(f"logits soft-capping (attn_logit_softcapping={self.logits_soft_cap})")
        return out

    def serving_refusal(self) -> str | None:
        """The message the backend refuses this model with, or None when it can serve it."""
        problems = self.serving_problems()
        return unsupported_message(problems) if problems else None
