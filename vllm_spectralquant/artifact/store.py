"""Writing artifacts atomically and loading them with every check a server needs at startup.

Layout of an artifact folder (default ``MODEL_DIR/spectralquant/``)::

    manifest.json                 pydantic-validated, lists every file with its sha256
    bases.safetensors             per layer and KV head, stacked [L, H, ...]: key./value. mean, basis, scale, eigvals
    preset-<name>.safetensors     key./value. bits [L, H, G] int32, codebooks [L, H, G, 256] float32,
                                  optional value.mean [L, H, D], key.gain [L, H]
                                  (names and shapes: artifact/schema.py)
    report.md, *.png              the human report

The folder is built under a hidden temporary name next to the destination and renamed into
place only when complete, so an interrupted run never leaves something that looks valid.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vllm_spectralquant._version import __version__
from vllm_spectralquant.artifact.errors import ArtifactError
from vllm_spectralquant.files import file_sha256
from vllm_spectralquant.artifact.fingerprint import mismatches
from vllm_spectralquant.artifact.schema import (
    PRESET_KEY_GAIN,
    PRESET_VALUE_MEAN,
    bases_schema,
    preset_optional_schema,
    preset_schema,
    tensor_name,
)
from vllm_spectralquant.artifact.manifest import (
    BASES_FILE,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    CorpusInfo,
    FileEntry,
    Manifest,
    ModelFingerprint,
    PresetEntry,
    SinkInfo,
    preset_file,
)
from vllm_spectralquant.format import FORMAT_VERSION
from vllm_spectralquant.format.errors import FormatError
from vllm_spectralquant.format.params import ComponentCodec, LayerCodec
from vllm_spectralquant.format.presets import PRESETS, TokenScale

#: Where calibration writes and the backend looks by default: MODEL_DIR/spectralquant.
DEFAULT_ARTIFACT_SUBDIR = "spectralquant"


def default_artifact_dir(model_dir: Path | str) -> Path:
    return Path(model_dir) / DEFAULT_ARTIFACT_SUBDIR


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Fail early (before any work) when the artifact cannot be written to ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ArtifactError(f"{out_dir} already exists; pass --overwrite to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"{out_dir} exists and is not a folder")
    parent = out_dir.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ArtifactError(f"cannot create {parent}: {e}") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write into {parent}: permission denied")


def write_artifact(
    out_dir: Path | str,
    *,
    model: ModelFingerprint,
    corpus: CorpusInfo,
    bases: dict[str, torch.Tensor],
    presets: dict[str, tuple[PresetEntry, dict[str, torch.Tensor]]],
    write_extras: Callable[[Path], Iterable[Path]] | None = None,
    overwrite: bool = False,
    sinks: SinkInfo | None = None,
) -> Path:
    """Write a complete artifact atomically and return its path.

    Args:
        bases: ``key.mean`` ... tensors stacked over layers (see module docstring).
        presets: name -> (manifest entry, ``key.bits`` ... tensors).
        write_extras: called with the staging folder; writes the report and returns its files.
    """
    out_dir = Path(out_dir).absolute()
    check_destination(out_dir, overwrite)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file({k: v.contiguous() for k, v in bases.items()}, stage / BASES_FILE, metadata={"format_version": str(FORMAT_VERSION)})
        for name, (_, tensors) in presets.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, stage / preset_file(name), metadata={"format_version": str(FORMAT_VERSION)})
        if write_extras is not None:
            write_extras(stage)
        for p in stage.iterdir():
            os.chmod(p, 0o644)  # safetensors writes owner-only files; a server may run as another user
        files = [
            FileEntry(path=p.name, sha256=file_sha256(p), bytes=p.stat().st_size)
            for p in sorted(stage.iterdir())
            if p.is_file()
        ]
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            format_version=FORMAT_VERSION,
            package_version=__version__,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            model=model,
            corpus=corpus,
            presets=[entry for entry, _ in presets.values()],
            files=files,
            sinks=sinks,
        )
        with open(stage / MANIFEST_NAME, "w", encoding="utf-8") as f:
            f.write(manifest.model_dump_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(stage, 0o755)
        _fsync_dir(stage)
        if out_dir.exists():  # overwrite: swap, then delete the old folder
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "a")
            os.replace(stage, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Artifact:
    """A verified artifact: the manifest and the tensors of the requested presets."""

    path: Path
    manifest: Manifest
    bases: dict[str, torch.Tensor]
    presets: dict[str, dict[str, torch.Tensor]]

    @property
    def model(self) -> ModelFingerprint:
        return self.manifest.model

    def layer_codec(self, preset: str, layer: int, kv_heads: slice | None = None) -> LayerCodec:
        """The codec of one layer; ``kv_heads`` selects a tensor-parallel rank's slice of heads."""
        if preset not in self.presets:
            raise ArtifactError(f"preset {preset} was not loaded from {self.path}")
        heads = kv_heads or slice(None)
        tensors = self.presets[preset]

        def component(c: str) -> ComponentCodec:
            # A preset's own (sink-anchored) value mean wins over the shared one.
            own = tensors.get(PRESET_VALUE_MEAN) if c == "value" else None
            mean = own if own is not None else self.bases[tensor_name(c, "mean")]
            gain = tensors.get(PRESET_KEY_GAIN) if c == "key" else None
            return ComponentCodec(
                basis=self.bases[tensor_name(c, "basis")][layer, heads].float(),
                mean=mean[layer, heads].float(),
                scale=self.bases[tensor_name(c, "scale")][layer, heads].float(),
                bits=tensors[tensor_name(c, "bits")][layer, heads].to(torch.int32),
                codebooks=tensors[tensor_name(c, "codebooks")][layer, heads].float(),
                token_scale=TokenScale.NONE,
                gain=None if gain is None else gain[layer, heads].float(),
            )

        entry = self.manifest.preset(preset)
        slots = None if entry is None else entry.layer_slot_bytes  # None: every layer has the preset's size
        codec = LayerCodec(PRESETS[preset], component("key"), component("value"), None if slots is None else slots[layer])
        try:
            return codec.validate()
        except FormatError as e:
            raise ArtifactError(f"{self.path}: preset {preset}, layer {layer}: {e}; re-run spectralquant calibrate") from e


