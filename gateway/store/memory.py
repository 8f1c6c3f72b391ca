"""``MemoryStore``: the embedded store for a single worker.

Atomicity comes from asyncio itself: no method awaits between reading and writing state, so a
charge is one indivisible step on the event loop. Memory stays bounded because every key has an
expiry (window end, TAT, lease TTL, caller TTL) and a heap with one entry per key sweeps expired
keys on every call.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.store import algorithms as alg
from gateway.store.base import (
    Adjustment,
    Algorithm,
    Charge,
    ChargeResult,
    Clock,
    LimitState,
    Receipt,
    StoreError,
    state_from_ms,
)

_HLL_P = 12  # 4096 registers: 4 KiB per key, ~1.6 % standard error


@dataclass(slots=True)
class _Slot:
    value: Any
    expires: int  # ms, store time
    queued: int  # expiry the heap entry for this key was pushed with


class _HyperLogLog:
    """A small dense HyperLogLog; exact enough for risk signals, bounded in memory."""

    __slots__ = ("registers",)

    def __init__(self) -> None:
        self.registers = bytearray(1 << _HLL_P)

    def add(self, member: str) -> None:
        h = int.from_bytes(hashlib.blake2b(member.encode(), digest_size=8).digest(), "big")
        index = h >> (64 - _HLL_P)
        rest = h & ((1 << (64 - _HLL_P)) - 1)
        rank = (64 - _HLL_P) - rest.bit_length() + 1
        if rank > self.registers[index]:
            self.registers[index] = rank

    def count(self) -> int:
        m = len(self.registers)
        zeros = self.registers.count(0)
        estimate = (0.7213 / (1 + 1.079 / m)) * m * m / sum(2.0 ** -r for r in self.registers)
        if estimate <= 2.5 * m and zeros:
            estimate = m * math.log(m / zeros)  # linear counting for small sets
        return round(estimate)


class MemoryStore:
    """In-process :class:`~gateway.store.base.Store`; ``clock`` returns wall seconds."""

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._data: dict[str, _Slot] = {}
        self._heap: list[tuple[int, str]] = []

    # ---- housekeeping -------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _sweep(self, now: int) -> None:
        while self._heap and self._heap[0][0] <= now:
            queued, key = heapq.heappop(self._heap)
            slot = self._data.get(key)
            if slot is None or queued != slot.queued:
                continue  # stale entry: the key was deleted or re-queued since
            if slot.expires <= now:
                del self._data[key]
            else:  # TTL was extended since it was queued: queue it again at its new expiry
                slot.queued = slot.expires
                heapq.heappush(self._heap, (slot.expires, key))

    def _get(self, key: str, now: int) -> Any:
        slot = self._data.get(key)
        if slot is None or slot.expires <= now:
            return None
        return slot.value

    def _put(self, key: str, value: Any, expires: int) -> None:
        slot = self._data.get(key)
        if slot is None:
            self._data[key] = _Slot(value, expires, expires)
            heapq.heappush(self._heap, (expires, key))
            return
        slot.value = value
        slot.expires = expires
        if expires < slot.queued:  # only an earlier expiry needs a new heap entry
            slot.queued = expires
            heapq.heappush(self._heap, (expires, key))

    def key_count(self) -> int:
        """Live keys (for tests and memory metrics)."""
        self._sweep(self._now_ms())
        return len(self._data)

    # ---- quota --------------------------------------------------------------------------
    async def charge(self, charges: Sequence[Charge]) -> ChargeResult:
        now = self._now_ms()
        if self._heap and self._heap[0][0] <= now:
            self._sweep(now)
        data = self._data
        verdicts: list[alg.Verdict] = []
        allowed = True
        for c in charges:
            slot = data.get(c.key)  # inline _get: one lookup per limit per request
            value = slot.value if slot is not None and slot.expires > now else None
            algorithm = c.algorithm
            if algorithm is Algorithm.GCRA:
                v = alg.gcra_check(value, now, c)
            elif algorithm is Algorithm.WINDOW:
                v = alg.window_check(value or {}, now, c)
            else:
                v = alg.lease_check(value or {}, now, c)
            verdicts.append(v)
            if not v.ok and not c.shadow:
                allowed = False
        receipts: list[Receipt] = []
        states: list[LimitState] = []
        for c, v in zip(charges, verdicts, strict=True):
            applied = allowed and v.ok
            receipts.append(Receipt(c, v.bucket_ms, applied))
            if applied:
                if c.algorithm is Algorithm.GCRA:  # the usual limit: _apply's first branch, inlined
                    self._put(c.key, v.new_tat, math.ceil(v.new_tat) + 1)
                else:
                    self._apply(c, v, now)
                reset = max(0, v.reset_ms) / 1000.0
                states.append(LimitState(True, c.limit, max(0, v.remaining), reset, 0.0))
            else:
                states.append(state_from_ms(v.ok, c.limit, v.idle_remaining, v.idle_reset_ms, v.retry_ms))
        return ChargeResult(allowed, now / 1000.0, tuple(states), tuple(receipts))

    def _apply(self, c: Charge, v: alg.Verdict, now: int) -> None:
        if c.algorithm is Algorithm.GCRA:
            self._put(c.key, v.new_tat, math.ceil(v.new_tat) + 1)
        elif c.algorithm is Algorithm.WINDOW:
            if c.cost == 0:
                return
            gran = c.bucket_ms
            buckets: dict[int, int] | None = self._get(c.key, now)
            if buckets is None:
                buckets = {}
            else:  # the dict is this store's own: drop buckets that left the window in place
                horizon = now - c.period_ms - gran  # a bucket starting at or before it is dead
                if buckets and min(buckets) <= horizon:  # (rare: scan only when the oldest is)
                    for s in [s for s in buckets if s <= horizon]:
                        del buckets[s]
            buckets[v.bucket_ms] = buckets.get(v.bucket_ms, 0) + c.cost
            self._put(c.key, buckets, max(buckets) + gran + c.period_ms + 1)
        else:
            leases: dict[str, int] = {
                m: e for m, e in (self._get(c.key, now) or {}).items() if e > now
            }
            leases[c.lease_id] = now + c.period_ms
            self._put(c.key, leases, max(leases.values()) + 1)

    async def adjust(self, adjustments: Sequence[Adjustment]) -> None:
        self._adjust(adjustments)

    def adjust_soon(self, adjustments: Sequence[Adjustment],
                    done: Callable[[StoreError | None], None]) -> bool:
        """Applied at once (nothing to wait for in memory), so settling needs no await."""
        self._adjust(adjustments)
        done(None)
        return True

    def _adjust(self, adjustments: Sequence[Adjustment]) -> None:
        now = self._now_ms()
        self._sweep(now)
        for adj in adjustments:
            r, c = adj.receipt, adj.receipt.charge
            if not r.applied or adj.delta == 0:
                continue
            if c.algorithm is Algorithm.GCRA:
                tat = alg.gcra_adjust(self._get(c.key, now), now, c, adj.delta)
                if tat is None:
                    self._data.pop(c.key, None)
                else:
                    self._put(c.key, tat, math.ceil(tat) + 1)
            elif c.algorithm is Algorithm.WINDOW:
                live: dict[int, int] | None = self._get(c.key, now)
                buckets = {} if live is None else live  # the store's own dict: adjusted in place
                if alg.window_adjust(buckets, now, c, r.bucket_ms, adj.delta):
                    if buckets:
                        self._put(c.key, buckets, max(buckets) + c.bucket_ms + c.period_ms + 1)
                    else:
                        self._data.pop(c.key, None)
            elif adj.delta < 0:
                leases = self._get(c.key, now)
                if leases is not None:
                    leases.pop(c.lease_id, None)

    async def renew(self, leases: Sequence[Receipt]) -> tuple[bool, ...]:
        now = self._now_ms()
        self._sweep(now)
        out: list[bool] = []
        for r in leases:
            c = r.charge
            held: dict[str, int] | None = self._get(c.key, now) if r.applied else None
            if held is None or c.algorithm is not Algorithm.LEASE:
                out.append(False)
                continue
            renewed = alg.lease_renew(held, now, c.lease_id, c.period_ms)
            if renewed:  # the key lives until its latest lease ends, as after a charge
                self._put(c.key, held, max(held.values()) + 1)
            out.append(renewed)
        return tuple(out)

    async def now(self) -> float:
        return self._clock()

    # ---- risk primitives ----------------------------------------------------------------
    async def hll_add(self, key: str, members: Sequence[str], ttl: float) -> int:
        now = self._now_ms()
        self._sweep(now)
        hll = self._get(key, now) or _HyperLogLog()
        for member in members:
            hll.add(member)
        self._put(key, hll, now + math.ceil(ttl * 1000))
        return hll.count()

    async def hll_count(self, key: str) -> int:
        hll = self._get(key, self._now_ms())
        return hll.count() if hll is not None else 0

    async def window_add(self, key: str, amount: int, window: float) -> int:
        now = self._now_ms()
        self._sweep(now)
        c = Charge(key, Algorithm.WINDOW, 1, max(1, math.ceil(window * 1000)), 0)
        buckets = {s: n for s, n in alg.window_live(self._get(key, now) or {}, now, c)}
        cur = now - now % c.bucket_ms
        if amount:
            buckets[cur] = buckets.get(cur, 0) + amount
        if buckets:
            self._put(key, buckets, max(buckets) + c.bucket_ms + c.period_ms + 1)
        return sum(buckets.values())

    async def decay_add(self, key: str, amount: float, half_life: float) -> float:
        now = self._now_ms()
        self._sweep(now)
        hl_ms = max(1.0, half_life * 1000)
        value, at = self._get(key, now) or (0.0, now)
        value = value * 2.0 ** (-(now - at) / hl_ms) + amount
        # After 20 half-lives a value has decayed below a millionth: drop the key.
        self._put(key, (value, now), now + math.ceil(20 * hl_ms))
        return float(value)

    async def set_if_absent(self, key: str, ttl: float) -> bool:
        now = self._now_ms()
        self._sweep(now)
        if self._get(key, now) is not None:
            return False
        self._put(key, True, now + max(1, math.ceil(ttl * 1000)))
        return True

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._data.clear()
        self._heap.clear()
