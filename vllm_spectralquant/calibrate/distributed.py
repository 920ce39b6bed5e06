"""Calibration statistics on Ray: batches of windows spread over actors, merged exactly in order.

Each actor loads the model once and returns one :class:`ModelStats` per batch. The driver keeps a
few batches in flight per actor (so a fast actor takes more work) and merges results in batch
order as they become contiguous, so K workers compute the same sums as one process and the
driver never holds more than the in-flight batches.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vllm_spectralquant.calibrate.collect import ModelStats, collect_batch
from vllm_spectralquant.calibrate.errors import CalibrationError

IN_FLIGHT_PER_ACTOR = 2


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when ``host:port`` of a Ray cluster does not answer."""
    if address in (None, "", "local", "auto"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise CalibrationError(f"--ray-address {address!r} is not HOST:PORT (or ray://HOST:PORT, auto, local)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise CalibrationError(f"cannot reach the Ray cluster at {address}: {e}") from e


class _Collector:
    """A Ray actor: one model copy, statistics of the batches it is given."""

    def __init__(self, model_dir: str, device: str, threads: int) -> None:
        from vllm_spectralquant.models.capture import load_model

        if threads:
            torch.set_num_threads(threads)
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.model, _ = load_model(model_dir, dtype=torch.float32, device=dev)

    def collect(self, windows, window_ids, offsets, skip_first, sample_stride, profile_attention) -> ModelStats:
        return collect_batch(
            self.model, windows, window_ids, offsets, skip_first=skip_first, sample_stride=sample_stride,
            profile_attention=profile_attention,
        )  # fmt: skip


def collect_with_ray(
    model_dir: Path,
    windows: torch.Tensor,
    offsets: Sequence[int],
    *,
    num_workers: int,
    address: str | None = None,
    batch_size: int = 4,
    sample_stride: int = 8,
    skip_first: int = 1,
    profile_attention: bool = False,
    device: str = "auto",
    threads_per_worker: int = 1,
    progress: Callable[[int], None] | None = None,
) -> ModelStats:
    """Statistics of all windows [N, T], computed by ``num_workers`` Ray actors."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address in (None, "", "local"):
                ray.init(num_cpus=max(num_workers, 1), include_dashboard=False, log_to_driver=False, configure_logging=False)
            else:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise CalibrationError(f"cannot start or join the Ray cluster ({address or 'local'}): {e}") from e
    try:
        gpus = 1 if device != "cpu" and torch.cuda.is_available() else 0
        actor_cls = ray.remote(num_cpus=threads_per_worker, num_gpus=gpus)(_Collector)
        actors = [actor_cls.remote(str(model_dir), device, threads_per_worker) for _ in range(num_workers)]
        batches = [list(range(s, min(s + batch_size, windows.shape[0]))) for s in range(0, windows.shape[0], batch_size)]
        pending: dict = {}  # object ref -> (batch index, actor)
        results: dict[int, ModelStats] = {}
        total: ModelStats | None = None
        next_submit, next_merge = 0, 0
        idle = [a for a in actors for _ in range(IN_FLIGHT_PER_ACTOR)]
        while next_merge < len(batches):
            while idle and next_submit < len(batches):
                actor = idle.pop(0)
                ids = batches[next_submit]
                ref = actor.collect.remote(windows[ids], ids, [offsets[i] for i in ids], skip_first, sample_stride, profile_attention)
                pending[ref] = (next_submit, actor)
                next_submit += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                index, actor = pending.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise CalibrationError(f"a calibration worker failed on batch {index}: {e}") from e
                idle.append(actor)
                if progress is not None:
                    progress(results[index].tokens)
            while next_merge in results:  # merge in batch order: the same sums as one process
                batch = results.pop(next_merge)
                total = batch if total is None else total.merge(batch)
                next_merge += 1
        assert total is not None, "no windows"
        return total
    finally:
        if started_here:
            ray.shutdown()
