"""The TurboQuant layout in our codec (no calibration), for side-by-side comparisons at equal bytes.

As in vLLM's turboquant backend: keys are Hadamard-rotated unit vectors quantised with Gaussian
Lloyd-Max levels for N(0, 1/D) plus an fp16 norm (norm-corrected); values are unrotated, uniform
per-token min/max quantised with fp16 range and minimum. The slot's code bytes are split between
keys and values as evenly as possible (values get the odd byte), and within a component across
groups as evenly as possible; at 102 B / 134 B (head_dim 128) this is exactly turboquant_3bit_nc /
turboquant_4bit_nc (3 or 4 bits everywhere).
"""

from __future__ import annotations

import torch

from vllm_spectralquant.format.codebooks import gaussian_lloyd_max, pad_codebook, uniform_grid
from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.hadamard import hadamard
from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import GROUP_SIZE, MAX_BITS, Preset, TokenScale, check_head_dim


def spread_bytes(total_bytes: int, num_groups: int) -> torch.Tensor:
    """Bits per group [G] when ``total_bytes`` code bytes are spread evenly (1 byte = 1 bit per group)."""
    base, extra = divmod(total_bytes, num_groups)
    if base > MAX_BITS or (base == MAX_BITS and extra):
        raise FormatError(f"{total_bytes} code bytes exceed {MAX_BITS} bits for {num_groups} groups")
    bits = torch.full((num_groups,), base, dtype=torch.int32)
    bits[:extra] += 1
    return bits


def turboquant_codec(preset: Preset, head_dim: int, num_kv_heads: int, key_bytes: int | None = None) -> LayerCodec:
    """The TQ-layout codec of one layer (identical for every layer and head).

    Args:
        key_bytes: code bytes for keys (default: half of the data bytes, rounded down).
    """
    if preset.method != "turboquant":
        raise FormatError(f"preset {preset.name} is not a TurboQuant-layout preset")
    check_head_dim(head_dim, "turboquant")
    groups = head_dim // GROUP_SIZE
    data = preset.data_bytes(head_dim)
    key_bytes = data // 2 if key_bytes is None else key_bytes
    if not 0 < key_bytes < data:
        raise FormatError(f"key_bytes must be in (0, {data}), got {key_bytes}")
    k_bits = spread_bytes(key_bytes, groups)
    v_bits = spread_bytes(data - key_bytes, groups)

    def tables(bits: torch.Tensor, levels_of) -> torch.Tensor:
        return torch.stack([pad_codebook(levels_of(int(b))) for b in bits])

    # Unit-vector coordinates after the rotation are ~N(0, 1/D).
    k_cb = tables(k_bits, lambda b: gaussian_lloyd_max(b)[0] / head_dim**0.5)
    v_cb = tables(v_bits, uniform_grid)

    def component(basis: torch.Tensor, bits: torch.Tensor, cb: torch.Tensor, mode: TokenScale) -> ComponentCodec:
        h, d = num_kv_heads, head_dim
        return ComponentCodec(
            basis=basis.expand(h, d, d).contiguous(),
            mean=torch.zeros(h, d),
            scale=torch.ones(h, d),
            bits=bits.expand(h, -1).contiguous(),
            codebooks=cb.expand(h, -1, -1).contiguous(),
            token_scale=mode,
        )

    key = component(hadamard(head_dim), k_bits, k_cb, TokenScale.NORM)
    value = component(torch.eye(head_dim), v_bits, v_cb, TokenScale.AFFINE)
    return LayerCodec(preset, key, value).validate()
