"""Codec: bit-exact packing, slot layout, and quantisation error against Lloyd-Max theory."""

import pytest
import torch

from vllm_spectralquant.format import PRESETS, decode_slots, encode_slots, get_preset
from vllm_spectralquant.format.bitpack import group_offsets, pack_groups, unpack_groups
from vllm_spectralquant.format.codebooks import gaussian_lloyd_max, pad_codebook
from vllm_spectralquant.format.codec import decode_rotated, encode_component
from vllm_spectralquant.format.hadamard import hadamard
from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import MAX_BITS, TokenScale
from vllm_spectralquant.format.synthetic import random_codec
from vllm_spectralquant.format.turboquant import turboquant_codec

BUDGETS = {
    ("2_5bit", 128): 86, ("3bit", 128): 102, ("4bit", 128): 134,
    ("2_5bit", 64): 43, ("3bit", 64): 51, ("4bit", 64): 67,
}


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_preset_budgets(name, head_dim):
    p = PRESETS[name]
    assert p.slot_bytes(head_dim) == BUDGETS[(p.tier, head_dim)]
    assert p.compression_vs_bf16(head_dim) == pytest.approx(4 * head_dim / BUDGETS[(p.tier, head_dim)])
    assert get_preset(p.kv_cache_dtype) is p


def test_turboquant_layout_matches_vllm_sizes():
    # At head_dim 128 the 3bit/4bit tiers are exactly vLLM's turboquant_3bit_nc / 4bit_nc layouts.
    for tier, bits in (("3bit", 3), ("4bit", 4)):
        c = turboquant_codec(PRESETS[f"tq{tier}"], 128, 2)
        assert (c.key.bits == bits).all() and (c.value.bits == bits).all()
        assert c.slot_bytes == 2 * (128 * bits // 8) + 6


def test_bitpack_roundtrip_every_width():
    gen = torch.Generator().manual_seed(0)
    h, g = 4, 16
    for _ in range(5):
        bits = torch.randint(0, MAX_BITS + 1, (h, g), generator=gen, dtype=torch.int32)
        offsets = group_offsets(bits, 3)
        size = int((offsets[:, -1] + bits[:, -1]).max()) + 5
        codes = torch.randint(0, 256, (37, h, g, 8), generator=gen) % (1 << bits.long())[None, :, :, None]
        slots = torch.full((37, h, size), 0xA5, dtype=torch.uint8)
        pack_groups(codes, bits, offsets, slots)
        assert torch.equal(unpack_groups(slots, bits, offsets), codes)
        # Bytes outside the groups are untouched.
        assert (slots[..., :3] == 0xA5).all()


def test_bitpack_bit_order_is_little_endian():
    # Two 3-bit groups: codes 1..8 (mod 8) -> stream bits documented in docs/FORMAT.md.
    bits = torch.tensor([[3]], dtype=torch.int32)
    codes = torch.tensor([[[[1, 2, 3, 4, 5, 6, 7, 0]]]])
    slots = torch.zeros(1, 1, 3, dtype=torch.uint8)
    pack_groups(codes, bits, torch.zeros(1, 1, dtype=torch.long), slots)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes.flatten()))
    assert slots.flatten().tolist() == [(stream >> (8 * k)) & 0xFF for k in range(3)]


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_encode_decode_codes_are_bit_exact(name, head_dim):
    codec = random_codec(PRESETS[name], head_dim, 2, seed=head_dim)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(33, 2, head_dim, generator=gen) * 3
    v = torch.randn(33, 2, head_dim, generator=gen)
    slots = encode_slots(k, v, codec)
    assert slots.shape == (33, 2, codec.slot_bytes) and slots.dtype == torch.uint8
    # Re-encoding the decoded vectors gives the same bytes (codes are stable), except for the
    # norm-corrected fp16 key norm, which may move by one fp16 ulp.
    kh, vh = decode_slots(slots, codec)
    again = encode_slots(kh, vh, codec)
    meta = codec.preset.meta_bytes
    assert torch.equal(again[..., meta:], slots[..., meta:])
    # And decoding the codes via the rotated frame agrees with decode_slots.
    keys, _ = decode_rotated(slots, codec)
    k_codes, _, _ = encode_component(k, codec.key)
    assert torch.equal(torch.gather(codec.key.codebooks[None].expand(33, -1, -1, -1), 3, k_codes).flatten(2), keys.levels)


