"""The artifact's tensor schema: names and shapes of every tensor in its safetensors files.

The reader (``store.load_artifact``) checks files against it and the writer (``calibrate.job``) names
tensors with it, so both agree by construction. Per model with L layers, H KV heads, head dim D and
G = D / 8 groups, for each component ``key`` and ``value``:

=====================  ============================  ===========================================
file                   tensor                        shape, dtype
=====================  ============================  ===========================================
bases.safetensors      ``<c>.mean``                  [L, H, D] float32
                       ``<c>.basis``                 [L, H, D, D] float32 (orthonormal columns)
                       ``<c>.scale``                 [L, H, D] float32 (per rotated coordinate)
                       ``<c>.eigvals``               [L, H, D] float32 (report only)
preset-<p>.safetensors ``<c>.bits``                  [L, H, G] int32
                       ``<c>.codebooks``             [L, H, G, 256] float32
                       ``value.mean`` (optional)     [L, H, D] float32 (the preset's sink-anchored mean)
                       ``key.gain`` (optional)       [L, H] float32 (decode-only key gain)
=====================  ============================  ===========================================
"""

from __future__ import annotations

from vllm_spectralquant.format.codebooks import CODEBOOK_SIZE
from vllm_spectralquant.format.presets import GROUP_SIZE

COMPONENTS = ("key", "value")


def tensor_name(component: str, field: str) -> str:
    """``key.basis`` etc."""
    return f"{component}.{field}"


def bases_schema(num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of ``bases.safetensors``."""
    lhd = (num_layers, num_kv_heads, head_dim)
    fields = {"mean": lhd, "basis": lhd + (head_dim,), "scale": lhd, "eigvals": lhd}
    return {tensor_name(c, f): s for c in COMPONENTS for f, s in fields.items()}


#: A preset's own value mean [L, H, D] (sink-anchored, calibrate/anchor.py). Optional: artifacts written
#: before it use the value mean of ``bases.safetensors``.
PRESET_VALUE_MEAN = "value.mean"


#: A preset's decode-only key gain [L, H] (calibrate/fit.py ``key_gain``; format/params.py). Optional:
#: without it, keys decode with gain 1.
PRESET_KEY_GAIN = "key.gain"


def preset_optional_schema(num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the optional tensors of ``preset-<name>.safetensors``."""
    return {PRESET_VALUE_MEAN: (num_layers, num_kv_heads, head_dim), PRESET_KEY_GAIN: (num_layers, num_kv_heads)}


def preset_schema(num_layers: int, num_kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of ``preset-<name>.safetensors``."""
    lhg = (num_layers, num_kv_heads, head_dim // GROUP_SIZE)
    fields = {"bits": lhg, "codebooks": lhg + (CODEBOOK_SIZE,)}
    return {tensor_name(c, f): s for c in COMPONENTS for f, s in fields.items()}
