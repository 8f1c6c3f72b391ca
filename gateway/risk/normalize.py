"""Text normalisation for pattern matching: defeat cheap evasions before the regex runs.

Order matters: zero-width characters are removed first (they split words invisibly), then NFKC
folds compatibility forms (full-width letters, ligatures, circled digits), ``casefold`` handles
case beyond ASCII, a small confusables table maps the Cyrillic/Greek letters that look like
Latin ones, and finally every run of non-alphanumerics (except ``<``, ``>``, ``/`` and ``#`` so tag
names and ``####`` answer markers survive) becomes one space. ``step-by-step``,
``STEP  BY\u200bSTEP`` and ``ѕtер bу ѕtер``
all become ``step by step``.

Cost: linear in the text, all in C: ASCII text takes one ``bytes.translate`` and a split (about
5 µs per KiB). Other text adds ``unicodedata.normalize`` and ``casefold`` (about 3 µs per KiB);
the look-alike table (``str.translate`` with a dict, about 20 µs per KiB) only runs when a
character it maps is present (one regex scan tells), and the final separator step is the ASCII
path again, with every non-ASCII character as a separator (``encode(errors="replace")``).
"""

from __future__ import annotations

import re
import unicodedata
from types import MappingProxyType

# Invisible characters used to split trigger words: zero-width space/non-joiner/joiner, word
# joiner, BOM, soft hyphen, Mongolian vowel separator, invisible operators.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u2061\u2062\u2063\u2064"

# Lower-case look-alikes (casefold runs first, so upper-case forms are covered). Only letters
# that render like a Latin letter in common fonts: a wider table would fold real Cyrillic or
# Greek words into nonsense, which is harmless for matching but wastes work.
_CONFUSABLES = MappingProxyType({
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k",
    "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s",
    "ԁ": "d", "ԛ": "q", "ԝ": "w", "ү": "y", "ӏ": "l", "ɡ": "g",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w", "ς": "c", "σ": "o", "μ": "u",
})

_TABLE = str.maketrans({**{c: None for c in _INVISIBLE}, **_CONFUSABLES})
# Any character the table maps: without one, translate() would return the text unchanged.
_MAPPED = re.compile("[" + re.escape(_INVISIBLE + "".join(_CONFUSABLES)) + "]")
_KEEP = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyz<>/#")
# ASCII fast path: one 256-byte table lower-cases and turns separators into spaces in C.
_ASCII_TABLE = bytes(
    (c + 32 if 65 <= c <= 90 else c) if (c in _KEEP or 65 <= c <= 90) else 32 for c in range(256)
)
# After casefold: the separator step. Only [0-9a-z<>/#] is kept (upper case is a separator here,
# though casefold leaves none); ``?``, which ``encode(errors="replace")`` puts in place of every
# non-ASCII character, is a separator like the characters it replaces.
_FOLDED_TABLE = bytes(c if c in _KEEP else 32 for c in range(256))


def normalize(text: str) -> str:
    """Fold ``text`` for matching: invisible chars out, NFKC, casefold, confusables, spaces."""
    if text.isascii():
        # No invisible characters, look-alikes or compatibility forms can be present: 5x faster.
        return b" ".join(text.encode("ascii").translate(_ASCII_TABLE).split()).decode("ascii")
    if _MAPPED.search(text) is not None:
        text = text.translate(_TABLE)
    text = unicodedata.normalize("NFKC", text).casefold()
    # NFKC/casefold can produce new confusables (e.g. full-width Cyrillic), so fold again.
    if _MAPPED.search(text) is not None:
        text = text.translate(_TABLE)
    # Every run of characters outside [0-9a-z<>/#] becomes one space, ends stripped.
    return b" ".join(text.encode("ascii", "replace").translate(_FOLDED_TABLE).split()).decode("ascii")
