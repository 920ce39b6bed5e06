"""Package-wide structure: one base exception, one model-shape reader, configuration errors of their own."""

import pytest

from vllm_spectralquant.errors import SpectralQuantError


def test_every_package_error_derives_from_spectralquant_error():
    from vllm_spectralquant.artifact.errors import ArtifactError
    from vllm_spectralquant.calibrate.errors import CalibrationError
    from vllm_spectralquant.corpus import CorpusError
    from vllm_spectralquant.evaluation.run import EvalError
    from vllm_spectralquant.files import PackageFileMissing
    from vllm_spectralquant.format.errors import FormatError
    from vllm_spectralquant.models.errors import ModelError

    for cls in (ArtifactError, CalibrationError, CorpusError, EvalError, FormatError, ModelError, PackageFileMissing):
        assert issubclass(cls, SpectralQuantError), cls
    for cls in (ArtifactError, CalibrationError, CorpusError, FormatError, ModelError):
        assert issubclass(cls, ValueError), cls  # as before the base existed
