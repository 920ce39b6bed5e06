"""The CUDA extension (csrc/) against the torch reference on the same cases as the Triton kernels (GPU machine).

Run there in the same call as the benchmark (bench/gpu_decode_run.sh): ``pytest -m gpu tests/test_ops_cuda.py``.
Without a CUDA device these tests are skipped with that reason; CI has none.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CASES, case_codec, case_id, check_kernels_against_reference, fresh_seed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU machine runs these)"),
]


@pytest.fixture(scope="module")
def cuda_ext():
    from vllm_spectralquant.ops import cuda_ext

    assert cuda_ext.is_available(), cuda_ext.load_error()  # on a GPU machine a missing build is a failure
    return cuda_ext


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("layout", ["contiguous", "token_major"])
def test_cuda_matches_reference(cuda_ext, case, layout):
    check_kernels_against_reference(cuda_ext, case, layout, torch.device("cuda"))


def test_cuda_decode_under_graph_replay_equals_eager(cuda_ext):
    """A captured decode replayed with new queries and lengths equals an eager call (what vLLM replays)."""
    from vllm_spectralquant.format.synthetic import random_paged_batch
    from vllm_spectralquant.ops.workspace import DecodeWorkspace

    seed = fresh_seed()
    codec = case_codec("sq2_5bit:sorted", 128, 2, seed)
    batch = random_paged_batch(codec, [300, 1, 77, 1000], [1] * 4, block_size=128, num_query_heads=8, seed=seed, device="cuda")
    codec = codec.to("cuda")
    ws = DecodeWorkspace.for_shapes("cuda", 4, 8, 2, 128)
    q, lens = batch.query[:4].clone(), batch.seq_lens.clone()
    out = torch.zeros(4, 8, 128, device="cuda")
    cuda_ext.decode_attention(q, batch.kv_cache, batch.block_table, lens, codec, batch.geometry, 0.1, out, ws)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cuda_ext.decode_attention(q, batch.kv_cache, batch.block_table, lens, codec, batch.geometry, 0.1, out, ws)
    q.copy_(torch.randn_like(q))
    lens.copy_(torch.tensor([250, 2, 77, 999], device="cuda", dtype=lens.dtype))
    graph.replay()
    eager = torch.zeros_like(out)
    cuda_ext.decode_attention(q, batch.kv_cache, batch.block_table, lens, codec, batch.geometry, 0.1, eager, ws)
    assert torch.equal(out, eager), f"seed {seed}"


def test_decode_support_matrix_comes_from_the_extension(cuda_ext):
    from vllm_spectralquant.format import PRESETS, kernel_limits
    from vllm_spectralquant.format.synthetic import random_codec, random_paged_batch

    codec = random_codec(PRESETS["tq3bit"], 128, 8)
    geo = random_paged_batch(random_codec(PRESETS["tq3bit"], 64, 1), [1], [1]).geometry
    assert cuda_ext.decode_supported(codec, geo, 8 * 4)
    assert cuda_ext.decode_supported(codec, geo, 8 * kernel_limits.MAX_QUERY_GROUP)
    assert not cuda_ext.decode_supported(codec, geo, 8 * (kernel_limits.MAX_QUERY_GROUP + 1))
    for d in (32, 64, 96, 128, 256, 40, 192):
        assert bool(torch.ops.spectralquant.decode_supports(d, 4, 1)) == (d in kernel_limits.DECODE_HEAD_DIMS)
