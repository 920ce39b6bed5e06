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
