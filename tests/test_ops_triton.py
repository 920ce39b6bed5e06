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

from kernel_cases import (
    CASES,
    WINDOW_CASES,
    case_id,
    check_kernels_against_reference,
    check_windowed_decode_against_reference,
    fresh_seed,
    window_case_id,
)

from vllm_spectralquant.format import PRESETS, CacheGeometry, paged_attention
from vllm_spectralquant.format.paged import store_kv as reference_store
from vllm_spectralquant.format.synthetic import random_codec, random_paged_batch


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


#: Run only in the TRITON_INTERPRET=1 child process (deselected elsewhere by tests/conftest.py).
interpreted = pytest.mark.triton_interpreter


@interpreted
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["contiguous", "token_major"])
def test_triton_matches_reference(case, layout):
    from vllm_spectralquant.ops import triton_kernels

    check_kernels_against_reference(triton_kernels, case, layout, torch.device("cpu"))


@interpreted
@pytest.mark.parametrize("window_case", WINDOW_CASES, ids=window_case_id)
@pytest.mark.parametrize("layout", ["contiguous", "token_major"])
def test_triton_windowed_decode_matches_reference(window_case, layout):
    from vllm_spectralquant.ops import triton_kernels

    check_windowed_decode_against_reference(triton_kernels, window_case, layout, torch.device("cpu"))


@interpreted
@pytest.mark.parametrize("name", ["sq3bit", "tq3bit"])
def test_store_nonfinite_input_is_defined(name):
    """Non-finite input is saturated first (NaN -> 0, +-inf -> +-65504), codes and exact sink copy alike."""
    from vllm_spectralquant.ops import triton_kernels

    seed = fresh_seed()
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

    seed = fresh_seed()
    codec = random_codec(PRESETS["tq3bit"], 64, 2, seed=seed)
    batch = random_paged_batch(codec, [30, 1, 65], [1, 1, 1], block_size=16, num_query_heads=8, seed=seed)
    q = batch.query.bfloat16()
    out = torch.full((3, 8, 64), float("nan"), dtype=torch.bfloat16)
    triton_kernels.decode_attention(q, batch.kv_cache, batch.block_table, batch.seq_lens, codec, batch.geometry, 0.125, out)
    ref = paged_attention(q.float(), batch.kv_cache, batch.block_table, batch.seq_lens, batch.query_start_loc, codec, batch.geometry, 0.125)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"seed {seed}: {rel:.2e}"
