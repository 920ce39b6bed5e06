"""The per-rank KV-head slice of the artifact, as vLLM shards KV heads (no second GPU needed)."""

from __future__ import annotations

import pytest

from vllm_spectralquant.backend.tensor_parallel import TensorParallelError, check_rank_slice, kv_head_slice


@pytest.mark.parametrize(
    ("world", "total", "expected"),
    [
        (1, 8, [(0, 8)]),
        (2, 8, [(0, 4), (4, 8)]),
        (8, 8, [(i, i + 1) for i in range(8)]),
        (2, 2, [(0, 1), (1, 2)]),  # Qwen2.5-Coder-1.5B at TP=2
        (4, 2, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # replicated: two ranks per KV head
        (8, 1, [(0, 1)] * 8),
    ],
)
def test_slices_follow_vllm_sharding(world, total, expected):
    got = [kv_head_slice(r, world, total) for r in range(world)]
    assert [(s.start, s.stop) for s in got] == expected
    if world <= total:  # every head served exactly once
        assert sorted(h for s in got for h in range(s.start, s.stop)) == list(range(total))


@pytest.mark.parametrize(("rank", "world", "total", "match"), [
    (0, 2, 3, "3 KV heads do not divide over tensor-parallel size 2"),  # SmolLM2 at TP=2
    (0, 3, 2, "not a multiple of the model's 2 KV heads"),
    (2, 2, 8, "rank 2 is outside 0..1"),
])  # fmt: skip
def test_layouts_vllm_cannot_shard_are_refused(rank, world, total, match):
    with pytest.raises(TensorParallelError, match=match):
        kv_head_slice(rank, world, total)


def test_startup_check_names_rank_and_slice():
    assert check_rank_slice(1, 2, 4, 8, 8) == slice(4, 8)
    with pytest.raises(TensorParallelError, match=r"rank 1 of 2 serves KV heads 4\.\.7.*artifact has 4 KV heads"):
        check_rank_slice(1, 2, 4, 8, 4)
    with pytest.raises(TensorParallelError, match=r"rank 0 of 2 serves KV heads 0\.\.3, but its attention layer holds 8"):
        check_rank_slice(0, 2, 8, 8, 8)


def test_each_rank_loads_exactly_its_heads_of_the_artifact(tiny_artifact):
    """TP=2 over the tiny Llama's 2 KV heads: each rank's LayerCodec is its head of the whole layer's codec."""
    import torch

    from vllm_spectralquant.artifact import load_artifact

    art = load_artifact(tiny_artifact.artifact, presets=["sq3bit"])
    total = art.manifest.model.num_kv_heads
    whole = art.layer_codec("sq3bit", 1)
    for rank in range(2):
        heads = check_rank_slice(rank, 2, total // 2, total, total)
        part = art.layer_codec("sq3bit", 1, heads)
        assert part.num_kv_heads == total // 2
        for comp in ("key", "value"):
            for name in ("basis", "mean", "scale", "bits", "codebooks"):
                assert torch.equal(getattr(getattr(part, comp), name), getattr(getattr(whole, comp), name)[heads])
