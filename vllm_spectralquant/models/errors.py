"""The one exception type for problems with a model folder, a model file or a model architecture."""

from __future__ import annotations


class ModelError(ValueError):
    """A model cannot be found, converted, loaded or captured; the message names the cause and the fix."""
