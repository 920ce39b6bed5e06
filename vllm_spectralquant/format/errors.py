"""Exceptions of the format layer."""

from vllm_spectralquant.errors import SpectralQuantError


class FormatError(SpectralQuantError, ValueError):
    """Bad input to the codec or the reference attention (shape, dtype, value, range)."""
