"""Exceptions of the calibration job."""


class CalibrationError(ValueError):
    """Bad calibration input (corpus too small, bad option, unreachable Ray cluster); the message names the fix."""
