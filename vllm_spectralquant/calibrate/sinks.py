"""How many leading tokens a model's cache must keep exact: its attention sinks, measured on the corpus.

A model's attention sink is a token with a massive, outlying key that most queries attend to. The
codebooks are fitted to ordinary tokens and clip it (a sink key coded at 3 bits comes back with a
relative error of 5-9 on Qwen2.5-Coder-1.5B), so the cache stores the first ``sink_tokens`` tokens of
a sequence exactly. Position 0 is the usual sink, but not the only one: when a window of
Qwen2.5-Coder starts on a weak token (" been"), the model makes position 1 its sink instead, and
with only position 0 exact that window's perplexity goes from 27 to 134 (bench/quality_probe.py).

Calibration windows start at arbitrary corpus positions, so they show where a model puts its sinks.
Per window we score every key by how far it is from the window's mean key, in units of the window's
RMS deviation (maximum over layers and KV heads). A window's sink is the most outlying of its first
:data:`PROBE_POSITIONS` tokens, if it is more outlying than every later token of the window; the cache
keeps every position up to the furthest sink seen, within :data:`MAX_SINK_TOKENS`. Windows start the way
served sequences do (with the tokenizer's BOS where it adds one, as Gemma's does). Measured with this score (ratio to the window's most
outlying later token): Qwen2.5-Coder's position-1 sink 1.39 (its position 0 there: 0.88); position 0
where it is the sink 1.03-1.18 (SmolLM2: 1.02-1.11); other leading tokens of real models up to 1.02,
but never above that window's position 0 (SmolLM2, 32 calibration windows: one position 2 at 1.02 next
to a position 0 at 1.07, which is why only the most outlying leading token counts). No margin above 1,
because the two mistakes cost very differently: a needless exact token costs 4 * head_dim / block_size
bytes per head-token (3-5 % of capacity), a missed sink hundreds of percent of perplexity on the
prompts that start like that window. (A model with random weights has no sinks, and its leading tokens
beat the rest by chance.)
"""

from __future__ import annotations

import torch

#: Leading positions scored per window.
PROBE_POSITIONS = 8
#: How much more outlying than any later token a leading token must be to count as a sink.
SINK_MARGIN = 1.0
#: Most exact tokens calibration recommends (each costs 4 * head_dim / block_size bytes per head-token).
MAX_SINK_TOKENS = 4


def key_outlier_scores(k: torch.Tensor) -> torch.Tensor:
    """Keys [B, T, H, D] of one layer -> float32 [B, T]: each token's distance from the window's mean key,
    in units of the window's RMS distance, maximised over KV heads."""
    kf = k.float()
    dev = (kf - kf.mean(1, keepdim=True)).norm(dim=-1)  # [B, T, H]
    rms = dev.pow(2).mean(1, keepdim=True).sqrt().clamp(min=1e-12)
    return (dev / rms).amax(-1)


def sink_positions(scores: torch.Tensor) -> torch.Tensor:
    """Scores [N, T] (T >= 2) -> bool [N, P], at most one True per window: its most outlying leading token,
    where that one is more outlying than every later token (times SINK_MARGIN). P = PROBE_POSITIONS, or
    T // 2 for short windows, so that every window keeps at least as many later tokens as probed ones."""
    n, t = scores.shape
    if t < 2:
        raise ValueError(f"sink detection needs windows of at least 2 tokens, got {t}")
    probe = min(PROBE_POSITIONS, t // 2)
    lead = scores[:, :probe]
    ordinary = scores[:, probe:].amax(1, keepdim=True)
    top = lead.argmax(1, keepdim=True)
    is_top = torch.zeros_like(lead, dtype=torch.bool).scatter_(1, top, True)
    return is_top & (lead > SINK_MARGIN * ordinary)


def choose_sink_tokens(is_sink: torch.Tensor, minimum: int = 1) -> int:
    """Exact leading tokens that cover every sink seen (bool [N, P] from :func:`sink_positions`) at a
    position below :data:`MAX_SINK_TOKENS`, and at least ``minimum``.

    A sink further out cannot be covered, so it buys nothing: it stays in the manifest's
    ``share_by_position`` (Gemma 3 270M: one of 32 windows at position 6, 1.08x its later tokens, where
    its normalised keys leave every token within 2.2 RMS units of the mean) but costs no bytes.
    """
    seen = is_sink[:, :MAX_SINK_TOKENS].any(0).nonzero().flatten()
    last = int(seen.max()) + 1 if seen.numel() else 0
    return max(minimum, last)
