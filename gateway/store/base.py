"""The ``Store`` seam: shared quota state (and challenge replay guards), with one documented contract.

Risk signals have their own seam, :class:`gateway.risk.sigstore.SignalStore`: a request's many
small operations in one round trip.

Every implementation (``MemoryStore``, ``RedisStore``) must pass ``tests/contract``. The
contract, in short:

* :meth:`Store.charge` checks and charges every limit of one request atomically and in one
  round trip (per Redis Cluster slot, see ``docs/quotas.md``). All or nothing: if one enforced
  charge is denied, none is applied. A *shadow* charge never blocks the others; when it would
  deny it is reported as denied and not applied, so its counter tracks what enforcement would
  have counted.
* Time comes from the store (Redis ``TIME`` inside the scripts), never from the caller, so
  replicas with skewed clocks agree. All times crossing the boundary are integer milliseconds
  (store side) or float seconds (results).
* :meth:`Store.adjust` changes what a :class:`Receipt` charged: reconcile a token reservation
  (``delta = actual - reserved``, applied to the window bucket it was charged in, dropped if that
  bucket already left the window), refund (``delta = -cost``) or release a lease (``delta < 0``).
* :meth:`Store.renew` extends concurrency leases still held (expiry > store now) to
  ``now + period_ms`` of each lease's own charge (an expiry is never shortened), so a request that
  outlives its lease TTL keeps its slot while its gateway renews it. A lease that already expired or
  was released is *not* resurrected: renewal never adds a slot, so it may race a release in either
  order, and after an outage longer than the TTL it finds the lease gone rather than reviving it.
* Keys expire on their own: nothing a crashed gateway leaves behind outlives its window/TTL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple, Protocol, runtime_checkable

# A source of wall-clock seconds (``time.time``); injected so tests never sleep.
Clock = Callable[[], float]

# A sliding window is split into this many buckets; usage stops counting between ``period`` and
# ``period * (1 + 1/WINDOW_BUCKETS)`` after it was charged (never earlier: no boundary burst).
WINDOW_BUCKETS = 30


class Algorithm(StrEnum):
    """How a limit counts: GCRA for request rates, sliding window for budgets, leases."""

    GCRA = "g"
    WINDOW = "w"
    LEASE = "l"


class StoreError(Exception):
    """The store could not answer (unreachable, deadline exceeded, breaker open)."""


@dataclass(frozen=True, slots=True)
class Charge:
    """One limit to check and charge for one request.

    ``key`` is the limit identity (rule id, limit name, key values); it must not contain the
    numbers so that state survives a reload and new numbers apply at once.
    ``period_ms`` is the GCRA period, the window length, or the lease TTL.
    """

    key: str
    algorithm: Algorithm
    limit: int
    period_ms: int
    cost: int
    burst: int = 1  # GCRA: requests admitted back to back from rest (>= 1)
    shadow: bool = False
    lease_id: str = ""  # LEASE: unique per request
    # Sub-bucket width of a sliding window (the precision bound): derived from period_ms once,
    # as charges are built once and reused, while the window algorithms read it several times.
    bucket_ms: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.limit <= 0 or self.period_ms <= 0 or self.cost < 0 or self.burst < 1:
            raise ValueError(f"invalid charge {self!r}")
        if self.algorithm is Algorithm.LEASE and not self.lease_id:
            raise ValueError("a lease charge needs a lease_id")
        object.__setattr__(self, "bucket_ms", max(1, self.period_ms // WINDOW_BUCKETS))


# The per-request results below are NamedTuples, not frozen dataclasses: as immutable, but built
# several times per request, and a frozen dataclass pays one object.__setattr__ per field.
# Hot paths build them with ``new_named(Class, (field, ...))``: tuple.__new__ in C, without the
# Python frame of the generated __new__ (no defaults: every field is given).
new_named = tuple.__new__


class LimitState(NamedTuple):
    """State of one limit after a charge attempt, enough to build rate-limit headers.

    ``reset`` is seconds until the limit is back to full; ``retry_after`` is 0 when allowed,
    else seconds until this same charge would fit (``math.inf`` if it never can: cost > limit).
    """

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float


class Receipt(NamedTuple):
    """What an applied charge left behind, needed to reconcile, refund or release it."""

    charge: Charge
    bucket_ms: int = 0  # WINDOW: start (store time, ms) of the bucket that was charged
    applied: bool = True  # False for a shadow charge that would have denied


class ChargeResult(NamedTuple):
    """Outcome of :meth:`Store.charge`; ``states``/``receipts`` follow the charges' order."""

    allowed: bool
    now: float  # store time, seconds since the epoch
    states: tuple[LimitState, ...]
    receipts: tuple[Receipt, ...]


class Adjustment(NamedTuple):
    """Add ``delta`` to what ``receipt`` charged (negative refunds; leases release on < 0)."""

    receipt: Receipt
    delta: int


@runtime_checkable
class Store(Protocol):
    """Shared state for quotas and replay guards. Implementations must be safe under asyncio
    concurrency and (for shared backends) across processes; every method may raise
    :class:`StoreError` and nothing else for availability problems."""

    async def charge(self, charges: Sequence[Charge]) -> ChargeResult:
        """Atomically check all ``charges`` and apply them all, or none if one enforced
        charge is denied."""
        ...

    async def adjust(self, adjustments: Sequence[Adjustment]) -> None:
        """Reconcile, refund or release earlier charges (idempotence is not promised)."""
        ...

    async def renew(self, leases: Sequence[Receipt]) -> tuple[bool, ...]:
        """Extend each live lease (receipt of an applied ``LEASE`` charge) to store now + its
        charge's ``period_ms``, in one round trip (per Cluster slot). True where the lease was
        still held and was extended; False where it had expired or been released (left alone).
        Receipts of other algorithms, or not applied, are answered False."""
        ...

    async def now(self) -> float:
        """The store's clock, seconds since the epoch."""
        ...

    async def set_if_absent(self, key: str, ttl: float) -> bool:
        """Set ``key`` for ``ttl`` seconds if absent; True if this call set it (replay guard)."""
        ...

    async def ping(self) -> bool:
        """True if the store answers."""
        ...

    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


def state_from_ms(allowed: bool, limit: int, remaining: int, reset_ms: int, retry_ms: int) -> LimitState:
    """Build a :class:`LimitState` from the integer milliseconds both backends compute."""
    retry = math.inf if retry_ms < 0 else retry_ms / 1000.0
    return LimitState(allowed, limit, max(0, remaining), max(0, reset_ms) / 1000.0,
                      0.0 if allowed else retry)
