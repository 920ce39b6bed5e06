"""Exceptions of the artifact layer."""


class ArtifactError(ValueError):
    """A missing, corrupted, incompatible or mismatched calibration artifact; the message names the fix."""
