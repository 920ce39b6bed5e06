"""The package's base exception.

Every error this package raises on purpose derives from :class:`SpectralQuantError`, so a caller can
catch them all at once (the CLI does). Each room keeps its own subclass, whose message names the
cause and the fix:

=========================  ===========================================  ====================================
error                      raised for                                   module
=========================  ===========================================  ====================================
``FormatError``            bad input to the codec / reference attention ``vllm_spectralquant.format.errors``
``ArtifactError``          a missing, corrupted or mismatched artifact  ``vllm_spectralquant.artifact.errors``
``CalibrationError``       bad calibration options or input             ``vllm_spectralquant.calibrate.errors``
``ModelError``             a model that cannot be read, loaded, served  ``vllm_spectralquant.models.errors``
``CorpusError``            a corpus that cannot be read or cut          ``vllm_spectralquant.corpus``
``ServingConfigError``     a bad serving configuration (kv-cache dtype, ``vllm_spectralquant.backend.config``
                           ``--additional-config`` options)
``EvalError``              an eval that cannot give a trustworthy answer ``vllm_spectralquant.evaluation.run``
``MissingExtraError``      an optional dependency that is not installed ``vllm_spectralquant.extras``
=========================  ===========================================  ====================================

Most also derive from ``ValueError`` (bad values), as they did before this base existed.
This module imports nothing.
"""


class SpectralQuantError(Exception):
    """Base class of every error vllm-spectralquant raises on purpose."""
