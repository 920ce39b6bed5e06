"""Files: data shipped inside installed packages (found without importing them) and checksums."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from vllm_spectralquant.errors import SpectralQuantError


class PackageFileMissing(SpectralQuantError, LookupError):
    """The package is not installed, or does not hold the file; the message says which."""


def find_package_file(package: str, relpath: str | Path) -> Path:
    """Path of ``relpath`` inside the installed top-level ``package``.

    ``find_spec`` on a top-level package locates it without running its ``__init__`` (the packages we
    take data from have heavy or missing dependencies).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PackageFileMissing(f"the package {package} is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relpath
        if candidate.is_file():
            return candidate
    raise PackageFileMissing(
        f"{package} is installed but holds no {Path(relpath).as_posix()} (looked in {list(spec.submodule_search_locations)})"
    )


def file_sha256(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
