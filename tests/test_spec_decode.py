"""Speculative decoding (ngram) over the packed cache: greedy outputs equal plain greedy decoding.

Two `vllm serve` runs with the same options, one with ``--speculative-config`` (ngram, 3 draft
tokens). Verify rows (1 + 3 query tokens) are decodes for our backend (reorder threshold 4) and go
through the decode kernel one row per token (``backend/decode_rows.py``), so a draft token is scored
with the arithmetic of a plain decode step. Half of the prompts repeat a passage, so ngram drafts get
accepted; the acceptance rate is printed (``pytest -s``) and must be well above zero, or the test
would not be exercising verification at all.

Requests go one at a time: with concurrent requests the two runs batch differently, and rounding
that depends on the batch shape can flip near-ties in either run (test_serve_e2e explains).
"""

from __future__ import annotations

import json

import pytest

from vllm_spectralquant.evaluation.metrics import greedy_token_ids
from vllm_spectralquant.evaluation.speculation import acceptance, first_difference, speculation_prompts

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PRESET = "spectralquant_sq4bit"
NUM_PROMPTS, OUTPUT_TOKENS = 16, 32  # 16 x 32 greedy tokens per run: ~2 min each on 2 cores
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


@pytest.fixture(scope="module")
def prompts(example_model_dir):
    from transformers import AutoTokenizer

    from vllm_spectralquant.corpus import read_corpus

    tok = AutoTokenizer.from_pretrained(example_model_dir)
    ids = tok(read_corpus(None)[:80000], add_special_tokens=False)["input_ids"]
    return speculation_prompts(ids[800:], NUM_PROMPTS)


def _run(model, artifact, prompts, extra=()):
    from vllm_spectralquant.serving import ServerOptions, VllmServer

    opts = ServerOptions(model, PRESET, artifact=artifact, max_model_len=512, max_num_seqs=4, extra_args=list(extra))
    with VllmServer(opts) as srv:
        client = srv.client()
        outs = [greedy_token_ids(client, p, OUTPUT_TOKENS) for p in prompts]
        drafts, accepted = acceptance(srv)
        log = srv.log()
    return outs, drafts, accepted, log


def test_ngram_speculation_keeps_greedy_outputs(example_model_dir, smollm2_artifact, prompts):
    plain, _, _, _ = _run(example_model_dir, smollm2_artifact, prompts)
    spec, drafts, accepted, log = _run(
        example_model_dir, smollm2_artifact, prompts, ["--speculative-config", json.dumps(SPECULATIVE)]
    )
    assert "SpectralQuant" in log  # our backend served it
    assert drafts > 0, "no draft tokens were proposed: speculation did not run"
    rate = accepted / drafts
    equal = sum(a == b for a, b in zip(plain, spec))
    print(f"\n[ngram k=3] prompts {NUM_PROMPTS}, identical {equal}, drafts {drafts:.0f}, accepted {accepted:.0f} "
          f"({rate:.1%})", flush=True)  # fmt: skip
    assert rate > 0.1, rate
    for i, (a, b) in enumerate(zip(plain, spec)):
        assert a == b, f"prompt {i}: speculative output differs from plain greedy at token {first_difference(a, b)}"
