"""Exceptions of the calibration job."""

from vllm_spectralquant.errors import SpectralQuantError


class CalibrationError(SpectralQuantError, ValueError):
    """Bad calibration input (corpus too small, bad option, unreachable Ray cluster); the message names the fix."""
