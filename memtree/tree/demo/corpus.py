"""The demo's corpus: the notes shipped in ``notes/`` (package data), or any directory of
``.txt`` files, cut into chunks whose ids are their content hashes."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from memtree.tree.demo.errors import DemoError

__all__ = ["CHUNK_WORDS", "Source", "chunk_id", "chunk_text", "load_corpus"]

#: Target words per chunk; a paragraph is split into pieces of at most this many.
CHUNK_WORDS = 40


@dataclass(frozen=True)
class Source:
    id: str
    name: str
    text: str


def chunk_text(text: str, max_words: int = CHUNK_WORDS) -> list[str]:
    """Paragraphs (blank-line separated), each split into even pieces of <= ``max_words``.

    Pieces never cross a paragraph, so a paragraph repeated anywhere in the corpus
    yields the very same chunks, and so the same chunk ids.
    """
    pieces: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        if not words:
            continue
        count = math.ceil(len(words) / max_words)
        size = math.ceil(len(words) / count)
        pieces.extend(" ".join(words[i : i + size]) for i in range(0, len(words), size))
    return pieces


def chunk_id(text: str) -> str:
    """A content hash: the same text is the same chunk, wherever it appears."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _source_id(name: str) -> str:
    stem = name.rsplit(".", 1)[0].lower()
    return re.sub(r"[^a-z0-9]+", "-", stem).strip("-") or "source"


def load_corpus(corpus: str | None) -> list[Source]:
    """The ``.txt`` files of ``corpus`` (a directory), or the built-in notes; by name."""
    if corpus is None:
        root = resources.files("memtree.tree.demo") / "notes"
        files = [
            (entry.name, entry.read_text(encoding="utf-8"))
            for entry in root.iterdir()
            if entry.name.endswith(".txt")
        ]
        where = "the built-in corpus"
    else:
        directory = Path(corpus)
        if not directory.is_dir():
            raise DemoError(f"--corpus {corpus}: not a directory")
        files = [
            (path.name, path.read_text(encoding="utf-8", errors="replace"))
            for path in directory.iterdir()
            if path.suffix == ".txt" and path.is_file()
        ]
        where = str(directory)
    sources: list[Source] = []
    taken: set[str] = set()
    for name, text in sorted(files):
        ident = base = _source_id(name)
        n = 1
        while ident in taken:  # notes.txt and Notes.txt are two trees
            n += 1
            ident = f"{base}-{n}"
        taken.add(ident)
        sources.append(Source(ident, name, text))
    if not sources:
        raise DemoError(f"no .txt files in {where}")
    return sources
