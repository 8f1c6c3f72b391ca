"""Renewal of concurrency leases while their requests run.

Leases have a TTL so that a crashed gateway cannot leak slots, but a stream may outlive it. The
renewer keeps the leases of the requests in flight and one background task extends them all in
one store call per backend every ``lease_ttl / 3``. ``Store.renew`` only extends leases still
held, so a round racing a settle cannot bring a released lease back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gateway.store.base import Receipt
from gateway.store.breaker import GuardedStore

log = logging.getLogger(__name__)

RENEWALS_PER_TTL = 3


class LeaseRenewer:
    """The leases of the requests in flight, keyed by request, and the task renewing them."""

    def __init__(self, guard: GuardedStore, lease_ttl: float,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._guard = guard
        self._leases: dict[int, tuple[tuple[Receipt, ...], str]] = {}
        self._sleep = sleep  # injected: tests drive the renewal loop without waiting
        self._basis = lease_ttl  # shortest lease TTL seen (s): cadence = this / 3
        self._task: asyncio.Task[None] | None = None
        self._renewing = False
        self._closed = False

    @property
    def interval(self) -> float:
        """Seconds between renewal rounds."""
        return self._basis / RENEWALS_PER_TTL

    @property
    def tracked(self) -> int:
        """Requests in flight holding leases."""
        return len(self._leases)

    def track(self, key: int, leases: tuple[Receipt, ...], backend: str) -> None:
        self._leases[key] = (leases, backend)
        shortest = min(r.charge.period_ms for r in leases) / 1000.0
        task = self._task
        if shortest < self._basis:  # a limit with its own, shorter lease_ttl
            self._basis = shortest
            if task is not None and not task.done() and not self._renewing:
                task.cancel()  # asleep on the longer cadence: start over on the new one
                task = None
            # (a round in progress goes on; its loop sleeps the new interval afterwards)
        if (task is None or task.done()) and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="quota-lease-renewal")

    def forget(self, key: int) -> None:
        """The request settles: none of its leases is renewed again."""
        self._leases.pop(key, None)

    async def _loop(self) -> None:
        while True:
            await self._sleep(self.interval)
            try:
                await self.renew()
            except Exception:  # a bug must not stop renewals; store errors never get here
                self._guard.stats.renew_failures += 1
                log.exception("lease renewal round failed")

    async def renew(self) -> None:
        """One round: every lease of every request in flight, one store call per backend. A store
        failure is counted (``renew_failures``) and the leases run out their TTL; a lease the store
        reports gone while its request still runs (expired during an outage) is counted in
        ``leases_lost`` and no longer renewed."""
        if not self._leases:
            return
        batches: dict[str, list[tuple[int, Receipt]]] = {}
        for key, (leases, backend) in self._leases.items():
            batches.setdefault(backend, []).extend((key, r) for r in leases)
        self._renewing = True
        try:
            for backend, batch in batches.items():
                renewed = await self._guard.renew([r for _, r in batch], backend)
                if renewed is None:
                    continue
                for (key, receipt), ok in zip(batch, renewed, strict=True):
                    if not ok:
                        self._lost(key, receipt)
        finally:
            self._renewing = False

    def _lost(self, key: int, receipt: Receipt) -> None:
        entry = self._leases.get(key)
        if entry is None or not any(r is receipt for r in entry[0]):
            return  # settled meanwhile: released, not lost
        self._guard.stats.leases_lost += 1
        rest = tuple(r for r in entry[0] if r is not receipt)
        if rest:
            self._leases[key] = (rest, entry[1])
        else:
            del self._leases[key]

    async def stop(self) -> None:
        """Cancel the task for good (run by ``guard.close()``); open leases then expire by TTL."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
