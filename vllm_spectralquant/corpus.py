"""Text corpora for calibration and evaluation: find, read, tokenize, cut into fixed windows.

The default corpus is ``lee_background.cor`` (300 English news articles, ~360 KB, ~75k SmolLM2 tokens), shipped
inside the ``gensim`` wheel. It is located on disk without importing gensim, which needs dependencies we do not
install.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_spectralquant.errors import SpectralQuantError
from vllm_spectralquant.files import PackageFileMissing, find_package_file

GENSIM_PIN = "gensim==4.4.0"
DEFAULT_CORPUS_RELPATH = Path("test") / "test_data" / "lee_background.cor"
CORPUS_SUFFIXES = (".txt", ".cor", ".md")


class CorpusError(SpectralQuantError, ValueError):
    """A corpus cannot be found, read or cut as asked; the message names the cause and the fix."""


def default_corpus_path() -> Path:
    """Path of ``gensim/test/test_data/lee_background.cor`` in the installed gensim distribution.

    ``find_spec`` on a top-level package locates it without running its ``__init__``.
    """
    hint = f"install it with `pip install --no-deps {GENSIM_PIN}` (gensim itself is never imported)"
    try:
        return find_package_file("gensim", DEFAULT_CORPUS_RELPATH)
    except PackageFileMissing as exc:
        raise CorpusError(f"the default corpus comes from the gensim package: {exc}; {hint}") from exc


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        # utf-8-sig: a leading byte-order mark is not text.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not UTF-8 text: byte {exc.start} is {data[exc.start:exc.start + 1]!r} ({exc.reason})"
        ) from None


def corpus_files(folder: Path) -> list[Path]:
    """Files with a corpus suffix (.txt, .cor, .md) under ``folder``, recursively, sorted by relative path."""
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def read_corpus(path: Path | str | None = None) -> str:
    """Text of a UTF-8 file, or of every .txt/.cor/.md file in a folder (sorted, joined by one blank line).

    ``None`` reads the default corpus (:func:`default_corpus_path`).
    """
    if path is None:
        path = default_corpus_path()
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist")
    if path.is_dir():
        files = corpus_files(path)
        if not files:
            raise CorpusError(f"corpus folder {path} holds no {'/'.join('*' + s for s in CORPUS_SUFFIXES)} files")
        parts = [_read_utf8(f).strip("\n") for f in files]
        text = "\n\n".join(p for p in parts if p.strip())
    else:
        text = _read_utf8(path)
    if not text.strip():
        raise CorpusError(f"corpus {path} holds no text (empty or whitespace only)")
    return text


def corpus_sha256(text: str) -> str:
    """Hex SHA-256 of the text's UTF-8 bytes: identifies the exact corpus a calibration saw."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenize_corpus(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, without special tokens (windows are cut from running text).

    ``tokenizer`` is a Hugging Face tokenizer (anything callable like one).
    """
    if not text:
        raise CorpusError("cannot tokenize an empty corpus")
    # verbose=False: the whole corpus is longer than the model's context on purpose; it is cut into windows later.
    encoded = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = torch.as_tensor(encoded["input_ids"], dtype=torch.long)
    if ids.ndim != 1 or ids.numel() == 0:
        raise CorpusError(f"tokenizer returned no tokens (shape {tuple(ids.shape)}) for {len(text)} characters")
    return ids


def leading_special_token(tokenizer: Any) -> int | None:
    """The id a tokenizer puts in front of every sequence it encodes (Gemma's BOS), or None (SmolLM2, Qwen2.5).

    Served requests start with it, so calibration windows must too: it is where such a model puts its
    attention sink, and without it the model picks an arbitrary early token instead.
    """
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    if len(special) == len(plain) + 1 and special[1:] == plain:
        return int(special[0])
    return None


def _check_ids(ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise CorpusError(f"token ids must be a 1-D tensor, got {shape}")


def split_windows(ids: torch.Tensor, window: int, num_windows: int | None = None, start: int = 0) -> torch.Tensor:
    """Consecutive, non-overlapping windows ``ids[start:start + N*window]`` as an int64 tensor [N, window].

    ``num_windows=None`` takes as many whole windows as fit; a trailing partial window is dropped.
    """
    _check_ids(ids)
    if window <= 0:
        raise CorpusError(f"window must be a positive number of tokens, got {window}")
    if num_windows is not None and num_windows <= 0:
        raise CorpusError(f"num_windows must be positive or None, got {num_windows}")
    if start < 0:
        raise CorpusError(f"start must be >= 0, got {start}")
    available = max(ids.numel() - start, 0)
    count = available // window if num_windows is None else num_windows
    needed = max(count, 1) * window
    if count == 0 or available < needed:
        raise CorpusError(
            f"corpus too short: found {available} tokens from position {start} (of {ids.numel()}), "
            f"need {needed} for {max(count, 1)} window(s) of {window}"
        )
    return ids[start:start + count * window].reshape(count, window).to(torch.long)


def split_halves(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration ids, held-out ids): the first and second half of a 1-D token sequence, by token count.

    Calibrating on one half and evaluating on the other keeps evaluation text unseen by calibration.
    """
    _check_ids(ids)
    if ids.numel() < 2:
        raise CorpusError(f"corpus too short to split in halves: found {ids.numel()} tokens, need at least 2")
    half = ids.numel() // 2
    return ids[:half], ids[half:]


@dataclass(frozen=True)
class HeldOut:
    """The evaluation side of a corpus: its second half (calibration reads the first), and what the
    tokenizer puts before any text (Gemma: its BOS, which it degrades without; SmolLM2, Qwen: nothing),
    which starts every evaluation sequence as it would in the model's own use."""

    ids: torch.Tensor  # int64 [N]: the whole corpus
    held: torch.Tensor  # int64 [N - N // 2]: its second half
    prefix: list[int]

    def windows(self, window: int, num_windows: int | None = None, start: int = 0) -> list[list[int]]:
        """``prefix`` + each of :func:`split_windows` of the held-out half."""
        return [self.prefix + w.tolist() for w in split_windows(self.held, window, num_windows, start=start)]


def held_out(tokenizer: Any, text: str) -> HeldOut:
    """Tokenise ``text`` (no special tokens) and keep its held-out half for evaluation."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    _, held = split_halves(ids)
    return HeldOut(ids, held, list(tokenizer("", add_special_tokens=True)["input_ids"]))
