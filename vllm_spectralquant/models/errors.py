"""The one exception type for problems with a model folder, a model file or a model architecture."""

from __future__ import annotations

from vllm_spectralquant.errors import SpectralQuantError


class ModelError(SpectralQuantError, ValueError):
    """A model cannot be found, converted, loaded, captured or served; the message names the cause and the fix."""
