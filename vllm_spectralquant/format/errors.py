"""Exceptions of the format layer."""


class FormatError(ValueError):
    """Bad input to the codec or the reference attention (shape, dtype, value, range)."""
