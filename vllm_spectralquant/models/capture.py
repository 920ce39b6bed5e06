"""Post-RoPE Q/K/V of every attention layer of a Hugging Face model, as vLLM's attention backend receives them.

transformers routes each attention layer through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` with
query [B, Hq, T, D] and key/value [B, Hkv, T, D] after the rotary embedding and before the GQA repeat. We register
one more implementation, ``spectralquant_capture``, that hands these tensors to a callback (in vLLM's token-major
layout [B, T, H, D]), optionally lets a second callback replace K/V, and then runs transformers' own SDPA
attention, so the model's output is unchanged when K/V are not replaced.

Which callbacks are active is held in a ContextVar, not on the model: a model switched to the capture
implementation and called outside :class:`QKVCapture` behaves exactly like ``sdpa``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_spectralquant.models.errors import ModelError
from vllm_spectralquant.models.shape import ModelShape, text_config

CAPTURE_ATTN_IMPLEMENTATION = "spectralquant_capture"  # must not contain "sdpa"/"flash"/"/": transformers
# dispatches extra checks on those substrings.

QKVCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""(layer_idx, q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D]), float32 copies the callback may keep."""

KVTransform = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(layer_idx, k [B, T, Hkv, D], v [B, T, Hkv, D]) float32 -> (k', v') of the same shapes, used for attention."""


@dataclass
class _Hooks:
    on_qkv: QKVCallback | None
    kv_transform: KVTransform | None
    layers_seen: list[int] = field(default_factory=list)


_ACTIVE_HOOKS: ContextVar[_Hooks | None] = ContextVar("spectralquant_capture_hooks", default=None)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] (any dtype) -> a fresh, contiguous float32 [B, T, H, D] copy."""
    return x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _head_major(x: torch.Tensor, like: torch.Tensor, what: str, layer_idx: int) -> torch.Tensor:
    """A kv_transform result [B, T, H, D] -> ``like``'s layout [B, H, T, D], dtype and device."""
    expected = (like.shape[0], like.shape[2], like.shape[1], like.shape[3])
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != expected:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"kv_transform for layer {layer_idx} returned {what} of shape {got}, expected {expected}")
    return x.to(device=like.device, dtype=like.dtype).transpose(1, 2)


def capture_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: report Q/K/V to the active hooks, then transformers' SDPA attention.

    query [B, Hq, T, D], key/value [B, Hkv, S, D] (post-RoPE, before GQA repeat; S = T without a KV cache).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hooks = _ACTIVE_HOOKS.get()
    if hooks is not None:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise ModelError(
                f"attention module {type(module).__name__} has no layer_idx, so captured Q/K/V cannot be "
                "attributed to a layer"
            )
        layer_idx = int(layer_idx)
        hooks.layers_seen.append(layer_idx)
        if hooks.on_qkv is not None:
            hooks.on_qkv(layer_idx, _token_major(query), _token_major(key), _token_major(value))
        if hooks.kv_transform is not None:
            new_key, new_value = hooks.kv_transform(layer_idx, _token_major(key), _token_major(value))
            key = _head_major(new_key, key, "k", layer_idx)
            value = _head_major(new_value, value, "v", layer_idx)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture_attention() -> None:
    """Make ``spectralquant_capture`` a known attention implementation (idempotent).

    The mask function must be registered too: for a name absent from the mask registry, transformers 5 builds
    no attention mask at all (meant for vLLM/TGI backends), which would silently drop padding masks.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTN_IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_ATTN_IMPLEMENTATION, sdpa_mask)


def _set_attn_implementation(model: torch.nn.Module, name: str) -> None:
    if model.config._attn_implementation == name:
        return
    model.set_attn_implementation(name)
    # transformers only logs a warning (and changes nothing) for model classes that do not use AttentionInterface.
    if model.config._attn_implementation != name:
        raise ModelError(
            f"{type(model).__name__} did not switch its attention implementation to {name!r} (it is "
            f"{model.config._attn_implementation!r}): the model class does not dispatch attention through "
            "transformers' AttentionInterface, so its Q/K/V cannot be captured"
        )


class QKVCapture:
    """Context manager: while active, every attention call of ``model`` reports to ``on_qkv`` / uses ``kv_transform``.

    Switches the model to the capture implementation on entry and back to its previous one on exit. Call the model
    with ``use_cache=False``: with a KV cache, key/value include the cached tokens of earlier calls.
    ``on_qkv`` sees the K/V the model computed; ``kv_transform`` (called after it) may replace them for attention.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        on_qkv: QKVCallback | None = None,
        kv_transform: KVTransform | None = None,
    ) -> None:
        self.model = model
        self._hooks = _Hooks(on_qkv=on_qkv, kv_transform=kv_transform)
        self._previous: str | None = None
        self._token = None

    @property
    def layers_seen(self) -> list[int]:
        """Layer indices in the order their attention ran since entry."""
        return list(self._hooks.layers_seen)

    def __enter__(self) -> QKVCapture:
        register_capture_attention()
        self._previous = self.model.config._attn_implementation
        _set_attn_implementation(self.model, CAPTURE_ATTN_IMPLEMENTATION)
        self._token = _ACTIVE_HOOKS.set(self._hooks)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _ACTIVE_HOOKS.reset(self._token)
        if self._previous is not None and self._previous != CAPTURE_ATTN_IMPLEMENTATION:
            self.model.set_attn_implementation(self._previous)


