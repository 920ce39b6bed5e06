"""Scratch memory and the split count of split-KV decode, fixed per batch shape (CUDA-graph safe).

Decode runs in three steps: rotate the queries once (into ``w16``/``wpar``), attend over each
KV split (partial softmax states into ``part_o``/``part_ml``), merge the splits and rotate back.
All intermediates live in one :class:`DecodeWorkspace`. Create it once with the largest batch
you will run (the backend: in its builder, before CUDA-graph capture) and pass it to
``ops.decode_attention(..., workspace=ws)``; calls then allocate nothing. Without one, a
per-device workspace is grown on demand, which allocates (once per larger shape): warm it up with
the largest shape before capturing graphs.

Layout of the float32 buffer, for a call with B sequences, Hq query heads, H KV heads, G = Hq/H,
NS splits, head dim D (padded: GP = max(16, next pow2 of G), DP = next pow2 of D):

=============  =========================  ===========================================
``w16``        float16 [B, Hq, DP]        rotated, scaled, max-normalised queries
``wpar``       float32 [B, Hq, 4]         base, sum(w), max|w|, 0 (log2-scaled)
``part_o``     float32 [B, H, NS, GP, DP] per-split sum p (s l + z), rotated V frame
``part_ml``    float32 [B, H, NS, GP, 2]  per-split running max (log2) and sum p
``merged``     float32 [B, Hq, 2 DP + 1]  Triton only: merged acc, exact-sink output, mass
=============  =========================  ===========================================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from vllm_spectralquant.format.kernel_limits import MAX_SPLITS
from vllm_spectralquant.ops.kernel_codec import padded_dim

#: Each split gets at least this many tokens: below it the merge costs more than it saves.
MIN_TOKENS_PER_SPLIT = 256
#: Decode CTAs that fit on one SM at once (128 threads, ~128 registers; CUDA kernel).
CTAS_PER_SM = 4


def padded_group(group: int) -> int:
    return max(16, 1 << (group - 1).bit_length())


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """KV splits per sequence: enough CTAs for one full wave, never splits shorter than 256 tokens.

    Depends on shapes only (``max_context`` = block-table columns x block size), so a captured
    graph keeps its grid.
    """
    pairs = max(1, batch * num_kv_heads)
    by_occupancy = max(1, (CTAS_PER_SM * _sm_count(torch.device(device))) // pairs)
    by_context = max(1, -(-max_context // MIN_TOKENS_PER_SPLIT))
    return max(1, min(by_occupancy, by_context, MAX_SPLITS))


@dataclass(frozen=True)
class DecodeViews:
    """Views of a workspace for one call (shapes in the module docstring)."""

    w16: torch.Tensor
    wpar: torch.Tensor
    part_o: torch.Tensor
    part_ml: torch.Tensor
    merged: torch.Tensor


def _floats_needed(batch: int, hq: int, h: int, d: int, splits: int) -> list[int]:
    dp, gp = padded_dim(d), padded_group(hq // h)
    return [
        -(-batch * hq * dp // 2),  # w16 (two halves per float)
        batch * hq * 4,
        batch * h * splits * gp * dp,
        batch * h * splits * gp * 2,
        batch * hq * (2 * dp + 1),
    ]


class DecodeWorkspace:
    """One flat float32 device buffer, carved into :class:`DecodeViews` per call."""

    def __init__(self, device: torch.device | str, floats: int = 0):
        self.device = torch.device(device)
        self.buffer = torch.empty(max(floats, 1), dtype=torch.float32, device=self.device)

    @classmethod
    def for_shapes(
        cls, device, max_batch: int, num_query_heads: int, num_kv_heads: int, head_dim: int, max_splits: int = MAX_SPLITS
    ) -> DecodeWorkspace:
        """A workspace large enough for any call up to these sizes."""
        return cls(device, sum(_floats_needed(max_batch, num_query_heads, num_kv_heads, head_dim, max_splits)))

    def views(self, batch: int, hq: int, h: int, d: int, splits: int, *, grow: bool) -> DecodeViews:
        sizes = _floats_needed(batch, hq, h, d, splits)
        if sum(sizes) > self.buffer.numel():
            if not grow:
                raise RuntimeError(
                    f"decode workspace holds {self.buffer.numel()} floats, this call needs {sum(sizes)} "
                    f"(batch {batch}, {hq}/{h} heads, head_dim {d}, {splits} splits)"
                )
            self.buffer = torch.empty(sum(sizes), dtype=torch.float32, device=self.device)
        dp, gp = padded_dim(d), padded_group(hq // h)
        parts, start = [], 0
        for n in sizes:
            parts.append(self.buffer[start : start + n])
            start += n
        return DecodeViews(
            w16=parts[0].view(torch.float16)[: batch * hq * dp].view(batch, hq, dp),
            wpar=parts[1].view(batch, hq, 4),
            part_o=parts[2].view(batch, h, splits, gp, dp),
            part_ml=parts[3].view(batch, h, splits, gp, 2),
            merged=parts[4].view(batch, hq, 2 * dp + 1),
        )


_DEFAULT: dict[torch.device, DecodeWorkspace] = {}


def default_workspace(device: torch.device) -> DecodeWorkspace:
    """The per-device workspace used when a call passes none (grown on demand)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _DEFAULT:
        _DEFAULT[device] = DecodeWorkspace(device)
    return _DEFAULT[device]
