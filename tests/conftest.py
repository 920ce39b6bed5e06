"""Shared fixtures: a tiny random Llama (fast tests) and the embedded SmolLM2 model (slow tests).

SPECTRALQUANT_HOME defaults to <repo>/.cache/spectralquant-home here, so the ~260 MB SmolLM2 conversion is done
once and reused by every later test run (CI included) instead of landing in the user's home cache.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("SPECTRALQUANT_HOME", str(REPO_ROOT / ".cache" / "spectralquant-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

TINY_VOCAB_SIZE = 256


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=128,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=512,
    )


@pytest.fixture
def tiny_llama():
    """A fresh random LlamaForCausalLM (fp32, eval): 2 layers, 4 query / 2 KV heads, head_dim 16."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids < 256), built offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= TINY_VOCAB_SIZE
    # BPE without merges splits text into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A saved Hugging Face folder holding the tiny random Llama and the tiny tokenizer."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def example_model_dir():
    """The SmolLM2 example model folder, converted once into $SPECTRALQUANT_HOME (reused if already there)."""
    from vllm_spectralquant.models.example_model import ensure_example_model

    started = time.perf_counter()
    path = ensure_example_model()
    print(f"\nexample model ready at {path} in {time.perf_counter() - started:.1f} s")
    return path


@pytest.fixture(scope="session")
def smollm2_fp32(example_model_dir):
    """(model, tokenizer): SmolLM2 loaded in float32 on CPU, shared by the slow tests."""
    from vllm_spectralquant.models.capture import load_model

    return load_model(example_model_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def lee_ids(smollm2_fp32):
    """lee_background tokenized with the SmolLM2 tokenizer: int64 [~75k]."""
    from vllm_spectralquant.corpus import read_corpus, tokenize_corpus

    return tokenize_corpus(smollm2_fp32[1], read_corpus(None))


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """An English text file (~60k characters of Python's own documentation), no download needed."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:60000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_calib_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved random Llama with head_dim 32 (the codec's minimum): 3 layers, 4 query / 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=3,
        intermediate_size=256,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=1024,
    )
    path = tmp_path_factory.mktemp("tiny-calib-llama")
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


#: The tiny artifact's key decode gain (opt-in; not the default) so that every backend test decodes with one.
TINY_KEY_GAIN = 1.04


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_calib_model_dir, text_corpus):
    """A calibrated artifact of the tiny Llama (every SpectralQuant preset), built once per session.

    Its layers have their own slot sizes (``--layer-budgets``), so every backend test runs the per-layer
    page path; the uniform path is what the served SmolLM2 tests and the TQ-layout presets use.
    """
    from vllm_spectralquant.calibrate.job import CalibrationConfig, calibrate

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    cfg = CalibrationConfig(
        model_dir=tiny_calib_model_dir, out_dir=out, corpus=text_corpus, tokens=2048, window=128, layer_budgets=True,
        key_gain=TINY_KEY_GAIN,
    )
    return calibrate(cfg)


@pytest.fixture(scope="session")
def readme_model(tmp_path_factory):
    """``spectralquant example-model DIR``: the model folder the README's MODEL_DIR stands for."""
    from console_commands import run_piped

    out = tmp_path_factory.mktemp("readme") / "SmolLM2-135M-Instruct"
    run = run_piped(["spectralquant", "example-model", str(out)], timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == str(out)
    assert (out / "config.json").is_file()
    return out


@pytest.fixture(scope="session")
def readme_calibration(readme_model):
    """``spectralquant calibrate MODEL_DIR`` in a terminal, exactly as written: (exit code, output, seconds).

    Runs at most once per session (~13 min on 2 cores, most of it the key-gain choice)."""
    from console_commands import run_in_terminal

    started = time.monotonic()
    rc, output = run_in_terminal(["spectralquant", "calibrate", str(readme_model)], timeout=1800)
    seconds = time.monotonic() - started
    print(f"\nspectralquant calibrate MODEL_DIR (SmolLM2, defaults, in a pty): exit {rc} after {seconds:.0f}s")
    return rc, output, seconds


@pytest.fixture(scope="session")
def smollm2_artifact(example_model_dir, request):
    """The embedded model's artifact (MODEL/spectralquant): reused when current, else the README command's
    (``readme_calibration``: the package's defaults on the same model files) copied in. So a fresh machine
    runs SmolLM2's default calibration once per session, not twice."""
    from vllm_spectralquant.artifact import default_artifact_dir
    from vllm_spectralquant.calibrate.job import current_artifact, ensure_calibrated

    if current_artifact(example_model_dir) is None:
        rc, output, _ = request.getfixturevalue("readme_calibration")
        assert rc == 0, output[-3000:]
        target = default_artifact_dir(example_model_dir)
        staged = target.with_name(target.name + ".from-readme")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(default_artifact_dir(request.getfixturevalue("readme_model")), staged)
        shutil.rmtree(target, ignore_errors=True)
        staged.rename(target)
    return ensure_calibrated(example_model_dir)  # verifies it (and calibrates if the copy were not current)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpreter: runs only under TRITON_INTERPRET=1 (tests/test_ops_triton.py starts that process)")


def pytest_collection_modifyitems(config, items):
    """Outside TRITON_INTERPRET=1, deselect the interpreter-only tests: test_ops_triton runs them in a child."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    dropped = [item for item in items if item.get_closest_marker("triton_interpreter")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker("triton_interpreter")]
