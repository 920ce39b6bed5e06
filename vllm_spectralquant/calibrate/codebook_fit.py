"""Codebooks fitted to the calibrated distribution: batched Lloyd-Max on histograms (torch, float64).

For every (head, group) histogram and every bit width 0..MAX_BITS we fit once and keep the levels
and their MSE; bit allocation then reads the MSE table, and every preset picks its codebooks from
the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_spectralquant.format.codebooks import CODEBOOK_SIZE, gaussian_lloyd_max
from vllm_spectralquant.format.presets import MAX_BITS

NUM_WIDTHS = MAX_BITS + 1


@dataclass(frozen=True)
class CodebookTable:
    """Levels and normalised MSE at every bit width, for a batch of groups.

    levels: float32 [..., NUM_WIDTHS, CODEBOOK_SIZE] (ascending, padded with the last level);
    mse: float64 [..., NUM_WIDTHS].
    """

    levels: torch.Tensor
    mse: torch.Tensor

    def select(self, bits: torch.Tensor) -> torch.Tensor:
        """Levels [..., CODEBOOK_SIZE] of each group at its bit width (bits int [...])."""
        idx = bits.long()[..., None, None].expand(*bits.shape, 1, CODEBOOK_SIZE)
        return torch.gather(self.levels, -2, idx).squeeze(-2)


def gaussian_table(shape: tuple[int, ...]) -> CodebookTable:
    """N(0, 1) Lloyd-Max levels for every group (the fallback without histograms)."""
    levels = torch.zeros(NUM_WIDTHS, CODEBOOK_SIZE, dtype=torch.float32)
    mse = torch.zeros(NUM_WIDTHS, dtype=torch.float64)
    for b in range(NUM_WIDTHS):
        c, m = gaussian_lloyd_max(b)
        levels[b] = torch.from_numpy(c).float()[-1].expand(CODEBOOK_SIZE).clone()
        levels[b, : len(c)] = torch.from_numpy(c).float()
        mse[b] = m
    return CodebookTable(levels.expand(*shape, -1, -1).clone(), mse.expand(*shape, -1).clone())


def fit_levels(centers: torch.Tensor, weights: torch.Tensor, bits: int, iters: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd-Max (weighted 1-D k-means) on M histograms at once.

    Args:
        centers: float64 [NB] ascending bin centres; weights: float64 [M, NB] counts.
    Returns:
        (levels float64 [M, 2**bits] ascending, mse float64 [M]).
    """
    m, nb = weights.shape
    w = weights.to(torch.float64)
    total = w.sum(-1).clamp(min=1e-300)
    mean = (w * centers).sum(-1) / total
    var = (w * (centers - mean[:, None]) ** 2).sum(-1) / total
    if bits == 0:
        return mean[:, None], var
    if iters is None:
        # Lloyd-Max converges slowly at many levels, where fitting gains least over the Gaussian start.
        iters = 100 if bits <= 4 else 20 if bits == 5 else 5
    std = var.clamp(min=1e-24).sqrt()
    c = mean[:, None] + std[:, None] * torch.from_numpy(gaussian_lloyd_max(bits)[0])[None, :]
    zero = torch.zeros(m, 1, dtype=torch.float64)
    cum_w = torch.cat([zero, w.cumsum(-1)], -1)
    cum_wx = torch.cat([zero, (w * centers).cumsum(-1)], -1)
    grid = centers.expand(m, nb).contiguous()
    for _ in range(iters):
        # Cell i holds the bins whose centre lies in [t[i-1], t[i]).
        t = 0.5 * (c[:, 1:] + c[:, :-1])
        inner = torch.searchsorted(grid, t.contiguous())
        edges = torch.cat([torch.zeros_like(inner[:, :1]), inner, torch.full_like(inner[:, :1], nb)], -1)
        w_cell = cum_w.gather(1, edges[:, 1:]) - cum_w.gather(1, edges[:, :-1])
        x_cell = cum_wx.gather(1, edges[:, 1:]) - cum_wx.gather(1, edges[:, :-1])
        new = torch.where(w_cell > 0, x_cell / w_cell.clamp(min=1e-300), c).sort(-1).values
        done = bool(((new - c).abs().amax(-1) <= 1e-6 * std).all())
        c = new
        if done:
            break
    t = 0.5 * (c[:, 1:] + c[:, :-1])
    idx = torch.searchsorted(t.contiguous(), grid, right=True)
    err = grid - c.gather(1, idx)
    return c, (w * err * err).sum(-1) / total


def fit_table(centers: torch.Tensor, hist: torch.Tensor) -> CodebookTable:
    """Fit every bit width to histograms hist [..., NB] -> CodebookTable of shape [...]."""
    shape = hist.shape[:-1]
    flat = hist.reshape(-1, hist.shape[-1]).to(torch.float64)
    levels = torch.zeros(flat.shape[0], NUM_WIDTHS, CODEBOOK_SIZE, dtype=torch.float32)
    mse = torch.zeros(flat.shape[0], NUM_WIDTHS, dtype=torch.float64)
    for b in range(NUM_WIDTHS):
        c, e = fit_levels(centers, flat, b)
        levels[:, b, :] = c[:, -1:].float()
        levels[:, b, : c.shape[1]] = c.float()
        mse[:, b] = e
    return CodebookTable(levels.reshape(*shape, NUM_WIDTHS, CODEBOOK_SIZE), mse.reshape(*shape, NUM_WIDTHS))
