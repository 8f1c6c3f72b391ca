"""``Memo``: a bounded cache for pure functions of request text (template ids, folded prompts).

Templated traffic repeats the same system prompt and wrapper sentences thousands of times;
remembering what they fold to skips the regex, normalisation and hashing work. Eviction is
first-in first-out (dict order, the oldest eighth at once: gateway.memo): cheaper than LRU
bookkeeping on every hit, and a hot entry that is evicted is simply recomputed once. Memory:
``max_entries`` keys and values, and text longer than ``max_key_chars`` is never cached (so a
handful of huge prompts cannot pin megabytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from gateway.memo import make_room

V = TypeVar("V")
_MISSING = object()  # values may be None


class Memo(Generic[V]):
    """``memo(text, fn)`` is ``fn(text)``, remembered for up to ``max_entries`` texts."""

    __slots__ = ("_data", "_max", "_max_key", "hits", "misses")

    def __init__(self, max_entries: int = 4096, max_key_chars: int = 8192) -> None:
        if max_entries <= 0:
            raise ValueError("max_entries must be positive")
        self._data: dict[str, V] = {}
        self._max = max_entries
        self._max_key = max_key_chars
        self.hits = 0
        self.misses = 0

    def __call__(self, text: str, fn: Callable[[str], V]) -> V:
        data = self._data
        found = data.get(text, _MISSING)
        if found is not _MISSING:
            self.hits += 1
            return found  # type: ignore[return-value]
        self.misses += 1
        value = fn(text)
        if len(text) <= self._max_key:
            make_room(data, self._max)
            data[text] = value
        return value

    def __len__(self) -> int:
        return len(self._data)
