"""``MemoryStore``: the embedded store for a single worker.

Atomicity comes from asyncio itself: no method awaits between reading and writing state, so a
charge is one indivisible step on the event loop. Memory stays bounded because every key has an
expiry (window end, TAT, lease TTL, caller TTL) and a heap with one entry per key sweeps expired
keys on every call.
"""

from __future__ import annotations

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
    new_named,
    state_from_ms,
)


@dataclass(slots=True)
class _Slot:
    value: Any
    expires: int  # ms, store time
    queued: int  # expiry the heap entry for this key was pushed with


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
                v = alg.window_check(value or alg.Window(), now, c)
            else:
                v = alg.lease_check(value or alg.Leases(), now, c)
            verdicts.append(v)
            if not v.ok and not c.shadow:
                allowed = False
        receipts: list[Receipt] = []
        states: list[LimitState] = []
        for c, v in zip(charges, verdicts, strict=True):
            applied = allowed and v.ok
            receipts.append(new_named(Receipt, (c, v.bucket_ms, applied)))
            if applied:
                if c.algorithm is Algorithm.GCRA:  # the usual limit: _apply's first branch, inlined
                    self._put(c.key, v.new_tat, math.ceil(v.new_tat) + 1)
                else:
                    self._apply(c, v, now)
                reset = max(0, v.reset_ms) / 1000.0
                states.append(new_named(LimitState, (True, c.limit, max(0, v.remaining), reset, 0.0)))
            else:
                states.append(state_from_ms(v.ok, c.limit, v.idle_remaining, v.idle_reset_ms, v.retry_ms))
        return new_named(ChargeResult, (allowed, now / 1000.0, tuple(states), tuple(receipts)))

    def _apply(self, c: Charge, v: alg.Verdict, now: int) -> None:
        if c.algorithm is Algorithm.GCRA:
            self._put(c.key, v.new_tat, math.ceil(v.new_tat) + 1)
        elif c.algorithm is Algorithm.WINDOW:
            if c.cost == 0:
                return
            window: alg.Window = self._get(c.key, now) or alg.Window()
            window.add(v.bucket_ms, c.cost)  # (window_check dropped the dead buckets)
            self._put(c.key, window, window.expires(c))
        else:
            leases: alg.Leases = self._get(c.key, now) or alg.Leases()
            leases.hold(c.lease_id, now + c.period_ms)  # (lease_check dropped the expired ones)
            self._put(c.key, leases, leases.latest + 1)

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
                window: alg.Window = self._get(c.key, now) or alg.Window()
                if alg.window_adjust(window, now, c, r.bucket_ms, adj.delta):
                    if window.buckets:
                        self._put(c.key, window, window.expires(c))
                    else:
                        self._data.pop(c.key, None)
            elif adj.delta < 0:
                held: alg.Leases | None = self._get(c.key, now)
                if held is not None:
                    held.release(c.lease_id)

    async def renew(self, leases: Sequence[Receipt]) -> tuple[bool, ...]:
        now = self._now_ms()
        self._sweep(now)
        out: list[bool] = []
        for r in leases:
            c = r.charge
            held: alg.Leases | None = self._get(c.key, now) if r.applied else None
            if held is None or c.algorithm is not Algorithm.LEASE:
                out.append(False)
                continue
            renewed = alg.lease_renew(held, now, c.lease_id, c.period_ms)
            if renewed:  # the key lives until its latest lease ends, as after a charge
                self._put(c.key, held, held.latest + 1)
            out.append(renewed)
        return tuple(out)

    async def now(self) -> float:
        return self._clock()

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
