"""The three limit algorithms on integer milliseconds: functions over the state one key holds
(a GCRA TAT, a :class:`Window` of buckets, a :class:`Leases` book).

``MemoryStore`` runs these directly; ``lua/charge.lua`` and ``lua/adjust.lua`` are ports (the
same decisions and numbers, on Redis data types), and the contract suite checks that both agree.
Keep them in step when changing either.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

from gateway.store.base import Charge, new_named

# Float slack (ms) for GCRA comparisons: TATs are sums of fractional emission intervals and
# are stored with 3 decimals in Redis, so exact comparisons would flip on rounding noise.
EPS = 0.01
# Retry hint for a full concurrency limit: lease ends are unknown in advance (streams end
# when they end), so suggest a short retry rather than the worst-case TTL.
LEASE_RETRY_MS = 1000


class Verdict(NamedTuple):
    """Result of checking one charge (before anything is written); a tuple: one per limit per
    request."""

    ok: bool
    remaining: int
    reset_ms: int
    retry_ms: int  # 0 if ok, -1 if the charge can never fit
    bucket_ms: int = 0  # WINDOW: bucket the charge goes to
    new_tat: float = 0.0  # GCRA: theoretical arrival time after the charge
    # State if the charge is NOT applied (denied request, shadow would-deny): headers must
    # show what is really left, not what would have been left after a charge that never was.
    idle_remaining: int = 0
    idle_reset_ms: int = 0

    def shown(self, applied: bool) -> tuple[int, int]:
        """(remaining, reset_ms) to report, depending on whether the charge was applied."""
        return (self.remaining, self.reset_ms) if applied else (self.idle_remaining, self.idle_reset_ms)


# Admitted verdicts, built on every charge of the memory store, use ``new_named`` (every field
# given, no Python ``__new__`` frame); the rarer denials keep the keyword form.


def gcra_check(tat: float | None, now: int, c: Charge) -> Verdict:
    """GCRA: emission interval T = period/limit, tolerance tau = T * burst."""
    interval = c.period_ms / c.limit
    tau = interval * c.burst
    start = tat if tat is not None and tat > now else now
    new_tat = start + c.cost * interval
    diff = new_tat - now
    slack = EPS / interval
    idle = math.floor((tau - (start - now)) / interval + slack)
    idle_reset = math.ceil(start - now)
    if diff <= tau + EPS:
        remaining = math.floor((tau - diff) / interval + slack)
        return new_named(Verdict, (True, remaining if remaining > 0 else 0, math.ceil(diff), 0, 0,
                                  round(new_tat, 3), idle, idle_reset))
    retry = math.ceil(diff - tau) if c.cost * interval <= tau + EPS else -1
    return Verdict(False, max(0, idle), idle_reset, retry, idle_remaining=idle, idle_reset_ms=idle_reset)


def gcra_adjust(tat: float | None, now: int, c: Charge, delta: int) -> float | None:
    """Move a TAT by ``delta`` emission intervals; None means the key can be dropped."""
    if tat is None:
        return None
    new_tat = round(tat + delta * (c.period_ms / c.limit), 3)
    return new_tat if new_tat > now else None


class Window:
    """A sliding window's sub-buckets (start ms → units) with their running total.

    A charge costs the same however many buckets the window holds: the total is kept as buckets
    change, and the buckets are scanned only when the oldest one leaves the window (once per
    bucket width), as in ``charge.lua`` (whose hash keeps the total, the oldest and the newest
    start in fields ``-1``, ``-2`` and ``-3``).
    """

    __slots__ = ("buckets", "newest", "oldest", "used")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.used = 0
        self.oldest: int | None = None  # a lower bound on the buckets' starts
        self.newest: int | None = None

    def slide(self, now: int, c: Charge) -> None:
        """Drop the buckets whose end is a full period old (they no longer count)."""
        horizon = now - c.period_ms - c.bucket_ms  # a bucket starting at or before it is dead
        if self.oldest is None or self.oldest > horizon:
            return
        buckets = self.buckets
        for start in [s for s in buckets if s <= horizon]:
            self.used -= buckets.pop(start)
        self.oldest = min(buckets) if buckets else None
        if not buckets:
            self.newest = None

    def add(self, bucket: int, units: int) -> None:
        """Change one bucket by ``units`` (never below zero; a bucket holding nothing goes)."""
        buckets = self.buckets
        held = buckets.get(bucket, 0)
        value = held + units if held + units > 0 else 0
        self.used += value - held
        if value:
            buckets[bucket] = value
            if self.oldest is None or bucket < self.oldest:
                self.oldest = bucket
            if self.newest is None or bucket > self.newest:
                self.newest = bucket
        elif held:
            del buckets[bucket]
            if bucket == self.newest:
                self.newest = max(buckets) if buckets else None

    def expires(self, c: Charge) -> int:
        """When the key can go (store ms): its newest bucket has left the window."""
        return (self.newest or 0) + c.bucket_ms + c.period_ms + 1

    def live(self, now: int, c: Charge) -> list[tuple[int, int]]:
        """Buckets still inside the window, oldest first: a bucket counts until its *end* is a
        full period old, so usage is held between period and period + bucket width."""
        horizon = now - c.period_ms
        gran = c.bucket_ms
        return sorted((s, v) for s, v in self.buckets.items() if s + gran > horizon)


def window_check(window: Window, now: int, c: Charge) -> Verdict:
    """Sliding window of sub-buckets; an exhausted budget (used >= limit) admits nothing.
    Drops the buckets that left the window (which changes nothing that counts)."""
    gran = c.bucket_ms
    cur = now - now % gran
    window.slide(now, c)
    used = window.used
    newest = window.newest
    idle_reset = newest + gran + c.period_ms - now if newest is not None else 0
    if used < c.limit and used + c.cost <= c.limit:
        reset = cur + gran + c.period_ms - now if c.cost > 0 else idle_reset
        return new_named(Verdict, (True, c.limit - used - c.cost, reset, 0, cur, 0.0, c.limit - used,
                                  idle_reset))
    reset = idle_reset
    retry = -1
    if c.cost <= c.limit:  # when would it fit: free the live buckets oldest first
        freed = 0
        for start, value in window.live(now, c):
            freed += value
            left = used - freed
            if left < c.limit and left + c.cost <= c.limit:
                retry = start + gran + c.period_ms - now
                break
    return Verdict(False, max(0, c.limit - used), reset, retry, bucket_ms=cur,
                   idle_remaining=c.limit - used, idle_reset_ms=reset)


def window_adjust(window: Window, now: int, c: Charge, bucket: int, delta: int) -> bool:
    """Apply ``delta`` to the bucket a reservation was charged in; False if it already left
    the window (then the adjustment no longer matters and is dropped)."""
    if bucket + c.bucket_ms <= now - c.period_ms:
        return False
    window.slide(now, c)
    window.add(bucket, delta)
    return True


class Leases:
    """The leases held on one concurrency limit: lease id → expiry (ms), with a heap of expiries
    so that counting the live ones costs no scan: expired leases are dropped from the heap's top
    as time passes (``ZCOUNT`` does the same for ``charge.lua`` in a sorted set). A limit of
    1,000 concurrent streams would otherwise sort 1,000 expiries for every request.

    A released or renewed lease leaves its old heap entry behind, skipped when it reaches the top;
    the heap is rebuilt when such entries outnumber the live ones.
    """

    __slots__ = ("expiry", "heap", "latest")

    def __init__(self) -> None:
        self.expiry: dict[str, int] = {}
        self.heap: list[tuple[int, str]] = []
        self.latest = 0  # the latest expiry ever set (the key lives until then)

    def live(self, now: int) -> int:
        """Leases held and not expired at ``now`` (expired ones are dropped)."""
        heap, expiry = self.heap, self.expiry
        while heap and heap[0][0] <= now:
            expires, lease_id = heapq.heappop(heap)
            if expiry.get(lease_id) == expires:
                del expiry[lease_id]
        return len(expiry)

    def earliest(self, now: int) -> int | None:
        """When the first live lease expires (None: none is held)."""
        self.live(now)
        heap, expiry = self.heap, self.expiry
        while heap and expiry.get(heap[0][1]) != heap[0][0]:  # released or renewed since
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def hold(self, lease_id: str, expires: int) -> None:
        self.expiry[lease_id] = expires
        heap = self.heap
        heapq.heappush(heap, (expires, lease_id))
        if expires > self.latest:
            self.latest = expires
        if len(heap) > 2 * len(self.expiry) + 64:
            self.heap = [(e, i) for i, e in self.expiry.items()]
            heapq.heapify(self.heap)

    def release(self, lease_id: str) -> None:
        self.expiry.pop(lease_id, None)


def lease_check(leases: Leases, now: int, c: Charge) -> Verdict:
    """Concurrency: live leases (expiry > now) against the limit; cost is the slots wanted."""
    used = leases.live(now)
    if used + c.cost <= c.limit:
        return Verdict(True, c.limit - used - c.cost, 0, 0, idle_remaining=c.limit - used)
    if c.cost > c.limit:
        retry = -1
    else:  # used >= 1 here: some lease is live
        first = leases.earliest(now)
        retry = min(LEASE_RETRY_MS, (first if first is not None else now) - now)
    return Verdict(False, max(0, c.limit - used), 0, retry, idle_remaining=c.limit - used)


def lease_renew(leases: Leases, now: int, lease_id: str, ttl_ms: int) -> bool:
    """Extend one lease to ``now + ttl_ms`` (never shorter) if it is still held; an expired or
    released lease stays gone. True if it was extended."""
    expires = leases.expiry.get(lease_id)
    if expires is None or expires <= now:
        return False
    if now + ttl_ms > expires:
        leases.hold(lease_id, now + ttl_ms)
    return True
