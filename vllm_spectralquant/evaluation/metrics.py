"""Perplexity via ``prompt_logprobs`` and greedy continuations, through vLLM's OpenAI API.

Token ids travel as ids (prompts as id lists, completions with ``return_tokens_as_token_ids``),
so nothing depends on detokenisation round trips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

MODEL_NAME = "model"  # ServerOptions sets --served-model-name model


def prompt_nll(client, token_ids: Sequence[int], first_scored: int = 1) -> tuple[float, int]:
    """Sum of -log p(token_i | tokens_<i) over i = first_scored..n-1 from vLLM's prompt_logprobs, and the count.

    token_i is predicted by the query at position i-1, so ``first_scored = prefill_chunk + 1`` scores
    only predictions made in the second or a later prefill chunk (queries that attend over packed K/V).
    """
    if not 1 <= first_scored < len(token_ids):
        raise ValueError(f"first_scored={first_scored} must lie in [1, {len(token_ids) - 1}] for a {len(token_ids)}-token window")
    resp = client.completions.create(
        model=MODEL_NAME, prompt=list(token_ids), max_tokens=1, temperature=0.0, extra_body={"prompt_logprobs": 1}
    )
    entries = resp.choices[0].model_extra.get("prompt_logprobs") or getattr(resp.choices[0], "prompt_logprobs", None)
    if entries is None:
        raise RuntimeError("the server returned no prompt_logprobs")
    total, count = 0.0, 0
    for tok, entry in zip(token_ids[first_scored:], entries[first_scored:]):
        item = entry.get(str(tok))
        if item is None:
            raise RuntimeError(f"prompt_logprobs lack the prompt token {tok}")
        total -= item["logprob"] if isinstance(item, dict) else item.logprob
        count += 1
    return total, count


def window_nlls(client, windows: Sequence[Sequence[int]], concurrency: int = 1, first_scored: int = 1) -> list[tuple[float, int]]:
    """(NLL sum, scored tokens) of each window, in window order (``prompt_nll`` per window)."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda w: prompt_nll(client, w, first_scored), windows))


def perplexity(client, windows: Sequence[Sequence[int]], concurrency: int = 1, first_scored: int = 1) -> float:
    """exp(mean NLL) over the scored tokens (index >= first_scored) of all windows."""
    parts = window_nlls(client, windows, concurrency, first_scored)
    total = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    return math.exp(total / count)


def greedy_token_ids(client, prompt, max_tokens: int) -> list[int]:
    """Greedy completion of a text or token-id prompt, as generated token ids."""
    resp = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    return [int(t.split(":", 1)[1]) for t in resp.choices[0].logprobs.tokens]


def greedy_many(client, prompts: Sequence, max_tokens: int, concurrency: int = 1) -> list[list[int]]:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda p: greedy_token_ids(client, p, max_tokens), prompts))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(candidate: Sequence[Sequence[int]], reference: Sequence[Sequence[int]], first: int) -> float:
    """Fraction of prompts whose first ``first`` generated tokens equal the reference's."""
    hits = sum(common_prefix(c, r) >= min(first, len(r)) for c, r in zip(candidate, reference))
    return hits / max(len(reference), 1)
