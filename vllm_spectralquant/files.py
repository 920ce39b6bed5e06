"""Files: data shipped inside installed packages (found without importing them), checksums and atomic writes."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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


@contextmanager
def atomic_output(path: Path | str, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write (or stream) into; its bytes appear at ``path`` only if the block ends without an error.

    The file is a temporary next to ``path``, renamed over it at the end, so readers see the old file or the new
    one, never a part; an error inside the block (a failed check included) deletes the temporary.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, mode)  # mkstemp makes 0600; reports are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: Path | str, payload: bytes, mode: int = 0o644) -> Path:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path, mode) as f:
        f.write(payload)
    return Path(path)


def save_figure(fig, path: Path | str, dpi: float | None = None) -> Path:
    """Render a matplotlib ``Figure`` (no pyplot, no global backend switch) to a PNG at ``path``, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches itself to fig
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi if dpi is not None else "figure")
    return write_atomic(path, buf.getvalue())
