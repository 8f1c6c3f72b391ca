"""Prompt template fingerprints: the instruction wrapper, with the payload masked out.

A harvesting campaign sends thousands of different questions wrapped in one instruction
template ("Solve the following problem. {question} Think step by step and put the final answer
after ####"). Masking numbers, quoted spans, URLs and entity-like capitalised words removes most
of the payload; the remaining payload (the question's own words) is removed by fingerprinting
the *head* and *tail* sentences separately (templates are a prefix, a suffix, or both) plus the
system prompt. Each candidate segment gets a 64-bit SimHash over token 3-shingles; the risk
signals count distinct accounts per candidate and report the candidate with the most accounts as
``risk.template_id`` (see :mod:`gateway.risk.signals`).

Exact masked skeletons always give the same id; :func:`bands` gives LSH bands for near-duplicate
lookups (not used by the online signals: paraphrased campaigns are caught by network and cluster
signals instead, see docs/distillation.md).

Cost: four regex passes over each segment (system prompt, head and tail sentence of the newest
user turn), normalisation, one CRC-based 64-bit hash per token 3-shingle and a bit-sliced
majority count: about 10-25 µs for a new prompt; segments seen before (templates, repeated system
prompts) cost one dict lookup each through a :class:`~gateway.memo.Memo`.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import partial

from gateway.memo import Memo
from gateway.risk.normalize import normalize

_URL = re.compile(r"\b(?:https?://|www\.)\S+|\b[\w.+-]+@[\w-]+\.[\w.]+")
_QUOTED = re.compile(r"\"[^\"\n]{0,300}\"|“[^”\n]{0,300}”|«[^»\n]{0,300}»|`[^`\n]{0,300}`"
                     r"|(?<!\w)'[^'\n]{1,200}'(?!\w)")
_NUMBER = re.compile(r"[$€£¥]?\d[\d,]*(?:\.\d+)?%?")
# A capitalised word that does not start a sentence is probably a name, place or product.
_ENTITY = re.compile(r"(?<=[\w,;:)] )[A-Z][\w'’-]*")
_SENTENCE = re.compile(r"(?<=[.?!:])\s+|\n+")  # the definition; head_tail() finds its first/last match
_FIRST_BOUNDARY = re.compile(r"[.?!:](?=\s)|\n")
# In the reversed text: whitespace that follows .?!: (forward), or a newline.
_LAST_BOUNDARY_REV = re.compile(r"\s(?=[.?!:])|\n")
_SPACES = re.compile(r"\s*")
MIN_TOKENS = 4  # shorter segments ("Thanks!", "Hi") are shared by everyone: not a template
MAX_SEGMENT_CHARS = 600
_MASK64 = (1 << 64) - 1
_PLANES = 6  # bit-sliced counters: up to 63 shingles per segment


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Template candidates of one prompt: ``(kind, id)`` with kind ``sys``, ``head`` or ``tail``."""

    candidates: tuple[tuple[str, str], ...]

    @property
    def primary(self) -> str | None:
        return self.candidates[0][1] if self.candidates else None


NO_FINGERPRINT = Fingerprint(())


def mask(text: str) -> str:
    """Replace URLs, quoted spans, numbers and entity-like words with placeholders."""
    # Every _URL match holds "://", "www." or "@"; without them the scan is skipped: its e-mail
    # branch backtracks through every word of the text (the costliest of the four passes).
    if "@" in text or "://" in text or "www." in text:
        text = _URL.sub(" url ", text)
    text = _QUOTED.sub(" qq ", text)
    text = _ENTITY.sub(" ee ", text)
    return _NUMBER.sub(" 0 ", text)


def _hash64(data: str) -> int:
    # CRC32 of the text and of its reverse: stable across processes and ~5x cheaper than a
    # cryptographic hash; a fingerprint needs spread, not collision resistance. (A seeded second
    # CRC of the same text would be the first XOR a length-dependent constant: correlated bits.)
    raw = data.encode()
    return zlib.crc32(raw) << 32 | zlib.crc32(raw[::-1])


