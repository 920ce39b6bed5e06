"""Bit allocation: water-filling of a byte budget over key and value coordinate groups.

The cost model is the attention-output error. For a query head, a key error e_k changes the
score by ``softmax_scale * q.e_k`` and the output by that times ``(v_t - o)``; a value error moves
the output by ``p_t e_v``. Both are weighted by the same ``sum_t p_t^2``, so in common units:

* key coordinate j:   ``w_j = softmax_scale^2 * tr(Cov_V) * E[q_j^2] * lambda_j``  (q in the key
  basis, summed over the query heads of the KV head);
* value coordinate j: ``w_j = queries_per_kv * lambda_j``;

and the expected error of a group at b bits is ``W_g * D_g(b)`` with ``W_g = sum_j w_j`` and
``D_g(b)`` the normalised MSE of its codebook. One more bit for a group of 8 costs exactly one
byte, so greedy on the marginal gain is the water-filling solution for convex D_g.
"""

from __future__ import annotations

import torch

from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.presets import MAX_BITS


def allocate_bits(weights: torch.Tensor, distortion: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy water-filling of ``budget`` bytes.

    Args:
        weights: float [N] importance W_g of each group (keys and values concatenated).
        distortion: float [N, MAX_BITS + 1] normalised MSE of each group at 0..MAX_BITS bits.
        budget: bytes to spend (one byte = one more bit for one group of 8 coordinates).
    Returns:
        int32 [N] bits per group, sum <= budget.
    """
    n = weights.shape[0]
    if budget > n * MAX_BITS:
        raise FormatError(f"budget of {budget} bytes exceeds {MAX_BITS} bits for all {n} groups")
    bits = torch.zeros(n, dtype=torch.long)
    w = weights.to(torch.float64)
    dist = distortion.to(torch.float64)
    rows = torch.arange(n)
    for _ in range(budget):
        nxt = bits.clamp(max=MAX_BITS - 1)
        gain = w * (dist[rows, bits] - dist[rows, nxt + 1])
        gain = torch.where(bits < MAX_BITS, gain, torch.full_like(gain, -1.0))
        bits[int(torch.argmax(gain))] += 1
    return bits.to(torch.int32)


def expected_error(weights: torch.Tensor, distortion: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """sum_g W_g D_g(b_g) in the cost model's units."""
    return (weights.double() * distortion.double()[torch.arange(len(bits)), bits.long()]).sum()
