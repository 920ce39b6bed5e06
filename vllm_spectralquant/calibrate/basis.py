"""Centered PCA bases and effective-dimension measures."""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Floor of per-coordinate sigma, relative to the head's largest one (keeps degenerate
#: directions representable without dividing by ~0).
SIGMA_FLOOR = 1e-4


@dataclass(frozen=True)
class Spectrum:
    """Eigen-decomposition of a covariance [H, D, D], eigenvalues descending."""

    eigvals: torch.Tensor  # float64 [H, D], descending, clamped >= 0
    eigvecs: torch.Tensor  # float64 [H, D, D], columns


def spectrum(cov: torch.Tensor) -> Spectrum:
    vals, vecs = torch.linalg.eigh(cov.to(torch.float64))
    vals, vecs = vals.flip(-1).clamp(min=0), vecs.flip(-1)
    return Spectrum(vals, vecs)


def participation_ratio(eigvals: torch.Tensor) -> torch.Tensor:
    """(sum l)^2 / sum l^2 per head [H]."""
    return eigvals.sum(-1) ** 2 / (eigvals**2).sum(-1).clamp(min=1e-300)


def dims_for_variance(eigvals: torch.Tensor, fraction: float) -> torch.Tensor:
    """Smallest number of leading eigen-directions holding ``fraction`` of the variance, per head [H]."""
    cum = eigvals.cumsum(-1) / eigvals.sum(-1, keepdim=True).clamp(min=1e-300)
    return (cum < fraction - 1e-12).sum(-1) + 1


def effective_dims(eigvals: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both d_eff measures per head: participation ratio and dims for 90/95/99 % of the variance."""
    return {
        "participation_ratio": participation_ratio(eigvals),
        "dims_90": dims_for_variance(eigvals, 0.90),
        "dims_95": dims_for_variance(eigvals, 0.95),
        "dims_99": dims_for_variance(eigvals, 0.99),
    }


def sigma_from_variance(variance: torch.Tensor) -> torch.Tensor:
    """Per-coordinate sigma [H, D] from variances, floored relative to each head's largest."""
    sigma = variance.clamp(min=0).sqrt()
    floor = SIGMA_FLOOR * sigma.amax(-1, keepdim=True).clamp(min=1e-12)
    return torch.maximum(sigma, floor)
