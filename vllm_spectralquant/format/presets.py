"""Presets: a method (SpectralQuant or the TurboQuant layout) at a byte budget per head-token.

A preset is named after its tier, the TurboQuant-equivalent bit width at head_dim 128:
``2_5bit`` (86 B, 5.95x), ``3bit`` (102 B, the size of vLLM's turboquant_3bit_nc, 5.02x) and
``4bit`` (134 B, the size of turboquant_4bit_nc, 3.82x). Budgets scale linearly with head_dim
(head_dim 64: 43 / 51 / 67 B). All per-token metadata is inside the budget; the exact sink
tokens (a per-sequence policy) are counted separately by :class:`CacheGeometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

from vllm_spectralquant.format.errors import FormatError

Method = Literal["spectralquant", "turboquant"]

#: Coordinates per quantisation group. A group of 8 coordinates at b bits is exactly b bytes,
#: so every group starts on a byte boundary and unpacking needs no cross-group carries.
GROUP_SIZE = 8
#: Largest bit width of one coordinate (codebooks have at most 2**MAX_BITS entries).
MAX_BITS = 8
#: Head dims the codec accepts: a whole number of groups, and sizes that real models use.
MIN_HEAD_DIM, MAX_HEAD_DIM = 32, 256

#: Tier -> bytes per head-token (K and V together) at head_dim 128.
TIER_BYTES_AT_128: dict[str, int] = {"2_5bit": 86, "3bit": 102, "4bit": 134}


class TokenScale(IntEnum):
    """Per-token metadata of one component (K or V); each field is one fp16."""

    NONE = 0  # SpectralQuant: codes only, no per-token field
    NORM = 1  # TurboQuant keys: one fp16 norm (norm-corrected, so the decoded norm is exact)
    AFFINE = 2  # TurboQuant values: fp16 range and fp16 minimum over the token's coordinates

    @property
    def fields(self) -> int:
        return int(self)


#: Per-token metadata of each method: (keys, values).
TOKEN_SCALES: dict[str, tuple[TokenScale, TokenScale]] = {
    "spectralquant": (TokenScale.NONE, TokenScale.NONE),
    "turboquant": (TokenScale.NORM, TokenScale.AFFINE),
}


@dataclass(frozen=True)
class Preset:
    """One kv-cache format choice; ``kv_cache_dtype`` is what users pass to vLLM."""

    name: str
    method: Method
    tier: str
    sink_tokens: int = 1

    @property
    def kv_cache_dtype(self) -> str:
        return f"spectralquant_{self.name}"

    @property
    def token_scales(self) -> tuple[TokenScale, TokenScale]:
        return TOKEN_SCALES[self.method]

    @property
    def meta_bytes(self) -> int:
        """Per-token metadata bytes at the start of each slot (2 per fp16 field)."""
        return 2 * sum(s.fields for s in self.token_scales)

    def slot_bytes(self, head_dim: int) -> int:
        """Bytes per head-token (K and V, metadata included) for ``head_dim``."""
        check_head_dim(head_dim, self.method)
        return (TIER_BYTES_AT_128[self.tier] * head_dim) // 128

    def data_bytes(self, head_dim: int) -> int:
        """Bytes of packed codes per head-token (slot minus metadata)."""
        return self.slot_bytes(head_dim) - self.meta_bytes

    def compression_vs_bf16(self, head_dim: int) -> float:
        return 4 * head_dim / self.slot_bytes(head_dim)

    def describe(self, head_dim: int) -> dict:
        return {
            "name": self.name,
            "kv_cache_dtype": self.kv_cache_dtype,
            "method": self.method,
            "head_dim": head_dim,
            "bytes_per_head_token": self.slot_bytes(head_dim),
            "compression_vs_bf16": round(self.compression_vs_bf16(head_dim), 4),
            "sink_tokens": self.sink_tokens,
        }


def check_head_dim(head_dim: int, method: Method = "spectralquant") -> None:
    """Raise FormatError unless the codec supports ``head_dim`` for ``method``."""
    if not isinstance(head_dim, int) or head_dim % GROUP_SIZE or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise FormatError(
            f"unsupported head_dim {head_dim!r}: SpectralQuant needs a multiple of {GROUP_SIZE} "
            f"between {MIN_HEAD_DIM} and {MAX_HEAD_DIM}"
        )
    if method == "turboquant" and head_dim & (head_dim - 1):
        raise FormatError(
            f"unsupported head_dim {head_dim} for the TurboQuant layout: its Hadamard rotation needs a power of 2"
        )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sq2_5bit", "spectralquant", "2_5bit"),
        Preset("sq3bit", "spectralquant", "3bit"),
        Preset("sq4bit", "spectralquant", "4bit"),
        Preset("tq2_5bit", "turboquant", "2_5bit"),
        Preset("tq3bit", "turboquant", "3bit"),
        Preset("tq4bit", "turboquant", "4bit"),
    )
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name (``sq3bit``) or kv-cache dtype (``spectralquant_sq3bit``)."""
    key = name.removeprefix("spectralquant_")
    try:
        return PRESETS[key]
    except KeyError:
        raise FormatError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
