"""Circuit breaker and per-rule failure modes around the shared store.

When the store fails (error, deadline, breaker open) each rule's ``on_store_failure`` decides:
``open`` admits without counting, ``closed`` denies with 503, ``local`` counts in a per-replica
:class:`MemoryStore` holding ``limit / replicas``. Every fallback is counted in
:class:`StoreStats`. The breaker opens after ``failures`` consecutive errors, stays open for
``reset_after`` seconds (calls fail fast, no waiting on a dead store), then lets exactly one
probe through (half-open): success closes it, failure re-opens it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from gateway.store.base import Adjustment, Charge, ChargeResult, Clock, Receipt, Store, StoreError, new_named
from gateway.store.memory import MemoryStore

T = TypeVar("T")


class FailureMode(StrEnum):
    """What a store failure means for one rule's limits."""

    OPEN = "open"
    CLOSED = "closed"
    LOCAL = "local"


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failures: int = 5  # consecutive failures that open the breaker
    reset_after: float = 5.0  # seconds open before one probe is let through


@dataclass(slots=True)
class StoreStats:
    """Counters for metrics and readiness; plain ints, read them any time."""

    calls: int = 0
    errors: int = 0
    short_circuited: int = 0  # calls refused because the breaker was open
    breaker_opened: int = 0
    breaker_state: BreakerState = BreakerState.CLOSED
    fallbacks: dict[str, int] = field(default_factory=lambda: {m.value: 0 for m in FailureMode})
    settle_failures: int = 0  # reconcile/release that could not reach the store
    lease_renewals: int = 0  # renewal rounds the store answered
    renew_failures: int = 0  # renewal rounds that could not reach the store (leases left to their TTL)
    leases_lost: int = 0  # leases of requests still running found expired by a renewal

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy for readiness detail."""
        return {"calls": self.calls, "errors": self.errors, "short_circuited": self.short_circuited,
                "breaker_opened": self.breaker_opened, "breaker_state": self.breaker_state.value,
                "fallbacks": dict(self.fallbacks), "settle_failures": self.settle_failures,
                "lease_renewals": self.lease_renewals, "renew_failures": self.renew_failures,
                "leases_lost": self.leases_lost}


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe."""

    def __init__(self, settings: BreakerSettings, stats: StoreStats,
                 monotonic: Clock = time.monotonic) -> None:
        self._settings = settings
        self._stats = stats
        self._monotonic = monotonic
        self.failures = 0  # consecutive failures so far
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> BreakerState:
        return self._stats.breaker_state

    def allow(self) -> bool:
        """May a call go to the store now? In half-open state only the one probe may."""
        state = self._stats.breaker_state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN and self._monotonic() - self._opened_at >= self._settings.reset_after:
            self._stats.breaker_state = BreakerState.HALF_OPEN
            self._probing = True
            return True
        return False

    def success(self) -> None:
        if self.failures or self._probing or self._stats.breaker_state is not BreakerState.CLOSED:
            self.failures = 0
            self._probing = False
            self._stats.breaker_state = BreakerState.CLOSED

    def failure(self) -> None:
        self.failures += 1
        probing, self._probing = self._probing, False
        if probing or self.failures >= self._settings.failures:
            if self._stats.breaker_state is not BreakerState.OPEN:
                self._stats.breaker_opened += 1
            self._stats.breaker_state = BreakerState.OPEN
            self._opened_at = self._monotonic()

    def abandon(self) -> None:
        """The call was cancelled (client gone): no verdict on the store; allow a new probe."""
        if self._probing:
            self._probing = False
            self._stats.breaker_state = BreakerState.OPEN


class GuardedCharge(NamedTuple):
    """How a request's charges were handled: by the shared store, locally, or not at all.

    ``indices`` maps ``result`` entries back to the original charges (open-mode charges are
    dropped during a failure). ``unavailable`` is True when a closed-mode rule must deny (503).
    A tuple: one is built per request.
    """

    result: ChargeResult | None
    indices: tuple[int, ...]
    backend: str  # "store" | "local" | "none"
    fallback: FailureMode | None = None
    unavailable: bool = False



# ``tuple(range(n))`` for the usual small n, shared (GuardedCharge.indices on the happy path).
_RANGES: tuple[tuple[int, ...], ...] = tuple(tuple(range(k)) for k in range(17))


def _indices(n: int) -> tuple[int, ...]:
    return _RANGES[n] if n < len(_RANGES) else tuple(range(n))


# ``RedisStore.adjust_soon``: queue adjustments, report the outcome to a callback later.
_AdjustSoon = Callable[[Sequence[Adjustment], Callable[[StoreError | None], None]], bool]


