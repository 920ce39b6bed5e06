"""Calibration artifacts: pydantic manifest + safetensors tensors; atomic save, verified load (no vLLM import)."""

from vllm_spectralquant.artifact.errors import ArtifactError
from vllm_spectralquant.artifact.fingerprint import fingerprint_of
from vllm_spectralquant.artifact.manifest import Manifest, ModelFingerprint
from vllm_spectralquant.artifact.store import (
    Artifact,
    default_artifact_dir,
    load_artifact,
    read_manifest,
    verify_files,
    write_artifact,
)

__all__ = [
    "Artifact",
    "ArtifactError",
    "Manifest",
    "ModelFingerprint",
    "default_artifact_dir",
    "fingerprint_of",
    "load_artifact",
    "read_manifest",
    "verify_files",
    "write_artifact",
]
