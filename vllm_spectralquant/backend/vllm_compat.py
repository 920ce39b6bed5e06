"""The places where vLLM 0.32 (CPU build) and 0.33 (CUDA build) differ, behind one interface.

0.33 has pluggable kv-cache dtypes (``register_kv_cache_dtype``). 0.32 validates the dtype string
against a ``Literal`` in four places, which we extend at runtime (no vLLM file is edited):
the ``CacheConfig.cache_dtype`` field (then pydantic rebuilds the dataclass), the selector's own
imported ``CacheDType``, the cached CLI kwargs, and ``STR_DTYPE_TO_TORCH_DTYPE``.
See docs/dev-notes/vllm-0.32-cpu.md section 4.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable

import torch


def has_pluggable_kv_cache_dtypes() -> bool:
    import vllm.config.cache as cache

    return hasattr(cache, "register_kv_cache_dtype")


def known_kv_cache_dtypes() -> tuple[str, ...]:
    import vllm.config.cache as cache

    if has_pluggable_kv_cache_dtypes():
        return tuple(cache.KV_CACHE_DTYPES)
    return typing.get_args(cache.CacheConfig.__dataclass_fields__["cache_dtype"].type)


def register_kv_cache_dtypes(names: Iterable[str]) -> None:
    """Make vLLM accept ``names`` as ``--kv-cache-dtype`` values stored as uint8 (idempotent)."""
    new = [n for n in names if n not in known_kv_cache_dtypes()]
    if not new:
        return
    if has_pluggable_kv_cache_dtypes():
        _register_pluggable(new)
    else:
        _extend_literal(new)


def _register_pluggable(names: list[str]) -> None:
    from vllm.config.cache import register_kv_cache_dtype
    from vllm.v1.kv_cache_interface import KVQuantMode

    for name in names:

        class _Handler:
            def torch_dtype(self) -> torch.dtype:
                return torch.uint8

            def quant_mode(self):
                # Note: KVQuantMode.CUSTOM aliases OCTAVE_K3V4 in 0.33; we never read it back.
                return KVQuantMode.CUSTOM

        _Handler.name = name
        register_kv_cache_dtype(name)(_Handler)


def _extend_literal(names: list[str]) -> None:
    import pydantic.dataclasses
    import vllm.config.cache as cache
    import vllm.engine.arg_utils as arg_utils
    import vllm.v1.attention.selector as selector
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    field = cache.CacheConfig.__dataclass_fields__["cache_dtype"]
    literal = typing.Literal[typing.get_args(field.type) + tuple(names)]  # type: ignore[valid-type]
    field.type = literal
    cache.CacheConfig.__annotations__["cache_dtype"] = literal
    cache.CacheDType = literal
    pydantic.dataclasses.rebuild_dataclass(cache.CacheConfig, force=True)
    selector.CacheDType = literal  # the selector asserts against its own imported copy
    arg_utils._compute_kwargs.cache_clear()  # the CLI turns the Literal into cached argparse choices
    for name in names:
        STR_DTYPE_TO_TORCH_DTYPE[name] = torch.uint8


def register_custom_backend(class_path: str) -> None:
    """Put our backend in vLLM's CUSTOM slot (value None, so it unpickles in spawned processes)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, class_path)


def route_cpu_platform(class_path: str, dtype_prefix: str) -> None:
    """Make the CPU platform honour ``--attention-backend CUSTOM`` / our kv-cache dtypes (idempotent).

    vLLM's CPU platform returns CPU_ATTN whatever backend was asked for and never validates it. We wrap
    its selector so that (a) our backend is returned, after ``validate_configuration``, when the user
    asked for CUSTOM (with our class registered) or for one of our dtypes, and (b) our dtype can
    never silently reach CPU_ATTN (which would read the packed bytes as bf16 and produce garbage).
    Nothing changes for anyone else.
    """
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls
    if getattr(original, "_spectralquant_route", False):
        return
    original_func = original.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        cfg = attn_selector_config
        ours_dtype = str(cfg.kv_cache_dtype).startswith(dtype_prefix)
        custom = selected_backend == AttentionBackendEnum.CUSTOM and AttentionBackendEnum.CUSTOM.get_path() == class_path
        if (custom or (ours_dtype and selected_backend is None)) and not cfg.use_mla:
            from vllm.utils.import_utils import resolve_obj_by_qualname

            backend = resolve_obj_by_qualname(class_path)
            fields = cfg._asdict()
            reasons = backend.validate_configuration(device_capability=None, **fields)
            if reasons:
                raise ValueError(f"the SpectralQuant attention backend cannot serve this model: {'; '.join(reasons)}")
            return class_path
        if ours_dtype:
            raise ValueError(
                f"kv-cache dtype {cfg.kv_cache_dtype} needs the SpectralQuant backend: pass --attention-backend CUSTOM "
                f"(got {getattr(selected_backend, 'name', selected_backend)})"
            )
        return original_func(cls, selected_backend, attn_selector_config, *args, **kwargs)

    get_attn_backend_cls._spectralquant_route = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


#: How far up the stack :func:`layer_being_specified` looks: customize_spec <- customize_attention_spec
#: <- the runner's loop (0.32 and 0.33), or customize_spec <- Attention.get_kv_cache_spec (sliding layers).
_SPEC_CALLER_DEPTH = 3


def layer_being_specified() -> int | None:
    """The index of the attention layer whose cache spec vLLM is building, or None when no caller names one.

    vLLM calls ``AttentionBackend.customize_spec(spec)`` with the spec alone, but a layer whose slot size
    is its own needs its name. Both callers have it at hand: the model runner's ``get_kv_cache_spec``
    loops with a ``layer_name`` local, and ``Attention.get_kv_cache_spec`` (the sliding-window probe) is
    a method of the layer. vLLM's platform-level probes (hybrid page alignment) name no layer: None.
    """
    import sys

    from vllm.model_executor.models.utils import extract_layer_index

    frame = sys._getframe(2)  # the caller of customize_spec
    for _ in range(_SPEC_CALLER_DEPTH):
        if frame is None:
            return None
        name = frame.f_locals.get("layer_name")
        if not isinstance(name, str):
            name = getattr(frame.f_locals.get("self"), "layer_name", None)
        if isinstance(name, str):
            try:
                return extract_layer_index(name)
            except (AssertionError, ValueError):
                return None
        frame = frame.f_back
    return None