class GuardedStore:
    """The shared store behind a breaker, with failure modes and a local fallback limiter."""

    def __init__(self, primary: Store, *, breaker: BreakerSettings = BreakerSettings(),
                 replicas: int = 1, clock: Clock = time.time,
                 monotonic: Clock = time.monotonic) -> None:
        self.primary = primary
        self.local = MemoryStore(clock)
        self.replicas = max(1, replicas)
        self.stats = StoreStats()
        self.breaker = CircuitBreaker(breaker, self.stats, monotonic)
        # Optional: a store that can queue reconciles (RedisStore on a single Redis).
        self._adjust_soon: _AdjustSoon | None = getattr(primary, "adjust_soon", None)
        self._on_close: list[Callable[[], Awaitable[None]]] = []

    async def call(self, fn: Callable[[Store], Awaitable[T]]) -> T:
        """Run ``fn(primary)`` through the breaker; raises ``StoreError`` when it cannot."""
        if not self.breaker.allow():
            self.stats.short_circuited += 1
            raise StoreError("store circuit breaker is open")
        self.stats.calls += 1
        try:
            result = await fn(self.primary)
        except StoreError:
            self.stats.errors += 1
            self.breaker.failure()
            raise
        except BaseException:
            self.breaker.abandon()
            raise
        self.breaker.success()
        return result

    async def charge(self, charges: Sequence[Charge], modes: Sequence[FailureMode]) -> GuardedCharge:
        """Charge the shared store; on failure apply each charge's failure mode."""
        stats = self.stats
        if stats.breaker_state is BreakerState.CLOSED:
            # Fast path, the same steps as call() without its closure and extra coroutine.
            stats.calls += 1
            try:
                result = await self.primary.charge(charges)
            except StoreError:
                stats.errors += 1
                self.breaker.failure()
            except BaseException:
                self.breaker.abandon()
                raise
            else:
                breaker = self.breaker
                if breaker.failures:  # closed with no failures counted: success() changes nothing
                    breaker.success()
                return new_named(GuardedCharge, (result, _indices(len(charges)), "store", None, False))
        else:
            try:
                result = await self.call(lambda s: s.charge(charges))
                return GuardedCharge(result, _indices(len(charges)), "store")
            except StoreError:
                pass  # handled below by the failure modes; counted by call()
        enforced = [m for c, m in zip(charges, modes, strict=True) if not c.shadow]
        if FailureMode.CLOSED in enforced:
            self.stats.fallbacks[FailureMode.CLOSED.value] += 1
            return GuardedCharge(None, (), "none", FailureMode.CLOSED, unavailable=True)
        local = tuple(i for i, m in enumerate(modes) if m is FailureMode.LOCAL)
        if not local:
            self.stats.fallbacks[FailureMode.OPEN.value] += 1
            return GuardedCharge(None, (), "none", FailureMode.OPEN)
        self.stats.fallbacks[FailureMode.LOCAL.value] += 1
        scaled = [self.local_charge(charges[i]) for i in local]
        return GuardedCharge(await self.local.charge(scaled), local, "local", FailureMode.LOCAL)

    def local_charge(self, charge: Charge) -> Charge:
        """This replica's share of a limit: limit / replicas (at least 1)."""
        if self.replicas == 1:
            return charge
        return replace(charge, limit=max(1, charge.limit // self.replicas),
                       burst=max(1, math.ceil(charge.burst / self.replicas)))

    async def adjust(self, adjustments: Sequence[Adjustment], backend: str) -> None:
        """Settle against the backend that charged; a failure only counts (TTLs clean up)."""
        if not adjustments:
            return
        if backend == "local":
            await self.local.adjust(adjustments)
            return
        try:
            if self.stats.breaker_state is BreakerState.CLOSED:  # fast path, as call() does it
                self.stats.calls += 1
                try:
                    await self.primary.adjust(adjustments)
                except StoreError:
                    self.stats.errors += 1
                    self.breaker.failure()
                    raise
                except BaseException:
                    self.breaker.abandon()
                    raise
                self.breaker.success()
            else:
                await self.call(lambda s: s.adjust(adjustments))
        except StoreError:
            self.stats.settle_failures += 1

    def adjust_soon(self, adjustments: Sequence[Adjustment], backend: str) -> bool:
        """Settle against the shared store without waiting, when the store can queue it
        (``RedisStore.adjust_soon``) and the breaker is closed; False means: await
        :meth:`adjust` instead. Counted exactly like :meth:`adjust` once the batch is answered."""
        if backend != "store" or self.stats.breaker_state is not BreakerState.CLOSED:
            return False
        queue = self._adjust_soon
        if queue is None or not queue(adjustments, self._settled):
            return False
        self.stats.calls += 1
        return True

    def _settled(self, error: StoreError | None) -> None:
        if error is None:
            if self.breaker.failures:  # (otherwise success() changes nothing)
                self.breaker.success()
        else:
            self.stats.errors += 1
            self.stats.settle_failures += 1
            self.breaker.failure()

    async def renew(self, leases: Sequence[Receipt], backend: str) -> tuple[bool, ...] | None:
        """Renew leases in the backend that charged them (see :meth:`Store.renew`); None when the
        shared store could not be reached: counted in ``renew_failures``, never raised (the
        leases then run out their TTL)."""
        if not leases:
            return ()
        if backend == "local":
            return await self.local.renew(leases)
        try:
            renewed = await self.call(lambda s: s.renew(leases))
        except StoreError:
            self.stats.renew_failures += 1
            return None
        self.stats.lease_renewals += 1
        return renewed

    def on_close(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Run ``stop`` first in :meth:`close` (a stage's background task, before the store goes)."""
        self._on_close.append(stop)

    async def close(self) -> None:
        stoppers, self._on_close = self._on_close, []
        for stop in stoppers:
            await stop()
        await self.primary.close()
        await self.local.close()
