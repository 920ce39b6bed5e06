"""The catalogue of cache formats our backend serves by emulation (names only: no torch, no vLLM).

vLLM's own compressed caches (``turboquant_*``, ``int4_per_token_head``, ``fp8``) cannot be served by the
CPU vLLM, so our backend emulates them on a dense cache: each new K/V is quantised and dequantised at
store time with vLLM's own quantiser (``backend/emulated_formats.py``), and attention reads the
dequantised values (``backend/emulated_dense.py``). ``bf16_rounded`` is the noise floor: a harmless
change (K/V rounded to bf16) through the same dense path.

The kv-cache dtype of a method is ``spectralquant_emulate_<name>``; ``plugin.py`` registers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vllm_spectralquant.errors import SpectralQuantError

EMULATED_DTYPE_PREFIX = "spectralquant_emulate_"

Family = Literal["vllm", "noise_floor"]


@dataclass(frozen=True)
class EmulatedMethod:
    """One emulated cache format; ``vllm_name`` is the ``--kv-cache-dtype`` vLLM itself uses for it."""

    name: str
    family: Family
    vllm_name: str | None
    description: str

    @property
    def kv_cache_dtype(self) -> str:
        return EMULATED_DTYPE_PREFIX + self.name


EMULATED_METHODS: dict[str, EmulatedMethod] = {
    m.name: m
    for m in (
        EmulatedMethod("bf16_rounded", "noise_floor", None, "K/V rounded to bf16 (noise floor of a harmless change)"),
        EmulatedMethod("fp8", "vllm", "fp8", "vLLM fp8 (e4m3), scale 1.0 (vLLM's default without calibrated scales)"),
        EmulatedMethod("int4_per_token_head", "vllm", "int4_per_token_head", "vLLM int4_per_token_head (RHT + int4, inline fp32 scale/zero point)"),
        EmulatedMethod("turboquant_4bit_nc", "vllm", "turboquant_4bit_nc", "vLLM TurboQuant 4-bit keys and values, norm correction"),
        EmulatedMethod("turboquant_k3v4_nc", "vllm", "turboquant_k3v4_nc", "vLLM TurboQuant 3-bit keys, 4-bit values, norm correction"),
        EmulatedMethod("turboquant_3bit_nc", "vllm", "turboquant_3bit_nc", "vLLM TurboQuant 3-bit keys and values, norm correction"),
    )
}

EMULATED_KV_CACHE_DTYPES = tuple(m.kv_cache_dtype for m in EMULATED_METHODS.values())


class UnknownEmulatedMethod(SpectralQuantError, ValueError):
    """A name that is no emulated method; the message lists the known ones."""


def is_emulated(name: str) -> bool:
    """Whether ``name`` (``fp8`` or ``spectralquant_emulate_fp8``) is an emulated method."""
    return name.removeprefix(EMULATED_DTYPE_PREFIX) in EMULATED_METHODS and (
        name in EMULATED_METHODS or name.startswith(EMULATED_DTYPE_PREFIX)
    )


def get_emulated(name: str) -> EmulatedMethod:
    """The emulated method named ``name`` or by its kv-cache dtype."""
    try:
        return EMULATED_METHODS[name.removeprefix(EMULATED_DTYPE_PREFIX)]
    except KeyError:
        raise UnknownEmulatedMethod(f"unknown emulated method {name!r}; known: {', '.join(EMULATED_METHODS)}") from None
