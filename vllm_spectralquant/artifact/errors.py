"""Exceptions of the artifact layer."""

from vllm_spectralquant.errors import SpectralQuantError


class ArtifactError(SpectralQuantError, ValueError):
    """A missing, corrupted, incompatible or mismatched calibration artifact; the message names the fix."""
