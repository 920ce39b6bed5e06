"""Which KV heads a tensor-parallel rank serves, as vLLM shards them, and the check of its artifact slice.

vLLM's QKV projection gives rank ``r`` of ``W`` ranks the KV heads ``[r n, (r + 1) n)`` with
``n = H / W`` when ``W <= H`` (``H`` divisible by ``W``); with more ranks than KV heads each head is
replicated on ``W / H`` consecutive ranks and rank ``r`` serves head ``r // (W / H)``. The backend
loads exactly that slice of the artifact's per-head bases, codebooks and bit allocations.
"""

from __future__ import annotations

from vllm_spectralquant.errors import SpectralQuantError


class TensorParallelError(SpectralQuantError):
    """The tensor-parallel layout does not fit the model or its artifact."""


def kv_head_slice(rank: int, world_size: int, total_kv_heads: int) -> slice:
    """The KV heads of ``rank`` among ``world_size`` ranks for a model with ``total_kv_heads``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise TensorParallelError(f"tensor-parallel rank {rank} is outside 0..{world_size - 1}")
    if total_kv_heads < 1:
        raise TensorParallelError(f"a model needs at least one KV head, got {total_kv_heads}")
    if world_size <= total_kv_heads:
        if total_kv_heads % world_size:
            raise TensorParallelError(
                f"{total_kv_heads} KV heads do not divide over tensor-parallel size {world_size} (vLLM needs it too)"
            )
        n = total_kv_heads // world_size
        return slice(rank * n, (rank + 1) * n)
    if world_size % total_kv_heads:
        raise TensorParallelError(
            f"tensor-parallel size {world_size} is not a multiple of the model's {total_kv_heads} KV heads "
            "(vLLM replicates KV heads only in whole copies)"
        )
    head = rank // (world_size // total_kv_heads)
    return slice(head, head + 1)


def check_rank_slice(rank: int, world_size: int, local_kv_heads: int, total_kv_heads: int, artifact_kv_heads: int) -> slice:
    """The rank's slice, after checking it against the layer's heads and the artifact's; errors name rank and slice."""
    heads = kv_head_slice(rank, world_size, total_kv_heads)
    where = f"tensor-parallel rank {rank} of {world_size} serves KV heads {heads.start}..{heads.stop - 1}"
    if heads.stop - heads.start != local_kv_heads:
        raise TensorParallelError(f"{where}, but its attention layer holds {local_kv_heads} KV heads")
    if artifact_kv_heads != total_kv_heads or heads.stop > artifact_kv_heads:
        raise TensorParallelError(
            f"{where} of {total_kv_heads}, but the artifact has {artifact_kv_heads} KV heads; "
            "re-run spectralquant calibrate on this model"
        )
    return heads


def current_rank() -> tuple[int, int]:
    """(rank, world size) of this process's tensor-parallel group; (0, 1) outside one."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (ImportError, AssertionError, AttributeError):
        return 0, 1
