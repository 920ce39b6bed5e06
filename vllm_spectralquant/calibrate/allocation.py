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


def _water_fill(weights: torch.Tensor, distortion: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy water-filling: (int32 [N] bits after ``budget`` bytes, float64 [budget + 1] error after each byte)."""
    n = weights.shape[0]
    if budget > n * MAX_BITS:
        raise FormatError(f"budget of {budget} bytes exceeds {MAX_BITS} bits for all {n} groups")
    bits = torch.zeros(n, dtype=torch.long)
    w = weights.to(torch.float64)
    dist = distortion.to(torch.float64)
    rows = torch.arange(n)
    curve = torch.empty(budget + 1, dtype=torch.float64)
    curve[0] = (w * dist[:, 0]).sum()
    for step in range(budget):
        nxt = bits.clamp(max=MAX_BITS - 1)
        gain = w * (dist[rows, bits] - dist[rows, nxt + 1])
        gain = torch.where(bits < MAX_BITS, gain, torch.full_like(gain, -1.0))
        best = int(torch.argmax(gain))
        bits[best] += 1
        curve[step + 1] = curve[step] - gain[best]
    return bits.to(torch.int32), curve


def allocate_bits(weights: torch.Tensor, distortion: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy water-filling of ``budget`` bytes.

    Args:
        weights: float [N] importance W_g of each group (keys and values concatenated).
        distortion: float [N, MAX_BITS + 1] normalised MSE of each group at 0..MAX_BITS bits.
        budget: bytes to spend (one byte = one more bit for one group of 8 coordinates).
    Returns:
        int32 [N] bits per group, sum <= budget.
    """
    return _water_fill(weights, distortion, budget)[0]


def error_curve(weights: torch.Tensor, distortion: torch.Tensor, max_budget: int) -> torch.Tensor:
    """float64 [max_budget + 1]: the expected error of :func:`allocate_bits` at every budget 0..max_budget.

    Greedy is incremental (the allocation at b + 1 bytes adds one bit to the one at b), so one pass gives all.
    """
    return _water_fill(weights, distortion, max_budget)[1]


def allocate_layer_budgets(curves: list[torch.Tensor], mean_budget: int, min_budget: int, max_budget: int) -> list[int]:
    """Bytes per head-token of each layer, ``mean_budget`` on average, where they lower the error most.

    Args:
        curves: per layer, float [>= max_budget + 1]: the layer's error (comparable between layers) at each
            per-head-token budget.
        mean_budget, min_budget, max_budget: bytes per head-token; every layer gets min..max.
    Returns:
        one budget per layer, summing to exactly ``len(curves) * mean_budget``. Greedy on the marginal
        gain, one byte at a time, which is optimal for convex curves (water-filling's are).
    """
    if not min_budget <= mean_budget <= max_budget:
        raise FormatError(f"mean budget {mean_budget} is outside the layer bounds {min_budget} .. {max_budget}")
    if any(c.shape[0] <= max_budget for c in curves):
        raise FormatError(f"every layer's error curve must reach the largest budget ({max_budget} bytes)")
    budgets = [min_budget] * len(curves)
    for _ in range((mean_budget - min_budget) * len(curves)):
        gains = [float(c[b] - c[b + 1]) if b < max_budget else float("-inf") for c, b in zip(curves, budgets)]
        budgets[max(range(len(gains)), key=gains.__getitem__)] += 1
    return budgets


def expected_error(weights: torch.Tensor, distortion: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """sum_g W_g D_g(b_g) in the cost model's units."""
    return (weights.double() * distortion.double()[torch.arange(len(bits)), bits.long()]).sum()
