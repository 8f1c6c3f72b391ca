"""The fast paths of the risk signals against their plain reference definitions.

Each fast path (normalisation skipping the look-alike table, head/tail sentences found without
splitting the whole prompt) must give exactly what the straightforward code gives, on every
Unicode character and on mixed and adversarial text.
"""

from __future__ import annotations

import gc
import random
import re
import sys
import unicodedata
from collections.abc import Iterator

import pytest

from gateway.risk import fingerprint as fp
from gateway.risk.normalize import _TABLE, normalize

_SEPARATORS = re.compile(r"[^0-9a-z<>/#]+")


@pytest.fixture(autouse=True)
def _collect_after() -> Iterator[None]:
    # These tests allocate millions of short strings; collect them here, so that a full collection
    # does not fall due inside a later test that times real sleeps (the Redis store contract).
    yield
    gc.collect()


def reference_normalize(text: str) -> str:
    """The definition: table, NFKC, casefold, table again, separators to one space."""
    text = text.translate(_TABLE)
    text = unicodedata.normalize("NFKC", text).casefold()
    text = text.translate(_TABLE)
    return _SEPARATORS.sub(" ", text).strip()


def reference_head_tail(user: str) -> tuple[str | None, str | None]:
    sentences = [s for s in re.split(r"(?<=[.?!:])\s+|\n+", user.strip()) if s]
    if not sentences:
        return None, None
    return sentences[0], sentences[-1] if len(sentences) > 1 else None


def test_normalize_every_code_point() -> None:
    chars = [chr(c) for c in range(sys.maxunicode + 1)]
    for i in range(0, len(chars), 512):
        block = chars[i:i + 512]
        for c in block:
            assert normalize(c) == reference_normalize(c), hex(ord(c))
            assert normalize(f"Ab{c}cD") == reference_normalize(f"Ab{c}cD"), hex(ord(c))
        joined = "x".join(block)
        assert normalize(joined) == reference_normalize(joined), hex(i)


def _mixed(rng: random.Random) -> str:
    pool = ("step by step", "Think", " ", "\n", "\u200b", "ѕ", "е", "Ｓ", "é", "e\u0301", "’", "—", "¾", "ß",
            "İ", "ﬁ", "Σ", "ς", "#", "<", ">", "/", "?", "\ud800", "가", "\u1100\u1161", "٣", "x", "Q")
    return "".join(rng.choice(pool) for _ in range(rng.randrange(0, 40)))


def test_normalize_mixed_text() -> None:
    rng = random.Random(5)
    for _ in range(20000):
        text = _mixed(rng)
        assert normalize(text) == reference_normalize(text), repr(text)


_SENTENCE_PARTS = ("a", "Bb", " ", "  ", "\n", "\n\n", "\t", ".", "?", "!", ":", ". ", ".\n", "\r\n",
                   "\u2028", "\xa0", "\u3000", "x.y", "1:2", "", "...", " \n ", "\x1c", "\x85", "\n.",
                   ".\n\n ", "?\t\n", "\u200b", "\x0b")


@pytest.mark.parametrize("seed", range(4))
def test_head_tail_sentences(seed: int) -> None:
    rng = random.Random(seed)
    for i in range(20000):  # short texts, and long ones (the last boundary is searched from the end)
        size = rng.randrange(0, 30 if i % 2 else 400)
        text = "".join(rng.choice(_SENTENCE_PARTS) if rng.random() < 0.3 else "word" for _ in range(size))
        assert fp.head_tail(text.strip()) == reference_head_tail(text), repr(text)


def reference_mask(text: str) -> str:
    """The definition: the four substitutions, the URL one always run."""
    text = fp._URL.sub(" url ", text)
    text = fp._QUOTED.sub(" qq ", text)
    text = fp._ENTITY.sub(" ee ", text)
    return fp._NUMBER.sub(" 0 ", text)


_MASK_PARTS = ("word", "Name", " ", "\n", "@", "a@b.co", "x.y@host-1.org", "http://", "https://ex.com/a",
               "www.", "www.site.io", ":/", "//", "ftp://h", "\"q\"", "'s'", "12", "$3.50", "W@W", ".", "-")


def test_mask_skips_the_url_scan_only_when_it_cannot_match() -> None:
    rng = random.Random(3)
    for _ in range(20000):
        text = "".join(rng.choice(_MASK_PARTS) for _ in range(rng.randrange(0, 25)))
        assert fp.mask(text) == reference_mask(text), repr(text)
