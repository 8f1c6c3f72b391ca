"""A small HyperLogLog for the in-memory signal store (Redis has its own, ``PFADD``/``PFCOUNT``).

Like Redis's sparse encoding, a bucket starts *exact*: a set of up to :data:`SPARSE_MAX` members
(adding is one ``set.add``, counting is ``len``, no hashing at all). Past that it switches to
dense registers: p = 12, 4096 one-byte registers, standard error about 1.6%, with the usual
linear-counting correction for small cardinalities. Dense members are hashed with blake2b so an
estimate does not depend on the process (Python's ``hash`` is salted per process).

The signal store counts "this window and the previous one" together. Merging two register arrays
per request would cost ~200 µs in Python, so each bucket keeps a second, *view* (a set or
registers) started as a copy of the previous bucket and updated alongside its own, with the dense
estimator's running sums maintained incrementally: ``add`` and ``count`` are O(1); starting a
bucket costs one copy (4 KiB and ~50 ``bytearray.count`` calls when dense), once per window.

Memory per key and window: ``2 × SPARSE_MAX`` set slots at most while sparse (a few KiB; the
members themselves are the account/org strings the process already holds), 8 KiB when dense.
Below ``SPARSE_MAX`` members counts are exact; Redis's estimate there is within about 1 of exact.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

_P = 12
_M = 1 << _P
_ALPHA = 0.7213 / (1 + 1.079 / _M)
_MAX_RANK = 64 - _P + 1
_MASK64 = (1 << 64) - 1
SPARSE_MAX = 128  # members kept exactly (a set) before switching to registers


def index_rank(member: str) -> tuple[int, int]:
    """The register a member updates and the rank it offers (the same in every process)."""
    h = int.from_bytes(hashlib.blake2b(member.encode(), digest_size=8).digest(), "big")
    rest = (h << _P) & _MASK64
    return h >> (64 - _P), _MAX_RANK if rest == 0 else (64 - rest.bit_length()) + 1


class _Registers:
    """Dense registers with the estimator's running sums (zero registers, Σ 2^-register) and the
    last estimate (most adds change no register: the estimate is then reused)."""

    __slots__ = ("regs", "zeros", "inv", "_count")

    def __init__(self, regs: bytearray) -> None:
        self.regs = regs
        self.zeros = regs.count(0)
        self.inv = sum(regs.count(r) * math.ldexp(1.0, -r) for r in range(max(regs) + 1))
        self._count = -1  # not computed yet

    @classmethod
    def of(cls, members: set[str]) -> _Registers:
        regs = bytearray(_M)
        for member in members:
            index, rank = index_rank(member)
            if rank > regs[index]:
                regs[index] = rank
        return cls(regs)

    def update(self, index: int, rank: int) -> None:
        old = self.regs[index]
        if rank > old:
            self.regs[index] = rank
            if old == 0:
                self.zeros -= 1
            self.inv += math.ldexp(1.0, -rank) - math.ldexp(1.0, -old)
            self._count = -1

    def count(self) -> int:
        if self._count < 0:
            self._count = self._estimate()
        return self._count

    def _estimate(self) -> int:
        if self.zeros == _M:
            return 0
        raw = _ALPHA * _M * _M / self.inv
        if raw <= 2.5 * _M and self.zeros:
            return round(_M * math.log(_M / self.zeros))
        return round(raw)


class HyperLogLog:
    """One window's bucket: ``own`` members, and the ``view`` of this bucket ∪ the previous one."""

    __slots__ = ("own", "view")

    def __init__(self, previous: HyperLogLog | None = None) -> None:
        self.own: set[str] | bytearray = set()
        self.view: set[str] | _Registers
        if previous is None:
            self.view = set()
        elif isinstance(previous.own, set):
            self.view = set(previous.own)
        else:
            self.view = _Registers(bytearray(previous.own))

    def add(self, member: str, hasher: Callable[[str], tuple[int, int]] = index_rank) -> None:
        """Add ``member``; ``hasher`` may be a memoised :func:`index_rank` (members repeat)."""
        own, view = self.own, self.view
        if isinstance(own, set) and isinstance(view, set):  # the common case: no hashing
            own.add(member)
            view.add(member)
            if len(view) > SPARSE_MAX:
                dense = _Registers.of(view)
                if len(own) > SPARSE_MAX:  # own ⊆ view: equal sizes mean equal sets
                    self.own = bytearray(dense.regs) if len(own) == len(view) else _Registers.of(own).regs
                self.view = dense
            return
        index, rank = hasher(member)
        if isinstance(own, set):
            own.add(member)
            if len(own) > SPARSE_MAX:
                self.own = _Registers.of(own).regs
        elif rank > own[index]:
            own[index] = rank
        if isinstance(view, set):  # only while own is a set too (view ⊇ own); kept for the types
            view.add(member)
            if len(view) > SPARSE_MAX:
                self.view = _Registers.of(view)
        else:
            view.update(index, rank)

    def add_count(self, member: str, hasher: Callable[[str], tuple[int, int]] = index_rank) -> int:
        """``add(member)`` then ``count()``, in one call for the common (exact) case."""
        own, view = self.own, self.view
        if type(own) is set and type(view) is set and len(view) < SPARSE_MAX:
            own.add(member)  # view stays within SPARSE_MAX: no switch to registers can happen
            view.add(member)
            return len(view)
        self.add(member, hasher)
        return self.count()

    def count(self) -> int:
        """Distinct members added to this bucket or to the previous one."""
        view = self.view
        return len(view) if isinstance(view, set) else view.count()
