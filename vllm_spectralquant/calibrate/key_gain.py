"""Choosing each preset's decode-only key gain by the model's own loss on calibration windows.

Packed keys decode as ``mean + g (k_hat - mean)`` (``ComponentCodec.gain``; codes and bytes do not
change). Quantisation shrinks ``k_hat`` towards the mean, flattening the attention over packed keys;
``g > 1`` sharpens it again and also amplifies the coding noise. Where the balance lies depends on the
model: served, g = 1.04 takes SmolLM2-135M's sq2_5bit from +1.34 to +0.66 % perplexity and costs
Qwen2.5-Coder-1.5B a point on every preset (BENCHMARKS.md, twelfth session).

Local criteria do not see it: on SmolLM2's calibration windows the attention-output error and the
attention KL of every layer are smallest at g = 1 for every preset (thirteenth session), while its
perplexity improves up to 1.04. So the gain is chosen on what the eval measures: the next-token loss
of calibration windows run as serving runs them (chunked prefill: a query sees the packed keys and
values of the chunks before its own, the exact ones of its own chunk, and the first ``sink_tokens``
positions exact in bf16), for each candidate gain, paired per window against g = 1. A gain other than
1 is kept only where its mean improvement exceeds ``MARGIN_SE`` standard errors of that paired
difference, so a model that does not gain stays at 1. Every ``LOOK_EVERY`` windows a candidate already
worse than 1 by more than ``MARGIN_SE`` standard errors is dropped, and a preset whose candidates are all
dropped stops there: on Qwen2.5 every gain loses by more than 2 SE within 4-8 windows, so its choice
costs about a quarter of the passes (BENCHMARKS.md, fourteenth session). Dropping losers early cannot make a worse gain win; it can only stop a candidate that a
longer run would have rescued, which the 2-SE margin makes rare.

The windows are the calibration text cut into ``GAIN_WINDOW_TOKENS``-token windows at positions 0..T-1,
as a served request reads it: the gain's effect grows with the count of packed keys in the context, and
the calibration's own 512-token windows, spread over the positions, hide it (on SmolLM2 they chose 1.02 /
1 / 1 where 1024-token windows choose 1.04 / 1.04 / 1.02; BENCHMARKS.md, fifteenth session).

The model runs through transformers (no vLLM; calibrate/served_prefill.py), one forward per window,
preset and candidate still in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from vllm_spectralquant.calibrate.served_prefill import CHUNK_TOKENS, ServedPrefill, reads_packed_keys, served_loss
from vllm_spectralquant.format.params import LayerCodec

#: Candidate gains besides 1 (BENCHMARKS.md, twelfth session: SmolLM2's optimum lies at 1.02-1.05, flat
#: beyond; Qwen2.5 loses from 1.02 on).
GAIN_CANDIDATES = (1.02, 1.04)
#: A gain must beat g = 1 by this many standard errors of the paired per-window loss difference.
MARGIN_SE = 2.0
#: Windows between two looks at the candidates, when those worse than 1 by ``MARGIN_SE`` are dropped.
LOOK_EVERY = 4
#: ``--key-gain auto``: choose each preset's gain here.
KEY_GAIN_AUTO = "auto"
#: Windows the choice runs on (each costs a forward pass per preset and candidate). On SmolLM2, 8 windows of
#: 1024 tokens resolve the gains only for some draws of the corpus and 16 for every preset; Qwen2.5's losses
#: from any gain show at 4 (BENCHMARKS.md, thirteenth and fifteenth sessions).
GAIN_WINDOWS = 16
#: Tokens in each window the choice scores, at positions 0..T-1 as a served request. The gain's benefit
#: grows with the packed keys a query reads: on SmolLM2's calibration text, windows of 512 tokens (spread
#: over the context or at position 0) do not resolve it, while windows of 1024 at position 0 choose
#: 1.04 / 1.04 / 1.02, what the held-out eval prefers (BENCHMARKS.md, fifteenth session).
GAIN_WINDOW_TOKENS = 1024



def candidate_gains(gains: Sequence[float] = GAIN_CANDIDATES) -> tuple[float, ...]:
    """The gains a choice compares: 1 first, then each of ``gains`` other than 1."""
    return (1.0, *(float(g) for g in gains if float(g) != 1.0))


def choice_passes(windows: int, presets: int, gains: Sequence[float] = GAIN_CANDIDATES) -> int:
    """Forward passes of a choice at most (``choose_key_gains`` reports the dropped ones as done)."""
    return windows * presets * len(candidate_gains(gains))


def spread_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed order, so that every prefix is spread over the range (0, n/2, n/4, 3n/4, ...):
    a choice that stops early has seen windows from all over the corpus and the positions."""
    bits = max(1, (n - 1).bit_length())
    rev = (int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits))
    return [j for j in rev if j < n]


