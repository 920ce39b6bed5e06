"""Build a larger, more varied calibration corpus from text that is already installed, for issue 11.

Four domains, interleaved in ~2 KB paragraphs so that any prefix (calibration reads the first
``--tokens``) holds all of them in equal shares:

* news: the first 45 % of ``lee_background.cor`` (gensim), so the eval's held-out second half stays unseen;
* encyclopedia: the shortened English Wikipedia dump in gensim's test data, wiki markup stripped;
* technical prose: Python's reference documentation (``pydoc_data/topics.py``, standard library);
* code: the Python standard library's own source files.

Usage::

    python bench/varied_corpus.py --out /tmp/varied_corpus.txt
    spectralquant calibrate $S --corpus /tmp/varied_corpus.txt --tokens 65536 --out /tmp/sq-smol-varied
"""

from __future__ import annotations

import argparse
import bz2
import html
import itertools
import re
import sysconfig
from pathlib import Path

from vllm_spectralquant.corpus import default_corpus_path
from vllm_spectralquant.files import find_package_file, write_atomic

WIKI_RELPATH = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CHUNK_CHARS = 2000
#: The eval holds out lee_background's second half (by tokens); 45 % of the characters stays clear of it.
NEWS_SHARE = 0.45


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Paragraph-aligned pieces of about ``size`` characters (never split inside a paragraph)."""
    out, cur = [], []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        cur.append(para)
        if sum(map(len, cur)) >= size:
            out.append("\n\n".join(cur))
            cur = []
    if cur:
        out.append("\n\n".join(cur))
    return out


def news() -> str:
    text = default_corpus_path().read_text(encoding="utf-8")
    lines = text.splitlines()  # one article per line
    kept, total = [], 0
    for line in lines:
        if total + len(line) > NEWS_SHARE * len(text):
            break
        kept.append(line)
        total += len(line) + 1
    return "\n\n".join(kept)


def wikipedia() -> str:
    raw = bz2.decompress(find_package_file("gensim", WIKI_RELPATH).read_bytes()).decode("utf-8")
    pages = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S):
        t = html.unescape(body)
        t = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", t, flags=re.S)
        t = re.sub(r"<[^>]+>", "", t)
        for _ in range(3):  # nested templates
            t = re.sub(r"\{\{[^{}]*\}\}", "", t)
        t = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", t)  # [[target|label]] -> label
        t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
        t = re.sub(r"'{2,}", "", t)
        t = re.sub(r"^[{|!].*$|^\*.*$|^=+ *(.*?) *=+$", lambda m: m.group(1) or "", t, flags=re.M)
        t = re.sub(r"\n{3,}", "\n\n", t).strip()
        if len(t) > 500 and not t.lower().startswith("#redirect"):
            pages.append(t)
    return "\n\n".join(pages)


def python_docs() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def python_source() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 200_000)
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def build() -> tuple[str, dict[str, int]]:
    sources = {"news": news(), "wikipedia": wikipedia(), "python_docs": python_docs(), "python_source": python_source()}
    pieces = {name: chunks(text) for name, text in sources.items()}
    interleaved = [c for row in itertools.zip_longest(*pieces.values()) for c in row if c]
    return "\n\n".join(interleaved), {name: len(text) for name, text in sources.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output UTF-8 text file")
    args = ap.parse_args()
    text, sizes = build()
    write_atomic(args.out, text.encode("utf-8"))
    print(f"wrote {args.out}: {len(text):,} characters; per source: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))


if __name__ == "__main__":
    main()
