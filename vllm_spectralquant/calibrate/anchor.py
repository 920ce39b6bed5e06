"""Sink-anchored value means: the value that attention sinks carry lands exactly on the codebook grid.

Why. Many heads put most of their attention on a few "sink" tokens in the middle of the text (on
SmolLM2-135M, layers 3-10: " the" tokens taking 0.1-0.35 of the mass each), and those tokens carry
almost the same small value vector every time. With a codebook of 2^b levels there is no level at the
centre, so a vector near the mean is coded with an error as large as a typical token's (relative
error ~1 for the sinks, against ~0.25 for other tokens), and because every sink has the same value
and so the same code, their errors add up coherently in the attention output. Shifting the value
mean of each head by less than half a level step per coordinate puts the sink value exactly on
levels of the preset's own codebooks: the sinks decode to their value (up to the codebook's float
rounding), and every other token sees the same codebooks slightly shifted. A calibration-time choice
of the mean only, so no byte of the format changes.

Measured (bench/quality_probe.py, SmolLM2-135M, 8 held-out windows of 512): sq2_5bit +4.42 % ->
+1.69 % perplexity, sq3bit +1.76 % -> +0.28 % (BENCHMARKS.md, ninth session).
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_spectralquant.format.codec import quantize_rotated
from vllm_spectralquant.format.params import ComponentCodec
from vllm_spectralquant.format.presets import GROUP_SIZE

#: Largest shift, in sigmas, of a coordinate coded with 0 bits (decoded as its single level for every
#: token): its other tokens' error grows by the shift squared.
MAX_ZERO_BIT_SHIFT = 1.0


def anchor_mean(comp: ComponentCodec, sink_value: torch.Tensor, found: torch.Tensor) -> ComponentCodec:
    """``comp`` with its mean shifted so that ``sink_value`` encodes exactly.

    Args:
        comp: a fitted component (basis, mean, scale, bits and codebooks of one preset).
        sink_value: float [H, D], the value the head's sinks carry (``AttentionProfile.sink_value``).
        found: bool [H]; heads without sinks keep their mean.
    Returns:
        the component with ``mean`` [H, D] such that ``(sink_value - mean) @ basis / scale`` is a
        codebook level in every coordinate of the anchored heads where the sink lies inside the
        codebook's range. Each coordinate moves by at most half its group's widest level step
        (``MAX_ZERO_BIT_SHIFT`` sigmas for a 0-bit group), so a sink far outside the range does not drag
        every other token off its codebook.
    """
    target = sink_value.to(comp.mean)
    rotated = torch.einsum("hd,hde->he", target - comp.mean, comp.basis) / comp.scale  # [H, D]
    level = quantize_rotated(rotated[None], comp)[0]
    step = comp.codebooks.diff(dim=-1)  # [H, G, L - 1]
    used = torch.arange(1, step.shape[-1] + 1, device=step.device).view(1, 1, -1) < (1 << comp.bits.long())[..., None]
    limit = 0.5 * torch.where(used, step, 0.0).amax(-1)  # [H, G]
    limit = torch.where(comp.bits > 0, limit, MAX_ZERO_BIT_SHIFT).repeat_interleave(GROUP_SIZE, dim=-1)  # [H, D]
    delta = torch.maximum(torch.minimum(rotated - level, limit), -limit)
    shift = torch.einsum("he,hde->hd", delta * comp.scale, comp.basis)
    mean = torch.where(found.to(comp.mean.device)[:, None], comp.mean + shift, comp.mean)
    return dataclasses.replace(comp, mean=mean)
