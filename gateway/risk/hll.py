"""A small HyperLogLog for the in-memory signal store (Redis has its own, ``PFADD``/``PFCOUNT``).

p = 12: 4096 one-byte registers, standard error about 1.6%, with the usual linear-counting
correction for small cardinalities. Members are hashed with blake2b so the estimate is the same
in every process (Python's ``hash`` is salted per process).

The signal store counts "this window and the previous one" together. Merging two register arrays
per request would cost ~200 µs in Python, so each bucket keeps a second, *view* array started as
a copy of the previous bucket's registers and updated alongside its own, with the estimator's
running sums maintained incrementally: ``add`` and ``count`` are O(1); starting a bucket costs
one 4 KiB copy and ~50 ``bytearray.count`` calls, once per window. Memory: 8 KiB per key.
"""

from __future__ import annotations

import hashlib
import math

_P = 12
_M = 1 << _P
_ALPHA = 0.7213 / (1 + 1.079 / _M)
_MAX_RANK = 64 - _P + 1


class HyperLogLog:
    __slots__ = ("own", "view", "_zeros", "_inv")

    def __init__(self, previous: HyperLogLog | None = None) -> None:
        self.own = bytearray(_M)
        if previous is None:  # the common case for per-ip/per-template keys: no scan needed
            self.view = bytearray(_M)
            self._zeros, self._inv = _M, float(_M)
            return
        self.view = bytearray(previous.own)
        self._zeros = self.view.count(0)
        self._inv = sum(self.view.count(r) * math.ldexp(1.0, -r) for r in range(max(self.view) + 1))

    def add(self, member: str) -> None:
        h = int.from_bytes(hashlib.blake2b(member.encode(), digest_size=8).digest(), "big")
        index = h >> (64 - _P)
        rest = (h << _P) & ((1 << 64) - 1)
        rank = _MAX_RANK if rest == 0 else (64 - rest.bit_length()) + 1
        if rank > self.own[index]:
            self.own[index] = rank
        old = self.view[index]
        if rank > old:
            self.view[index] = rank
            if old == 0:
                self._zeros -= 1
            self._inv += math.ldexp(1.0, -rank) - math.ldexp(1.0, -old)

    def count(self) -> int:
        """Distinct members added to this bucket or to the previous one."""
        if self._zeros == _M:
            return 0
        raw = _ALPHA * _M * _M / self._inv
        if raw <= 2.5 * _M and self._zeros:
            return round(_M * math.log(_M / self._zeros))
        return round(raw)
