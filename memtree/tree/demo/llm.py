"""The demo's stand-in LLM: deterministic, slow, sometimes timing out and sometimes asking
to be called later, so a run shows retries, deferrals and dedupe."""

from __future__ import annotations

import re
import time
import zlib
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "DEFER_ONE_IN",
    "FAIL_ONE_IN",
    "LLM_LATENCY_MS",
    "llm_extract",
    "llm_rate_limit_ms",
    "llm_summarise",
    "llm_times_out",
    "llm_wait_for_timeout",
]

#: One chunk in this many times out on its first extraction attempt (a transient failure).
FAIL_ONE_IN = 10
#: One chunk in this many is rate limited on first sight (a deferral, not an attempt).
DEFER_ONE_IN = 10
#: The stand-in LLM's latency per call, in milliseconds (inclusive range).
LLM_LATENCY_MS = (1, 5)


_STOPWORDS = frozenset(
    {
        "about",
        "above",
        "after",
        "again",
        "along",
        "always",
        "another",
        "because",
        "before",
        "below",
        "being",
        "between",
        "could",
        "every",
        "first",
        "found",
        "going",
        "might",
        "never",
        "other",
        "their",
        "there",
        "these",
        "those",
        "though",
        "three",
        "through",
        "under",
        "until",
        "where",
        "which",
        "while",
        "would",
        "still",
        "since",
    }
)


def _seed(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _think(seed: int) -> None:
    low, high = LLM_LATENCY_MS
    time.sleep((low + seed % (high - low + 1)) / 1000)


def _keywords(text: str, limit: int) -> list[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]*[A-Za-z]", text)]
    counts = Counter(w for w in words if len(w) >= 5 and w not in _STOPWORDS)
    # Ties go by a hash, not the alphabet, so a summary is not all words in "a".
    return sorted(counts, key=lambda w: (-counts[w], _seed(w)))[:limit]


def llm_times_out(chunk: str) -> bool:
    """Whether the stand-in times out on this chunk's first attempt (seeded by its id)."""
    return _seed(chunk) % FAIL_ONE_IN == 0


def llm_wait_for_timeout(chunk: str) -> None:
    """A call that times out still costs the wait."""
    _think(_seed(chunk))


def llm_rate_limit_ms(chunk: str) -> int | None:
    """How long the stand-in asks to wait on first sight of this chunk, if it does."""
    seed = _seed(f"rate:{chunk}")
    return 50 + seed % 101 if seed % DEFER_ONE_IN == 0 else None


def llm_extract(chunk: str, text: str) -> list[str]:
    """The chunk's "entities": its most frequent long words, after a model-like pause."""
    _think(_seed(chunk))
    return _keywords(text, 4)


def llm_summarise(key: str, texts: Sequence[str]) -> str:
    """A summary: the children's most frequent long words (a summary's children are
    summaries too, so the words climb the tree)."""
    _think(_seed(key))
    return ", ".join(_keywords(" ".join(texts), 6))
