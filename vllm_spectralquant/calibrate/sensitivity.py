"""The loss cost model: bit-allocation weights from the next-token loss's gradients w.r.t. the cache.

The attention cost model (``allocation.py``) prices an error by how far it moves one layer's attention
output, assuming every direction of that output matters alike and taking the layer's importance from
its attention concentration (``AttentionProfile.error_scale``). Neither holds for what the cache is
for: SmolLM2's retrieval heads in layers 15-21 look cheap by concentration and lose 4k needles
(BENCHMARKS.md, tenth session).

Here the price is the loss itself. To second order, an error e_t on a cached key (or value) t raises
the summed loss by ``1/2 e_t^T H_t e_t``; with the Fisher approximation ``H_t ~ g_t g_t^T`` (g_t = dL/dk_t,
measured over calibration text) and independent, zero-mean coordinate errors of variance
``lambda_j D(b)`` along basis direction u_j, the expected rise is ``1/2 sum_j (u_j^T F u_j) lambda_j D(b)``
with ``F = E[g g^T]``. So coordinate j weighs ``w_j = u_j^T F u_j * lambda_j``, in nats per token for keys
and values, heads and layers alike: one scale, so no per-layer error scale is needed.

Measured on SmolLM2-135M (BENCHMARKS.md, eleventh session), sq2_5bit, same 16k calibration tokens:
worse than the attention cost model, served +1.60 % vs +1.33 % perplexity (paired +0.26 +- 0.11,
16 windows), the same needles; the lost 4k needle's answer NLL 3.98 vs 6.49 nats, still lost.
"""

from __future__ import annotations

import torch

from vllm_spectralquant.calibrate.basis import Spectrum
from vllm_spectralquant.calibrate.stats import MomentStats

#: How an error in the cache is priced: "attention" (the analytic attention-output model) or "loss"
#: (the measured loss gradients; calibration then runs a backward pass per batch).
COST_MODELS = ("attention", "loss")


def loss_weights(grad: MomentStats, spec: Spectrum) -> torch.Tensor:
    """float64 [H, D]: each basis direction's expected loss per unit of normalised error, ``u_j^T F u_j * lambda_j``
    (the spectrum's order), from the gradients' moments ``grad`` (count 0: not measured)."""
    if grad.count == 0:
        raise ValueError("the loss cost model needs the loss gradients of the keys and values (collect with loss_gradients)")
    fisher = grad.second_moment()  # [H, D, D]: E[g g^T] over the coded tokens
    along = torch.einsum("hdi,hde,hei->hi", spec.eigvecs, fisher, spec.eigvecs)
    return along.clamp(min=0) * spec.eigvals
