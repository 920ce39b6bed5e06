"""Codec parameters of one attention layer, for all its KV heads, and the slot layout they imply.

Per component (keys or values) and KV head ``h``:

* ``basis[h]`` [D, D]: orthonormal columns; the rotated vector is ``r = (x - mean[h]) @ basis[h]``.
  Columns are ordered by importance, so group ``g`` holds rotated coordinates ``8g .. 8g+7``.
* ``scale[h]`` [D]: per-coordinate sigma; codebooks live in units of it.
* ``bits[h]`` [G]: bits per code of each group (0..8); ``codebooks[h]`` [G, 256]: ascending levels,
  the first ``2**bits`` used.
* ``token_scale``: per-token fp16 fields (none for SpectralQuant; norm / affine for the TQ layout).

Decoding a code vector c (levels looked up from the codes) with per-token (s, z):
``x_hat = (scale * (s * c + z)) @ basis.T + mean``; s = 1, z = 0 when there is no token scale.

Keys may carry a decode-only ``gain[h]`` (calibration's ``key_gain``): they decode with
``decode_scale = scale * gain``, i.e. ``mean + gain * (x_hat - mean)``, while encoding keeps ``scale``.
The codes are unchanged; the scores over packed keys get sharper by ``gain``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_spectralquant.format.bitpack import group_offsets
from vllm_spectralquant.format.codebooks import CODEBOOK_SIZE
from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.presets import GROUP_SIZE, MAX_BITS, Preset, TokenScale, check_head_dim


#: Bounds of a decode gain: calibration's gains stay within a few percent of 1; anything far outside
#: is a corrupted or foreign artifact, not a tuning choice.
GAIN_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class ComponentCodec:
    """Keys or values of one layer: tensors have a leading KV-head axis H."""

    basis: torch.Tensor  # float32 [H, D, D]
    mean: torch.Tensor  # float32 [H, D]
    scale: torch.Tensor  # float32 [H, D]
    bits: torch.Tensor  # int32 [H, G]
    codebooks: torch.Tensor  # float32 [H, G, CODEBOOK_SIZE]
    token_scale: TokenScale
    gain: torch.Tensor | None = None  # float32 [H]: decode-only gain (None: 1)

    @property
    def decode_scale(self) -> torch.Tensor:
        """float32 [H, D]: the per-coordinate scale decoding uses (``scale * gain``)."""
        return self.scale if self.gain is None else self.scale * self.gain[:, None]

    def with_gain(self, gain: float) -> ComponentCodec:
        """This component decoding at one ``gain`` for every head (1: no gain tensor)."""
        return replace(self, gain=None if gain == 1.0 else torch.full((self.num_kv_heads,), float(gain)))

    @property
    def num_kv_heads(self) -> int:
        return self.basis.shape[0]

    @property
    def head_dim(self) -> int:
        return self.basis.shape[-1]

    @property
    def code_bytes(self) -> torch.Tensor:
        """int64 [H]: packed code bytes per head-token of this component."""
        return self.bits.long().sum(-1)

    def to(self, device: torch.device | str) -> ComponentCodec:
        return replace(
            self,
            basis=self.basis.to(device),
            mean=self.mean.to(device),
            scale=self.scale.to(device),
            bits=self.bits.to(device),
            codebooks=self.codebooks.to(device),
            gain=None if self.gain is None else self.gain.to(device),
        )

    def validate(self, what: str) -> None:
        h, d = self.num_kv_heads, self.head_dim
        check_head_dim(d)
        g = d // GROUP_SIZE
        shapes = {
            "basis": (self.basis, (h, d, d)),
            "mean": (self.mean, (h, d)),
            "scale": (self.scale, (h, d)),
            "bits": (self.bits, (h, g)),
            "codebooks": (self.codebooks, (h, g, CODEBOOK_SIZE)),
        }
        if self.gain is not None:
            shapes["gain"] = (self.gain, (h,))
        for name, (t, shape) in shapes.items():
            if tuple(t.shape) != shape:
                raise FormatError(f"{what}.{name} has shape {tuple(t.shape)}, expected {shape}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FormatError(f"{what}.{name} contains NaN or inf")
        if self.bits.is_floating_point() or self.bits.min() < 0 or self.bits.max() > MAX_BITS:
            raise FormatError(f"{what}.bits must be integers in [0, {MAX_BITS}]")
        if (self.scale <= 0).any():
            raise FormatError(f"{what}.scale must be positive")
        if self.gain is not None and not ((self.gain >= GAIN_RANGE[0]) & (self.gain <= GAIN_RANGE[1])).all():
            raise FormatError(f"{what}.gain must lie in [{GAIN_RANGE[0]}, {GAIN_RANGE[1]}]")
        eye = torch.eye(d, dtype=torch.float64, device=self.basis.device)
        gram = self.basis.double().transpose(-1, -2) @ self.basis.double()
        err = (gram - eye).abs().max().item()
        if err > 1e-4:
            raise FormatError(f"{what}.basis is not orthonormal (max |U^T U - I| = {err:.2e})")
        levels = 1 << self.bits.long()
        idx = torch.arange(CODEBOOK_SIZE, device=self.bits.device)
        used = idx.view(1, 1, -1) < levels[..., None]
        step = self.codebooks[..., 1:] - self.codebooks[..., :-1]
        if (step[used[..., 1:]] < 0).any():
            raise FormatError(f"{what}.codebooks must be ascending")


def max_slot_bytes(head_dim: int, preset: Preset) -> int:
    """Largest slot a layer can use: every coordinate of K and V at MAX_BITS, plus the token fields."""
    return 2 * head_dim * MAX_BITS // 8 + preset.meta_bytes


@dataclass(frozen=True)
class LayerCodec:
    """Everything needed to encode, decode and attend over one layer's packed cache.

    ``layer_slot_bytes`` is this layer's slot size when calibration moved bytes between layers
    (the preset's size is then the mean over layers); None means the preset's size.
    """

    preset: Preset
    key: ComponentCodec
    value: ComponentCodec
    layer_slot_bytes: int | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.key.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.key.head_dim

    @property
    def slot_bytes(self) -> int:
        """Bytes per head-token of this layer (token fields, codes and padding)."""
        return self.preset.slot_bytes(self.head_dim) if self.layer_slot_bytes is None else self.layer_slot_bytes

    @property
    def data_bytes(self) -> int:
        """Bytes of packed codes per head-token the slot allows."""
        return self.slot_bytes - self.preset.meta_bytes

    def to(self, device: torch.device | str) -> LayerCodec:
        return replace(self, key=self.key.to(device), value=self.value.to(device))

    def validate(self) -> LayerCodec:
        """Check shapes, values and that every head's codes fit the preset's slot; returns self."""
        self.key.validate("key")
        self.value.validate("value")
        if self.key.num_kv_heads != self.value.num_kv_heads or self.key.head_dim != self.value.head_dim:
            raise FormatError("key and value codecs disagree on num_kv_heads / head_dim")
        if (self.key.token_scale, self.value.token_scale) != self.preset.token_scales:
            raise FormatError(
                f"token scales {self.key.token_scale.name}/{self.value.token_scale.name} do not match "
                f"preset {self.preset.name} ({self.preset.method})"
            )
        if self.layer_slot_bytes is not None and not self.preset.meta_bytes < self.layer_slot_bytes <= max_slot_bytes(
            self.head_dim, self.preset
        ):
            raise FormatError(
                f"layer slot of {self.layer_slot_bytes} B is outside 1 .. {max_slot_bytes(self.head_dim, self.preset)} "
                f"code bytes plus {self.preset.meta_bytes} B of token fields at head_dim {self.head_dim}"
            )
        used = self.key.code_bytes + self.value.code_bytes
        budget = self.data_bytes
        if (used > budget).any():
            raise FormatError(
                f"bit allocation needs {int(used.max())} code bytes per head-token, "
                f"preset {self.preset.name} allows {budget} at head_dim {self.head_dim}"
                + ("" if self.layer_slot_bytes is None else f" in this layer's {self.layer_slot_bytes} B slot")
            )
        return self

    # ---- slot layout: [token fields (fp16)] [K groups] [V groups] [zero padding] ----

    @property
    def key_field_offset(self) -> int:
        return 0

    @property
    def value_field_offset(self) -> int:
        return 2 * self.key.token_scale.fields

    def key_group_offsets(self) -> torch.Tensor:
        """int64 [H, G] byte offset of each key group inside the slot."""
        return group_offsets(self.key.bits, self.preset.meta_bytes)

    def value_group_offsets(self) -> torch.Tensor:
        """int64 [H, G] byte offset of each value group (right after that head's key groups)."""
        start = self.preset.meta_bytes + self.key.code_bytes  # [H]
        return group_offsets(self.value.bits, 0) + start[:, None]