@dataclass(frozen=True)
class GainChoice:
    """Per-window losses of one preset at gain 1 and at each candidate, and the gain chosen."""

    gains: tuple[float, ...]  # 1 first
    loss: list[list[float]]  # [gain][window], nats; a dropped candidate has fewer windows than planned
    gain: float
    planned: int = 0  # windows the choice had (0: as many as gain 1 was scored on)
    window_tokens: int = 0  # tokens per window (0: not recorded)

    def paired(self, i: int) -> tuple[float, float]:
        """(mean, standard error) of candidate i's per-window loss minus gain 1's (nats)."""
        d = [a - b for a, b in zip(self.loss[i], self.loss[0])]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else math.inf
        return mean, se

    def clearly_worse(self, i: int) -> bool:
        """Candidate i loses to gain 1 by more than ``MARGIN_SE`` paired standard errors."""
        m, se = self.paired(i)
        return m > MARGIN_SE * se

    def describe(self) -> str:
        planned = self.planned or len(self.loss[0])
        parts = []
        for i, g in enumerate(self.gains[1:], 1):
            m, se = self.paired(i)
            n = len(self.loss[i])
            dropped = f", dropped after {n} windows" if n < planned else ""
            parts.append(f"{g:g}: {100 * m:+.2f} ± {100 * se:.2f}{dropped}")
        scored = len(self.loss[0])
        windows = f"{planned} windows" if scored == planned else f"stopped after {scored} of {planned} windows"
        windows += f" of {self.window_tokens} tokens" if self.window_tokens else ""
        return f"gain {self.gain:g} ({windows}; loss vs 1, 1e-2 nats: " + ", ".join(parts) + ")"


def pick_gain(gains: Sequence[float], loss: list[list[float]], planned: int = 0, window_tokens: int = 0) -> GainChoice:
    """The choice from per-window losses [gain][window] (``gains[0]`` = 1) of a choice over ``planned``
    windows (0: all that gain 1 has): the candidate with the lowest mean loss among those scored on every
    planned window and beating 1 by more than ``MARGIN_SE`` paired standard errors, else 1."""
    choice = GainChoice(tuple(gains), loss, 1.0, planned, window_tokens)
    best, best_mean = 1.0, 0.0
    for i, g in enumerate(choice.gains[1:], 1):
        m, se = choice.paired(i)
        if len(loss[i]) == (planned or len(loss[0])) and m < best_mean and -m > MARGIN_SE * se:
            best, best_mean = g, m
    return replace(choice, gain=best)


def choose_key_gains(
    model: torch.nn.Module,
    windows: torch.Tensor,
    position_offsets: Sequence[int],
    codecs: Mapping[str, Sequence[LayerCodec]],
    *,
    gains: Sequence[float] = GAIN_CANDIDATES,
    chunk: int = CHUNK_TOKENS,
    sink_tokens: int = 1,
    look_every: int = LOOK_EVERY,
    progress: Callable[[int], None] | None = None,
) -> dict[str, GainChoice]:
    """Each preset's key gain: the candidate (or 1) with the lowest mean served loss over windows [N, T],
    where it beats 1 by more than ``MARGIN_SE`` paired standard errors; else 1.

    Windows run in the given order (``spread_order`` makes early looks representative); every
    ``look_every`` windows (0: never) the candidates clearly worse than 1 are dropped, and a preset with
    none left stops. ``codecs``: preset name -> one codec per layer (any gain they carry is ignored).
    ``progress(n)`` after every forward pass (n = 1) and for the passes a drop saves.
    """
    if not reads_packed_keys(windows.shape[1], chunk):
        raise ValueError(f"windows of {windows.shape[1]} tokens never read packed keys with {chunk}-token chunks")
    candidates = candidate_gains(gains)
    tick = progress if progress is not None else (lambda n: None)
    out = {}
    for name, layer_codecs in codecs.items():
        served = [ServedPrefill(with_key_gain(layer_codecs, g), chunk, sink_tokens) for g in candidates]
        loss: list[list[float]] = [[] for _ in candidates]
        active = list(range(1, len(candidates)))
        for n, (w, offset) in enumerate(zip(windows, position_offsets), 1):
            for i in (0, *active):
                loss[i].append(served_loss(model, w, int(offset), served[i]))
                tick(1)
            if look_every and n % look_every == 0:
                look = GainChoice(candidates, loss, 1.0)
                active = [i for i in active if not look.clearly_worse(i)]
            if not active:
                break
        tick(len(windows) * len(candidates) - sum(len(row) for row in loss))  # the passes dropping saved
        out[name] = pick_gain(candidates, loss, len(windows), windows.shape[1])
    return out


def with_key_gain(codecs: Sequence[LayerCodec], gain: float) -> list[LayerCodec]:
    """The codecs with every layer's keys decoding at ``gain`` (1: no gain tensor)."""
    return [replace(c, key=c.key.with_gain(gain)) for c in codecs]
