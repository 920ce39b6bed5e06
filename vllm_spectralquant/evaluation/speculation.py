"""Speculative decoding checks: prompts that give ngram drafts something to hit, and vLLM's counters.

Used by tests/test_spec_decode.py (CPU) and bench/spec_decode.py (GPU, CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Sequence

#: vLLM's Prometheus counters for proposed and accepted draft tokens.
DRAFT_METRIC = "vllm:spec_decode_num_draft_tokens_total"
ACCEPTED_METRIC = "vllm:spec_decode_num_accepted_tokens_total"


def speculation_prompts(ids: Sequence[int], count: int, length: int = 60, stride: int = 300) -> list[list[int]]:
    """``count`` token-id prompts cut from ``ids``: even ones repeat the first half of their passage at
    the end (the model then tends to copy it, so prompt-lookup drafts get accepted), odd ones don't."""
    need = stride * (count - 1) + length
    if len(ids) < need:
        raise ValueError(f"speculation_prompts needs {need} token ids, got {len(ids)}")
    out = []
    for i in range(count):
        passage = list(ids[stride * i : stride * i + length])
        out.append(passage + passage[: length // 2] if i % 2 == 0 else passage)
    return out


def acceptance(server) -> tuple[float, float]:
    """(draft tokens proposed, draft tokens accepted) so far, from the server's /metrics."""
    return server.metric(DRAFT_METRIC) or 0.0, server.metric(ACCEPTED_METRIC) or 0.0


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length when one is a prefix), None if equal."""
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))