def read_manifest(path: Path | str) -> Manifest:
    """Parse and validate ``manifest.json`` of the artifact at ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(
            f"no SpectralQuant artifact at {path}: run `spectralquant calibrate MODEL_DIR` first "
            "(or point to the artifact with --additional-config '{\"spectralquant\": {\"artifact\": \"DIR\"}}')"
        )
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST_NAME}: not a complete artifact; re-run spectralquant calibrate")
    try:
        raw = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is corrupted, re-run spectralquant calibrate") from e
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ArtifactError(
            f"{mpath} has schema_version {raw.get('schema_version')!r}; this vllm-spectralquant ({__version__}) "
            f"reads version {SCHEMA_VERSION}: upgrade the package or re-run spectralquant calibrate"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'manifest'}: {err['msg']}" for err in e.errors()[:5])
        raise ArtifactError(f"{mpath} is invalid: {problems}") from e
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} uses format version {manifest.format_version}; this vllm-spectralquant reads version "
            f"{FORMAT_VERSION}: re-run spectralquant calibrate with this version"
        )
    return manifest


def verify_files(path: Path, manifest: Manifest, names: Iterable[str] | None = None) -> None:
    """Check that the listed files exist with their recorded size and sha256."""
    wanted = set(names) if names is not None else None
    for entry in manifest.files:
        if wanted is not None and entry.path not in wanted:
            continue
        f = path / entry.path
        if not f.is_file():
            raise ArtifactError(f"{f} is missing from the artifact; re-run spectralquant calibrate")
        size = f.stat().st_size
        if size != entry.bytes:
            raise ArtifactError(
                f"{f} has {size} bytes, the manifest says {entry.bytes}: the file is truncated or replaced; "
                "re-run spectralquant calibrate"
            )
        if file_sha256(f) != entry.sha256:
            raise ArtifactError(f"checksum mismatch for {f}: the artifact is corrupted; re-run spectralquant calibrate")


def _load_tensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {f} ({e}); the artifact is corrupted, re-run spectralquant calibrate") from e


def _check_tensors(
    f: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], optional: dict[str, tuple[int, ...]] | None = None
) -> None:
    for name, shape in {**shapes, **(optional or {})}.items():
        t = tensors.get(name)
        if t is None and name in shapes:
            raise ArtifactError(f"{f} lacks tensor {name!r}; re-run spectralquant calibrate")
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ArtifactError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ArtifactError(f"{f}: tensor {name!r} contains NaN or inf; re-run spectralquant calibrate")


def _check_key_gain(f: Path, gain: torch.Tensor | None, recorded: float) -> None:
    """The preset file's ``key.gain`` tensor agrees with the manifest's ``key_gain`` (absent means 1)."""
    if gain is None and recorded != 1.0:
        raise ArtifactError(f"{f} lacks tensor {PRESET_KEY_GAIN!r} but the manifest records key_gain {recorded}; re-run spectralquant calibrate")
    if gain is not None and abs(float(gain.double().mean()) - recorded) > 1e-4:
        raise ArtifactError(
            f"{f}: tensor {PRESET_KEY_GAIN!r} has mean {float(gain.double().mean()):.6f} but the manifest records "
            f"key_gain {recorded}; re-run spectralquant calibrate"
        )


def load_artifact(
    path: Path | str, *, expect: ModelFingerprint | None = None, presets: Iterable[str] | None = None
) -> Artifact:
    """Load and verify an artifact.

    Args:
        expect: the fingerprint of the model being served; any difference is an error naming it.
        presets: presets to load (default: all in the manifest); a missing one is an error.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if expect is not None:
        diff = mismatches(manifest.model, expect)
        if diff:
            raise ArtifactError(
                f"the artifact at {path} was calibrated for a different model ({manifest.model.architecture}): "
                + "; ".join(diff)
                + ". Calibrate this model: spectralquant calibrate MODEL_DIR"
            )
    names = list(presets) if presets is not None else [p.name for p in manifest.presets]
    for n in names:
        if manifest.preset(n) is None:
            have = ", ".join(p.name for p in manifest.presets)
            raise ArtifactError(
                f"preset {n} is not in the artifact at {path} (it has: {have}); "
                f"run spectralquant calibrate MODEL_DIR --presets {n} --overwrite"
            )
    verify_files(path, manifest, [BASES_FILE] + [preset_file(n) for n in names])
    m = manifest.model
    shape = (m.num_layers, m.num_kv_heads, m.head_dim)
    bases = _load_tensors(path / BASES_FILE)
    _check_tensors(path / BASES_FILE, bases, bases_schema(*shape))
    loaded = {}
    for n in names:
        f = path / preset_file(n)
        tensors = _load_tensors(f)
        _check_tensors(f, tensors, preset_schema(*shape), preset_optional_schema(*shape))
        _check_key_gain(f, tensors.get(PRESET_KEY_GAIN), manifest.preset(n).key_gain)
        loaded[n] = tensors
    return Artifact(path, manifest, bases, loaded)