def _check_ids(
    model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None
) -> torch.Tensor | None:
    """Validate input_ids [B, T]; return position_ids as int64 [B, T] (or None for the default 0..T-1)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got {shape}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids holds no tokens")
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise ValueError("position_ids must be an integer tensor [tokens], [1, tokens] or [batch, tokens]")
    if position_ids.ndim == 1:
        position_ids = position_ids.unsqueeze(0)
    batch, tokens = input_ids.shape
    if position_ids.ndim != 2 or position_ids.shape[1] != tokens or position_ids.shape[0] not in (1, batch):
        raise ValueError(
            f"position_ids of shape {tuple(position_ids.shape)} do not match input_ids {tuple(input_ids.shape)}"
        )
    if int(position_ids.min()) < 0:
        raise ValueError(f"position_ids must be >= 0, got {int(position_ids.min())}")
    limit = ModelShape.from_config(model.config).max_context
    if limit is not None and int(position_ids.max()) >= limit:
        raise ValueError(
            f"position_ids reach {int(position_ids.max())}, beyond the model's context "
            f"(max_position_embeddings={limit})"
        )
    return position_ids.expand(batch, tokens).to(torch.long)


def run_with_capture(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    on_qkv: QKVCallback | None,
    position_ids: torch.Tensor | None = None,
    *,
    kv_transform: KVTransform | None = None,
    return_logits: bool = True,
) -> torch.Tensor | None:
    """One forward pass without KV cache, reporting every layer's post-RoPE Q/K/V; returns float32 logits [B, T, V].

    input_ids: int64 [B, T]. position_ids: int64 [T], [1, T] or [B, T] (default 0..T-1); RoPE is relative, so
    positions p..p+T-1 leave logits unchanged (up to rounding) but rotate the captured q/k as at position p.
    on_qkv(layer_idx, q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D]) gets float32 copies, once per layer.
    kv_transform(layer_idx, k, v) -> (k', v'), if given, replaces K/V before attention (e.g. a quantized cache).
    return_logits=False runs the decoder stack only (no LM head) and returns None.
    """
    position_ids = _check_ids(model, input_ids, position_ids)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if position_ids is not None:
        position_ids = position_ids.to(device)
    with QKVCapture(model, on_qkv=on_qkv, kv_transform=kv_transform) as capture, torch.no_grad():
        # Without logits, run only the decoder stack: the LM head is a large share of a small model's FLOPs.
        runner = model if return_logits else model.base_model
        output = runner(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    missing = sorted(set(range(ModelShape.from_config(model.config).num_layers)) - set(capture.layers_seen))
    if missing:
        raise ModelError(
            f"attention of layers {missing} of {type(model).__name__} did not run through transformers' "
            "AttentionInterface, so their Q/K/V were not captured"
        )
    return output.logits.float() if return_logits else None


def check_supported_architecture(config: Any) -> None:
    """Raise ModelError unless calibration can capture the model and the backend can serve it.

    Rejected: multi-head latent attention (``kv_lora_rank``; the cache holds a shared latent, not per-head K/V),
    models without rotary position embedding (ALiBi, learned absolute positions), and whatever
    :meth:`ModelShape.serving_problems` names (logits soft-capping, layer types other than full and sliding-window
    attention), with the message the vLLM backend would refuse the model with.
    """
    text = text_config(config)
    name = getattr(text, "model_type", None) or type(text).__name__
    if getattr(text, "kv_lora_rank", None) is not None:
        raise ModelError(
            f"{name} uses multi-head latent attention (MLA, kv_lora_rank={text.kv_lora_rank}): its KV cache holds a "
            "compressed latent rather than per-head keys and values; SpectralQuant does not support MLA models"
        )
    if getattr(text, "alibi", False):
        raise ModelError(f"{name} uses ALiBi position biases, not rotary position embedding (RoPE); not supported")
    has_rope = any(
        getattr(text, attr, None) is not None for attr in ("rope_parameters", "rope_scaling", "rope_theta")
    )
    if not has_rope:
        raise ModelError(
            f"{name} has no rotary position embedding (no rope_parameters/rope_theta in its config); SpectralQuant "
            "calibrates post-RoPE keys and supports RoPE models only"
        )
    refusal = ModelShape.from_config(config).serving_refusal()
    if refusal:
        raise ModelError(refusal)


def load_model(
    model_dir: Path | str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode with SDPA attention, tokenizer) from a local Hugging Face folder; never downloads."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir).expanduser()
    if not model_dir.exists():
        raise ModelError(f"model folder {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a folder; expected a Hugging Face model folder")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{model_dir} has no config.json; is it a Hugging Face model folder?")
    try:
        json.loads(config_path.read_text(encoding="utf-8"))
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the model config {config_path}: {exc}") from exc
    check_supported_architecture(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"no usable tokenizer in {model_dir}: {exc}") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the model weights in {model_dir}: {exc}") from exc
    return model.to(device).eval(), tokenizer
