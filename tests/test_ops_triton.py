"""The Triton kernels (run by Triton's CPU interpreter) against the torch reference, on fresh random inputs.

TRITON_INTERPRET=1 must be set before Triton itself is imported (Triton's own library functions are
defined at import), and other tests must keep dispatching to the torch reference, so unless this
process started with TRITON_INTERPRET=1 the module runs itself in a child pytest with it set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_spectralquant.format import PRESETS, CacheGeometry, paged_attention
from vllm_spectralquant.format.paged import store_kv as reference_store
from vllm_spectralquant.format.reference_attention import gather_context as reference_gather
from vllm_spectralquant.format.synthetic import random_codec, random_paged_batch

#: fp16 levels and queries feed the decode dots (fp32 accumulation): errors ~1e-3 of the output norm.
DECODE_TOL = 5e-3
#: store and gather are fp32 throughout.
GATHER_TOL = 1e-5


def test_triton_kernels_in_interpreter_process():
    """Runs this module's ``triton_interpreter`` tests in a child pytest with TRITON_INTERPRET=1.

    This process deselects them (tests/conftest.py); the child selects only them, so nothing is
    reported as skipped and a child that collects no tests fails (pytest exit 5).
    """
    import triton  # noqa: F401 - a dependency: its absence is a failure, not a skip

    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-m", "triton_interpreter", str(Path(__file__))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") % 2**31


# (preset, head_dim, kv_heads, group, block_size, sink_tokens, seq_lens)
CASES = [
    ("sq2_5bit", 64, 2, 4, 16, 1, [1, 17, 40, 33]),
    ("sq3bit", 32, 1, 1, 32, 0, [5, 64, 1]),
    ("sq4bit", 64, 1, 4, 32, 1, [70, 1, 31]),
    ("tq2_5bit", 64, 2, 1, 16, 0, [16, 3, 49]),
    ("tq3bit", 32, 2, 4, 16, 1, [1, 2, 47]),
    ("tq4bit", 64, 1, 4, 16, 1, [33, 18]),
    ("sq2_5bit", 32, 3, 1, 32, 1, [100, 9]),
]


def _case_id(case) -> str:
    name, d, h, g, bs, sink, lens = case
    return f"{name}-d{d}-h{h}-g{g}-bs{bs}-sink{sink}"


def _token_major(cache: torch.Tensor) -> torch.Tensor:
    """The same cache in vLLM's default token-major layout: logical [N, H, bs, C], physical [N, bs, H, C]."""
    n, h, bs, c = cache.shape
    out = torch.empty(n, bs, h, c, dtype=cache.dtype).permute(0, 2, 1, 3)
    out.copy_(cache)
    return out


#: Run only in the TRITON_INTERPRET=1 child process (deselected elsewhere by tests/conftest.py).
interpreted = pytest.mark.triton_interpreter


@interpreted
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("layout", ["contiguous", "token_major"])
def test_triton_matches_reference(case, layout):
    from vllm_spectralquant.ops import triton_kernels

    name, d, h, g, bs, sink, lens = case
    seed = _fresh_seed()
    codec = random_codec(PRESETS[name], d, h, seed=seed)
    batch = random_paged_batch(
        codec, lens, [1] * len(lens), block_size=bs, num_query_heads=h * g, sink_tokens=sink, padding_tokens=2, seed=seed
    )
    geo = batch.geometry
    cache = batch.kv_cache if layout == "contiguous" else _token_major(batch.kv_cache)
    msg = f"seed {seed}"

    # store: new tokens (some skipped with -1, some landing on sink offsets) into a copy of the cache
    gen = torch.Generator().manual_seed(seed)
    n = 37
    key = torch.randn(n + 3, h, d, generator=gen) * 3 + 1  # 3 padding rows past len(slot_mapping)
    value = torch.randn(n + 3, h, d, generator=gen)
    slots = torch.randperm(cache.shape[0] * bs, generator=gen)[:n]
    slots[::7] = -1
    expected = batch.kv_cache.clone()
    reference_store(key, value, expected, slots, codec, geo, strict=False)
    written = cache.clone()
    triton_kernels.store_kv(key, value, written, slots, codec, geo)
    mismatch = (written != expected).float().mean().item()
    # Codes can differ only where fp32 summation order moves a coordinate across a midpoint.
    assert mismatch < 2e-3, f"{msg}: {mismatch:.2%} of cache bytes differ from the reference store"

    # decode: one query token per sequence, output poisoned; padding rows must stay untouched
    scale = d**-0.5
    out = torch.full((len(lens) + 2, h * g, d), float("nan"))
    triton_kernels.decode_attention(batch.query, cache, batch.block_table, batch.seq_lens, codec, geo, scale, out)
    ref = paged_attention(batch.query, batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, geo, scale)
    got = out[: len(lens)]
    assert torch.isfinite(got).all(), msg
    rel = ((got - ref[: len(lens)]).norm() / ref[: len(lens)].norm()).item()
    assert rel < DECODE_TOL, f"{msg}: decode relative error {rel:.2e}"
    assert torch.isnan(out[len(lens) :]).all(), f"{msg}: rows past the batch were written"

    # gather: dense dequantised context
    k, v = triton_kernels.gather_context(cache, batch.block_table, batch.seq_lens, codec, geo)
    k_ref, v_ref = reference_gather(batch.kv_cache, batch.block_table, batch.seq_lens, codec, geo)
    for got_, want, what in ((k, k_ref, "K"), (v, v_ref, "V")):
        assert got_.shape == want.shape
        rel = ((got_ - want).norm() / want.norm()).item()
        assert rel < GATHER_TOL, f"{msg}: gather {what} relative error {rel:.2e}"


@interpreted
@pytest.mark.parametrize("name", ["sq3bit", "tq3bit"])
def test_store_nonfinite_input_is_defined(name):
    """Non-finite input is saturated first (NaN -> 0, +-inf -> +-65504), codes and exact sink copy alike."""
    from vllm_spectralquant.ops import triton_kernels

    seed = _fresh_seed()
    codec = random_codec(PRESETS[name], 32, 1, seed=seed)
    geo = CacheGeometry.for_codec(codec, 16, 1)
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(4, 1, 32, generator=gen)
    key[0, 0, 3], key[1, 0, 0], key[2, 0, 5] = float("nan"), float("inf"), float("-inf")
    value = torch.randn(4, 1, 32, generator=gen)
    value[3, 0, 7] = float("nan")
    slots = torch.tensor([16, 2, 0, 5])  # offsets 0: exact sink copies of the inf and NaN tokens
    expected = torch.zeros(2, 1, 16, geo.page_slot_bytes, dtype=torch.uint8)
    written = expected.clone()
    reference_store(key, value, expected, slots, codec, geo, strict=False)
    triton_kernels.store_kv(key, value, written, slots, codec, geo)
    assert torch.equal(written, expected), f"seed {seed}"


@interpreted
def test_decode_with_bf16_query_and_output():
    from vllm_spectralquant.ops import triton_kernels

    seed = _fresh_seed()
    codec = random_codec(PRESETS["tq3bit"], 64, 2, seed=seed)
    batch = random_paged_batch(codec, [30, 1, 65], [1, 1, 1], block_size=16, num_query_heads=8, seed=seed)
    q = batch.query.bfloat16()
    out = torch.full((3, 8, 64), float("nan"), dtype=torch.bfloat16)
    triton_kernels.decode_attention(q, batch.kv_cache, batch.block_table, batch.seq_lens, codec, batch.geometry, 0.125, out)
    ref = paged_attention(q.float(), batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, batch.geometry, 0.125)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"seed {seed}: {rel:.2e}"