def _identity_codec(head_dim: int, bits: int, mode=TokenScale.NONE) -> LayerCodec:
    g = head_dim // 8
    cb = pad_codebook(gaussian_lloyd_max(bits)[0])
    comp = ComponentCodec(
        basis=torch.eye(head_dim)[None],
        mean=torch.zeros(1, head_dim),
        scale=torch.ones(1, head_dim),
        bits=torch.full((1, g), bits, dtype=torch.int32),
        codebooks=cb.expand(1, g, -1).clone(),
        token_scale=mode,
    )
    preset = PRESETS["sq4bit"] if bits * head_dim // 4 <= PRESETS["sq4bit"].data_bytes(head_dim) else None
    return LayerCodec(preset, comp, comp) if preset else None


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_error_matches_lloyd_max(bits):
    codec = _identity_codec(64, bits)
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, 1, 64, generator=gen)
    xh, _ = decode_slots(encode_slots(x, x, codec), codec)
    mse = ((xh - x) ** 2).mean().item()
    theory = gaussian_lloyd_max(bits)[1]
    assert theory * 0.9 < mse < theory * 1.1


@pytest.mark.parametrize("tier,bits", [("3bit", 3), ("4bit", 4)])
def test_turboquant_keys_error_matches_lloyd_max(tier, bits):
    # Unit-vector coordinates after the Hadamard rotation are ~N(0, 1/D): relative MSE ~ D(b).
    codec = turboquant_codec(PRESETS[f"tq{tier}"], 128, 1)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(3000, 1, 128, generator=gen)
    kh, _ = decode_slots(encode_slots(k, k, codec), codec)
    rel = (((kh - k) ** 2).sum(-1) / (k**2).sum(-1)).mean().item()
    theory = gaussian_lloyd_max(bits)[1]
    assert rel < theory * 1.15
    # Norm correction keeps each decoded norm (up to fp16 rounding).
    assert torch.allclose(kh.norm(dim=-1), k.norm(dim=-1), rtol=2e-3)


def test_hadamard_is_orthonormal():
    h = hadamard(64, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(64, dtype=torch.float64), atol=1e-12)


def test_nonfinite_defined_behaviour_when_not_strict():
    codec = random_codec(PRESETS["sq3bit"], 64, 2)
    k = torch.randn(4, 2, 64)
    k[1, 0, 3] = float("nan")
    k[2, 1, :] = float("inf")
    slots = encode_slots(k, k, codec, strict=False)
    kh, vh = decode_slots(slots, codec)
    assert torch.isfinite(kh).all() and torch.isfinite(vh).all()
    # Tokens without bad values encode exactly as they would alone.
    assert torch.equal(slots[[0, 3]], encode_slots(k[[0, 3]], k[[0, 3]], codec))


def test_key_gain_is_decode_only():
    """A key gain leaves the bytes alone and decodes keys as mean + gain (x_hat - mean); values untouched."""
    from dataclasses import replace

    from vllm_spectralquant.format.errors import FormatError

    codec = random_codec(get_preset("sq2_5bit"), 64, 3, seed=8, key_gain=True)
    plain = replace(codec, key=replace(codec.key, gain=None))
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(20, 3, 64, generator=gen), torch.randn(20, 3, 64, generator=gen)
    slots = encode_slots(k, v, codec)
    assert torch.equal(slots, encode_slots(k, v, plain))
    kg, vg = decode_slots(slots, codec)
    kp, vp = decode_slots(slots, plain)
    m, g = codec.key.mean, codec.key.gain[:, None]
    torch.testing.assert_close(kg, m + g * (kp - m), rtol=1e-5, atol=1e-5)
    assert torch.equal(vg, vp)
    for bad in (torch.full((3,), 3.0), torch.full((3,), float("nan")), torch.ones(2)):
        with pytest.raises(FormatError, match="key.gain"):
            replace(codec, key=replace(codec.key, gain=bad)).validate()
