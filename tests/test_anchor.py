"""Sink-anchored value means (calibrate/anchor.py) and the sink value the attention profile measures."""

import pytest
import torch

from vllm_spectralquant.calibrate.anchor import anchor_mean
from vllm_spectralquant.calibrate.stats import AttentionProfile
from vllm_spectralquant.format import PRESETS, decode_slots, encode_slots
from vllm_spectralquant.format.synthetic import random_codec


@pytest.mark.parametrize("name", ["sq2_5bit", "sq3bit", "sq4bit"])
def test_anchored_mean_codes_the_sink_value_exactly(name):
    codec = random_codec(PRESETS[name], 64, 3, seed=7)
    gen = torch.Generator().manual_seed(11)
    # A sink value near the head's mean (as real sinks are: 0.3 sigma per coordinate on SmolLM2), and one
    # coordinate far outside the codebook's range, which moves by at most half a step.
    rot = 0.3 * torch.randn(3, 64, generator=gen)
    rot[:, 0] = 40.0
    sink = codec.value.mean + torch.einsum("he,hde->hd", rot * codec.value.scale, codec.value.basis)
    found = torch.tensor([True, False, True])
    value = anchor_mean(codec.value, sink, found)
    anchored = codec.__class__(codec.preset, codec.key, value, codec.layer_slot_bytes).validate()
    keys = torch.randn(1, 3, 64, generator=gen)
    _, before = decode_slots(encode_slots(keys, sink[None], codec), codec)
    _, after = decode_slots(encode_slots(keys, sink[None], anchored), anchored)
    def rotated_err(x):  # [H, D] per rotated coordinate, sigma units
        return torch.einsum("hd,hde->he", x - sink, codec.value.basis) / codec.value.scale

    e_before, e_after = rotated_err(before[0]), rotated_err(after[0])
    for h in (0, 2):  # anchored heads: exact up to float rounding, but for the out-of-range coordinate
        assert float(e_after[h, 1:].abs().max()) < 1e-4
        assert float(e_before[h, 1:].abs().max()) > 1e-2
        assert float(e_after[h, 0].abs()) > 1.0
    assert torch.equal(value.mean[1], codec.value.mean[1])  # a head without sinks keeps its mean
    # Every other token sees its codes shifted by less than half a level step per coordinate.
    shift = torch.einsum("hd,hde->he", value.mean - codec.value.mean, codec.value.basis) / codec.value.scale
    steps = codec.value.codebooks.diff(dim=-1)
    used = torch.arange(1, steps.shape[-1] + 1).view(1, 1, -1) < (1 << codec.value.bits.long())[..., None]
    widest = torch.where(used, steps, 0.0).amax(-1).repeat_interleave(8, dim=-1)  # [H, D]
    coded = codec.value.bits.repeat_interleave(8, dim=-1) > 0
    assert bool((shift.abs()[coded] <= 0.5 * widest[coded] + 1e-5).all())


def test_attention_profile_finds_the_sink_value():
    """A key every query attends to is a sink; its value is what ``sink_value`` returns."""
    t, d = 96, 8
    gen = torch.Generator().manual_seed(3)
    q = torch.zeros(1, t, 2, d)
    q[..., 0] = 4.0
    k = torch.randn(1, t, 1, d, generator=gen) * 0.1
    k[0, 2, 0, 0] = 3.0  # position 2 takes most of every later query's attention
    k[0, 40, 0, 0] = 3.0  # and position 40 as much, for the queries after it
    v = torch.randn(1, t, 1, d, generator=gen)
    v[0, 40, 0] = v[0, 2, 0]  # sinks carry the same value
    prof = AttentionProfile.zeros(1, d)
    prof.update(q, k, v, 1.0)
    value, found = prof.sink_value(1)
    assert bool(found[0])
    torch.testing.assert_close(value[0].float(), v[0, 2, 0], rtol=0, atol=1e-5)
    # With every leading position exact, position 40 alone remains.
    value8, found8 = prof.sink_value(AttentionProfile.LEADING)
    assert bool(found8[0])
    torch.testing.assert_close(value8[0].float(), v[0, 40, 0], rtol=0, atol=1e-5)
    merged = prof.merge(prof)
    torch.testing.assert_close(merged.sink_value(1)[0], value)
    # Uniform attention: no key is a sink.
    flat = AttentionProfile.zeros(1, d)
    flat.update(torch.zeros(1, t, 2, d), k, v, 1.0)
    assert not bool(flat.sink_value(1)[1][0])
    with pytest.raises(ValueError, match="sink_tokens"):
        prof.sink_value(AttentionProfile.LEADING + 1)