def simhash(tokens: list[str], size: int = 3) -> int:
    """64-bit SimHash over token ``size``-shingles (all shingles weigh 1).

    Per-bit majority counts are kept bit-sliced in ``_PLANES`` integers (a ripple-carry adder
    over 64 lanes at once, unrolled), so the cost is a few integer operations per shingle instead
    of a 64-step Python loop.
    """
    if len(tokens) < size:
        shingles = [" ".join(tokens)]
    elif size == 3:
        shingles = [f"{a} {b} {c}" for a, b, c in zip(tokens, tokens[1:], tokens[2:], strict=False)]
    else:
        shingles = [" ".join(tokens[i:i + size]) for i in range(len(tokens) - size + 1)]
    del shingles[(1 << _PLANES) - 1:]
    crc32 = zlib.crc32
    p0 = p1 = p2 = p3 = p4 = p5 = 0  # _PLANES = 6 counter bit planes
    for shingle in shingles:
        raw = shingle.encode()
        c = crc32(raw) << 32 | crc32(raw[::-1])  # _hash64, inlined
        t = p0 & c
        p0 ^= c
        t, p1 = p1 & t, p1 ^ t
        t, p2 = p2 & t, p2 ^ t
        t, p3 = p3 & t, p3 ^ t
        t, p4 = p4 & t, p4 ^ t
        p5 ^= t  # at most 63 shingles: the top plane never carries out
    planes = (p0, p1, p2, p3, p4, p5)
    # Bit i of the result is set when count_i >= threshold (a strict majority of shingles).
    threshold = len(shingles) // 2 + 1
    greater, equal = 0, _MASK64
    for j in range(_PLANES - 1, -1, -1):
        plane = planes[j]
        if threshold >> j & 1:
            equal &= plane
        else:
            greater |= equal & plane
            equal &= ~plane & _MASK64
    return (greater | equal) & _MASK64


def bands(value: int, count: int = 4) -> tuple[int, ...]:
    """Split a 64-bit SimHash into ``count`` bands: hashes within Hamming distance ``count - 1``
    share at least one band exactly (pigeonhole), the basis of an LSH near-duplicate index."""
    width = 64 // count
    return tuple((value >> (i * width)) & ((1 << width) - 1) for i in range(count))


def _segment_id(segment: str) -> str | None:
    tokens = normalize(mask(segment[:MAX_SEGMENT_CHARS])).split()
    if len(tokens) < MIN_TOKENS:
        return None
    return f"{simhash(tokens):016x}"


def fingerprint(system: str, user: str, memo: Memo[str | None] | None = None) -> Fingerprint:
    """Template candidates for a system prompt and the newest user turn.

    With a ``memo``, the id of each segment (system prompt, head and tail sentence) is remembered
    by its text: templates repeat exactly those segments.
    """
    segment_id = _segment_id if memo is None else partial(memo, fn=_segment_id)
    found: list[tuple[str, str]] = []
    if system:
        sys_id = segment_id(system)
        if sys_id is not None:
            found.append(("sys", sys_id))
    first, last = head_tail(user.strip())
    if first is not None:
        head = segment_id(first)
        if head is not None:
            found.append(("head", head))
        if last is not None:
            tail = segment_id(last)
            if tail is not None and tail != head:
                found.append(("tail", tail))
    return Fingerprint(tuple(found)) if found else NO_FINGERPRINT


def head_tail(text: str) -> tuple[str | None, str | None]:
    """The first and last non-empty pieces of ``_SENTENCE.split(text)`` for a stripped ``text``
    (the last is None when there is one piece), without splitting all of it.

    A boundary lies inside one maximal run of whitespace (``text`` neither starts nor ends with
    one): a run right after ``.?!:`` is a boundary as a whole, any other run holds one boundary
    per stretch of newlines. So the first piece ends at the first ``.?!:`` followed by whitespace
    or the first newline; the last piece starts after the last such run, or after the last
    newline when its run does not follow ``.?!:``. The last one is searched from the end, in the
    reversed text: a few characters for a normal prompt.
    """
    if not text:
        return None, None
    first = _FIRST_BOUNDARY.search(text)
    if first is None:
        return text, None
    head = text[:first.start()] if first.group() == "\n" else text[:first.start() + 1]
    rev = text[::-1]
    size = len(text)
    hit = _LAST_BOUNDARY_REV.search(rev)  # a match exists: ``first`` is one
    assert hit is not None
    at = size - 1 - hit.start()  # forward index of the hit: a newline or whitespace after .?!:
    start = size - _spaces_end(rev, hit.start())  # start of the whitespace run holding it
    if text[at] == "\n" and text[start - 1] not in ".?!:":
        return head, text[at + 1:]
    return head, text[_spaces_end(text, at):]


def _spaces_end(text: str, pos: int) -> int:
    match = _SPACES.match(text, pos)
    assert match is not None  # ``\s*`` matches everywhere
    return match.end()