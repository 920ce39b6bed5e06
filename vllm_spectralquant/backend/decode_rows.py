"""Multi-token decode rows (speculative verification) as single-token decode rows.

A decode row of ``q`` tokens (the last accepted token plus ``q - 1`` draft tokens, at positions
``seq_len - q .. seq_len - 1``) is ``q`` one-token decodes over the same block-table row: token ``i``
sees the first ``seq_len - q + i + 1`` tokens of the packed cache, its own included (vLLM stores a
step's tokens before attention runs). Expanding the rows lets the decode kernel serve them with
the arithmetic of plain decoding, so verification scores a draft token exactly as a non-speculative
step would score the same token at the same position over the same cache.

Only device tensor ops, no host sync: safe inside CUDA-graph capture of uniform decode batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeRows:
    """One row per query token: block_table int32 [T, max_blocks], seq_lens int32 [T]."""

    block_table: torch.Tensor
    seq_lens: torch.Tensor


def expand_decode_rows(
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, num_rows: int, num_tokens: int
) -> DecodeRows:
    """Per-token decode rows for the first ``num_rows`` (decode) requests holding ``num_tokens`` tokens.

    Args:
        query_start_loc: int32 [>= num_rows + 1], device; seq_lens: int32 [>= num_rows] (tokens in the
            cache after this step); block_table: int32 [>= num_rows, max_blocks].
    Returns:
        :class:`DecodeRows`; padded rows (vLLM pads uniform batches with empty requests) get length 0.
    """
    device = seq_lens.device
    token = torch.arange(num_tokens, device=device, dtype=torch.int32)
    ends = query_start_loc[1 : num_rows + 1].to(torch.int32)
    row = torch.searchsorted(ends, token, right=True).clamp_(max=num_rows - 1)
    # seq_len - (tokens of the row after this one): the last token sees the whole sequence.
    lens = seq_lens[:num_rows].to(torch.int32)[row] - (ends[row] - 1 - token)
    return DecodeRows(block_table=block_table[:num_rows].index_select(0, row), seq_lens=lens.clamp_(min=0))
