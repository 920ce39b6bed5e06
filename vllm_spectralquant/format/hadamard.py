"""The orthonormal Sylvester-Hadamard matrix used by the TurboQuant layout."""

from __future__ import annotations

import torch

from vllm_spectralquant.format.errors import FormatError


def hadamard(dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix [dim, dim] (dim a power of 2); H @ H.T = I."""
    if dim < 1 or dim & (dim - 1):
        raise FormatError(f"the Hadamard rotation needs a power-of-2 size, got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / dim**0.5).to(dtype)
