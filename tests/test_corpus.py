"""Corpus finding, reading, tokenizing and windowing."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from vllm_spectralquant.corpus import (
    CorpusError,
    corpus_sha256,
    default_corpus_path,
    leading_special_token,
    read_corpus,
    split_halves,
    split_windows,
    tokenize_corpus,
)


def test_default_corpus_is_lee_background_found_without_importing_gensim():
    code = (
        "import sys; from vllm_spectralquant.corpus import default_corpus_path; "
        "p = default_corpus_path(); print(p); assert 'gensim' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    path = default_corpus_path()
    assert out.stdout.strip() == str(path)
    assert path.name == "lee_background.cor" and path.parts[-4:-1] == ("gensim", "test", "test_data")


def test_default_corpus_missing_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real_find_spec(name, *a)
    )
    with pytest.raises(CorpusError, match=r"pip install --no-deps gensim==4\.4\.0"):
        default_corpus_path()


def test_read_default_corpus():
    text = read_corpus(None)
    assert 300_000 < len(text) < 400_000
    assert text == read_corpus(default_corpus_path())


def test_read_folder_sorted_and_joined_with_blank_lines(tmp_path):
    (tmp_path / "b.md").write_text("second\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.cor").write_text("third\n\n", encoding="utf-8")
    (tmp_path / "notes.json").write_text("{}", encoding="utf-8")  # not a corpus suffix: ignored
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")  # empty: skipped
    assert read_corpus(tmp_path) == "first\n\nsecond\n\nthird"


def test_read_errors_name_the_cause(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nope.txt")
    with pytest.raises(CorpusError, match="holds no"):
        read_corpus(tmp_path)  # an empty folder
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no text"):
        read_corpus(blank)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt is not UTF-8.*byte 3"):
        read_corpus(latin1)
    with pytest.raises(CorpusError, match=r"latin1\.txt"):
        read_corpus(tmp_path)  # the folder: the message names the offending file


def test_utf8_bom_is_not_text(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello")
    assert read_corpus(path) == "hello"


def test_corpus_sha256():
    assert corpus_sha256("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_tokenize_corpus(tiny_tokenizer):
    ids = tokenize_corpus(tiny_tokenizer, "hello world\n" * 100)
    assert ids.dtype == torch.long and ids.ndim == 1 and ids.numel() == 1200
    with pytest.raises(CorpusError):
        tokenize_corpus(tiny_tokenizer, "")


def test_leading_special_token(tiny_tokenizer):
    """Gemma-like tokenizers put a BOS in front of every sequence; SmolLM2-like ones add nothing."""
    import copy

    from tokenizers.processors import TemplateProcessing

    assert leading_special_token(tiny_tokenizer) is None
    with_bos = copy.deepcopy(tiny_tokenizer)
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert with_bos("ab")["input_ids"][0] == bos
    assert leading_special_token(with_bos) == bos


def test_held_out_windows_start_like_served_sequences(tiny_tokenizer):
    """The evaluation half of a corpus, each window led by what the tokenizer puts before text."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from vllm_spectralquant.corpus import held_out

    text = " ".join(f"w{i}" for i in range(600))
    plain = held_out(tiny_tokenizer, text)
    assert plain.prefix == [] and torch.equal(plain.held, plain.ids[plain.ids.numel() // 2 :])
    assert plain.windows(16, 2) == [plain.held[:16].tolist(), plain.held[16:32].tolist()]
    with_bos = copy.deepcopy(tiny_tokenizer)
    bos = with_bos.bos_token_id
    with_bos._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    led = held_out(with_bos, text)
    assert led.prefix == [bos] and torch.equal(led.ids, plain.ids)  # the corpus itself has no BOS
    assert led.windows(16, 1, start=5) == [[bos] + plain.held[5:21].tolist()]


def test_split_windows():
    ids = torch.arange(1000)
    windows = split_windows(ids, window=100, num_windows=3, start=50)
    assert windows.shape == (3, 100) and windows.dtype == torch.long
    assert torch.equal(windows[0], torch.arange(50, 150)) and torch.equal(windows[2], torch.arange(250, 350))
    assert split_windows(ids, window=300, num_windows=None).shape == (3, 300)  # partial window dropped


def test_split_windows_too_short_says_found_and_needed():
    ids = torch.arange(1000)
    with pytest.raises(CorpusError, match=r"found 900 tokens from position 100 .*need 1024 for 2 window"):
        split_windows(ids, window=512, num_windows=2, start=100)
    with pytest.raises(CorpusError, match=r"found 10 tokens .*need 512 for 1 window"):
        split_windows(ids, window=512, num_windows=None, start=990)
    with pytest.raises(CorpusError, match="window must be"):
        split_windows(ids, window=0, num_windows=1)
    with pytest.raises(CorpusError, match="1-D"):
        split_windows(ids.reshape(10, 100), window=10, num_windows=1)


def test_split_halves():
    calib, heldout = split_halves(torch.arange(11))
    assert torch.equal(calib, torch.arange(5)) and torch.equal(heldout, torch.arange(5, 11))
    with pytest.raises(CorpusError, match="found 1 tokens"):
        split_halves(torch.arange(1))


@pytest.mark.slow
def test_lee_background_with_smollm2_tokenizer(lee_ids):
    # ~75k SmolLM2 tokens: enough for 16x512 calibration windows in the first half and 8x512 held out in the second.
    assert 70_000 < lee_ids.numel() < 80_000
    calib, heldout = split_halves(lee_ids)
    assert split_windows(calib, 512, 16).shape == (16, 512)
    assert split_windows(heldout, 512, 8).shape == (8, 512)
