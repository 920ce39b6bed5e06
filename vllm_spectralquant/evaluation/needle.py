"""Needle-in-a-haystack retrieval: a random number hidden at a depth of a long corpus passage.

The haystack is corpus text (token ids) of the requested length; the needle sentence is inserted at
the given depth (fraction of the haystack) on a sentence boundary; the prompt ends with the
question, and a trial passes when the greedy answer contains the number.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vllm_spectralquant.evaluation.metrics import MODEL_NAME

if TYPE_CHECKING:
    from vllm_spectralquant.corpus import HeldOut

NEEDLE = "The special magic number is {value}. Remember it: {value}."
QUESTION = "\n\nWhat is the special magic number mentioned in the text above? The special magic number is"


@dataclass(frozen=True)
class NeedleTrial:
    context_tokens: int
    depth: float
    value: str
    prompt_ids: list[int]


def build_trials(tokenizer, haystack_ids: Sequence[int], context_lengths: Sequence[int], depths: Sequence[float], seed: int = 0) -> list[NeedleTrial]:
    """One trial per (context length, depth); prompts are token-id lists of exactly ``context_tokens``."""
    rng = random.Random(seed)
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    period = set(tokenizer(".", add_special_tokens=False)["input_ids"])
    trials = []
    for length in context_lengths:
        for depth in depths:
            value = str(rng.randint(10000, 99999))
            needle = tokenizer(" " + NEEDLE.format(value=value), add_special_tokens=False)["input_ids"]
            filler = length - len(needle) - len(question)
            if filler <= 0 or filler > len(haystack_ids):
                raise ValueError(f"cannot build a {length}-token needle prompt from a {len(haystack_ids)}-token haystack")
            start = rng.randint(0, len(haystack_ids) - filler)
            hay = list(haystack_ids[start : start + filler])
            cut = int(depth * filler)
            # Move the insertion point to just after the nearest sentence end, so the needle reads naturally.
            for j in range(cut, min(cut + 64, filler)):
                if hay[j] in period:
                    cut = j + 1
                    break
            trials.append(NeedleTrial(length, depth, value, hay[:cut] + needle + hay[cut:] + question))
    return trials


def served_trials(tokenizer, text: HeldOut, context_lengths: Sequence[int], depths: Sequence[float]) -> list[NeedleTrial]:
    """:func:`build_trials` over the corpus ``text`` with every prompt started by ``text.prefix``, as served
    sequences start (``context_tokens`` does not count it): the trials of ``spectralquant eval``."""
    trials = build_trials(tokenizer, text.ids.tolist(), context_lengths, depths)
    return [replace(t, prompt_ids=text.prefix + t.prompt_ids) for t in trials]


def run_trial(client, trial: NeedleTrial, max_tokens: int = 8) -> bool:
    resp = client.completions.create(model=MODEL_NAME, prompt=trial.prompt_ids, max_tokens=max_tokens, temperature=0.0)
    return trial.value in resp.choices[0].text


def pass_rate(client, trials: Sequence[NeedleTrial]) -> tuple[float, list[bool]]:
    results = [run_trial(client, t) for t in trials]
    return sum(results) / max(len(results), 1), results
