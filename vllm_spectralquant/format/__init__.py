"""The SpectralQuant KV format: presets, slot layout, codec and reference attention (no vLLM import).

See docs/FORMAT.md for the byte layout.
"""

from vllm_spectralquant.format.codec import decode_rotated, decode_slots, encode_slots
from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.paged import CacheGeometry, store_kv
from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import GROUP_SIZE, PRESETS, Preset, TokenScale, get_preset
from vllm_spectralquant.format.reference_attention import paged_attention
from vllm_spectralquant.format.turboquant import turboquant_codec

#: Version of the byte layout in docs/FORMAT.md; artifacts record it and loaders check it.
FORMAT_VERSION = 1

__all__ = [
    "FORMAT_VERSION",
    "GROUP_SIZE",
    "PRESETS",
    "CacheGeometry",
    "ComponentCodec",
    "FormatError",
    "LayerCodec",
    "Preset",
    "TokenScale",
    "decode_rotated",
    "decode_slots",
    "encode_slots",
    "get_preset",
    "paged_attention",
    "store_kv",
    "turboquant_codec",
]
