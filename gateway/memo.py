"""Bounded first-in first-out memos on plain dicts, with O(1) amortised eviction.

The hot paths memoise in plain dicts (a dict lookup is the cheapest memo there is) bounded by an
entry count. The obvious eviction, ``del memo[next(iter(memo))]`` before each insert, is O(n): a
dict keeps the slots of deleted entries until it next resizes, and iteration starts by scanning
past them, so once a memo is full every insert scans the entries deleted before it. At 16,384
entries that is ~4 µs per insert, paid on every request whose key is new: exactly the traffic of
many accounts or addresses. :func:`make_room` drops the oldest eighth at once instead: one scan
per n/8 inserts.

:class:`Memo` wraps that for pure functions of request text (template ids, folded prompts,
forwarded hops). Text repeats (templated prompts, a client's own address), so remembering what it
maps to skips the regex, parsing and hashing work. Eviction is first-in first-out: cheaper than
LRU bookkeeping on every hit, and a hot entry that is evicted is simply recomputed once. Memory:
``max_entries`` keys and values, and text longer than ``max_key_chars`` is never cached (so a
handful of huge inputs cannot pin megabytes).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Any, Generic, TypeVar

V = TypeVar("V")
_MISSING = object()  # values may be None


def make_room(memo: dict[Any, Any], max_entries: int) -> None:
    """Before an insert into ``memo``: if it holds ``max_entries`` or more, drop its oldest
    entries (in insertion order), an eighth of them and at least one."""
    size = len(memo)
    if size < max_entries:
        return
    for key in list(islice(memo, max(1, size - max_entries + 1, size // 8))):
        del memo[key]


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
