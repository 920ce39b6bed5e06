"""Scalar codebooks: Gaussian Lloyd-Max tables and uniform grids (fitted ones: calibrate/codebook_fit.py).

Codebooks are sorted ascending. In tensors they are padded to ``2**MAX_BITS`` entries; only the
first ``2**bits`` are used. All math here is float64 numpy: it runs at calibration time, never
on the hot path.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.presets import MAX_BITS

CODEBOOK_SIZE = 1 << MAX_BITS

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _normal_pdf(x: np.ndarray) -> np.ndarray:
    return _INV_SQRT_2PI * np.exp(-0.5 * x * x)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 0 <= bits <= MAX_BITS:
        raise FormatError(f"bit width must be an integer in [0, {MAX_BITS}], got {bits!r}")


@lru_cache(maxsize=None)
def gaussian_lloyd_max(bits: int) -> tuple[np.ndarray, float]:
    """Lloyd-Max quantiser of N(0, 1) with ``2**bits`` levels.

    Returns (centroids float64 [2**bits] ascending, mean squared error). bits=0 gives ([0.], 1.0).
    """
    _check_bits(bits)
    n = 1 << bits
    if n == 1:
        return np.zeros(1), 1.0
    # Start from the Panter-Dite companding point (quantiles of N(0, 3), near-optimal for many
    # levels), then iterate the two Lloyd conditions. Convergence is slow for 7-8 bits, but the
    # MSE there is already within 1e-7 of optimal after a few thousand steps.
    p = (np.arange(n) + 0.5) / n
    c = np.sqrt(6.0) * np.array([_erfinv(2 * x - 1) for x in p])
    for _ in range(5000):
        t = np.concatenate(([-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]))
        pdf, cdf = _normal_pdf(t), _normal_cdf(t)
        mass = cdf[1:] - cdf[:-1]
        new = (pdf[:-1] - pdf[1:]) / np.maximum(mass, 1e-300)
        if np.max(np.abs(new - c)) < 1e-9:
            c = new
            break
        c = new
    t = np.concatenate(([-np.inf], 0.5 * (c[1:] + c[:-1]), [np.inf]))
    mass = _normal_cdf(t[1:]) - _normal_cdf(t[:-1])
    mse = float(1.0 - np.sum(mass * c * c))
    return c, mse


def _erfinv(y: float) -> float:
    """Inverse error function by Newton iteration (float64; |y| < 1)."""
    x = 0.0
    for _ in range(100):
        err = math.erf(x) - y
        x -= err / (2.0 / math.sqrt(math.pi) * math.exp(-x * x))
        if abs(err) < 1e-15:
            break
    return x


def uniform_grid(bits: int) -> np.ndarray:
    """Levels k / (2**bits - 1), k = 0 .. 2**bits - 1 (the affine per-token value grid)."""
    _check_bits(bits)
    n = 1 << bits
    return np.zeros(1) if n == 1 else np.arange(n, dtype=np.float64) / (n - 1)


def pad_codebook(levels: np.ndarray) -> torch.Tensor:
    """A codebook as a float32 tensor of CODEBOOK_SIZE entries (unused tail = last level)."""
    levels = np.asarray(levels, dtype=np.float64)
    out = np.full(CODEBOOK_SIZE, levels[-1], dtype=np.float64)
    out[: len(levels)] = levels
    return torch.from_numpy(out).to(torch.float32)
