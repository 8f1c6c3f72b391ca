"""Lease renewal of the quota stage (gateway.quota.renewal): streams longer than the lease TTL
keep their slot, a store outage lets leases expire, settled leases stay released. A real
MemoryStore on a fake clock, with hand-built contexts."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.quota.limits import LimitKind
from gateway.quota.settings import QuotaSettings
from gateway.quota.stage import QuotaStage
from gateway.store.base import Receipt, StoreError
from gateway.store.memory import MemoryStore
from tests.support.clock import FakeClock
from tests.support.quota_ctx import limit, make_ctx, quota


class RenewalSleep:
    """Injected sleep of the renewal loop: records each delay and moves the fake clock by it
    (``advance=True``), or never returns (rounds are then run by hand with ``renew_leases``)."""

    def __init__(self, clock: FakeClock, advance: bool) -> None:
        self.clock = clock
        self.advance = advance
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if not self.advance:
            await asyncio.Event().wait()
        self.clock.advance(delay)
        await asyncio.sleep(0)


def renewal_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "quota-lease-renewal" and not t.done()]


async def test_stream_longer_than_lease_ttl_keeps_its_slot(clock: FakeClock) -> None:
    sleep = RenewalSleep(clock, advance=True)
    stage = QuotaStage(MemoryStore(clock), QuotaSettings(lease_ttl=60), clock, sleep=sleep)
    action = quota("r1", limit("conc", LimitKind.CONCURRENCY, 1))
    stream, start = make_ctx(action), clock.now
    try:
        assert await stage(stream) is None  # the first lease starts the renewal task
        for _ in range(1000):
            if clock.now - start >= 5 * 60:  # the stream has run five lease TTLs
                break
            await asyncio.sleep(0)
        assert clock.now - start >= 5 * 60 and set(sleep.delays) == {20.0}
        second = await stage(make_ctx(action))
        assert second is not None and second.status == 429  # the slot is still held
        stats = stage.guard.stats
        assert stats.lease_renewals >= 14 and stats.renew_failures == stats.leases_lost == 0
        await stage.settle(stream)
        assert stage.leases == 0 and stage.pending == 0
        third = make_ctx(action)
        assert await stage(third) is None  # released at settle, not at the TTL
        await stage.settle(third)
    finally:
        await stage.guard.close()
    assert renewal_tasks() == []


class FlakyRenewStore(MemoryStore):
    """A MemoryStore whose renewals fail while ``down``."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.down = False

    async def renew(self, leases: Sequence[Receipt]) -> tuple[bool, ...]:
        if self.down:
            raise StoreError("store error: connection refused")
        return await super().renew(leases)


async def test_store_down_leases_expire_after_their_ttl(clock: FakeClock) -> None:
    """Renewal failures are counted, never raised; a lease not renewed for a TTL is gone (bounded
    over-admission) and a renewal after recovery finds it lost instead of reviving it."""
    store = FlakyRenewStore(clock)
    stage = QuotaStage(store, QuotaSettings(lease_ttl=60), clock, sleep=RenewalSleep(clock, advance=False))
    action = quota("r1", limit("conc", LimitKind.CONCURRENCY, 1))
    stream = make_ctx(action)
    try:
        assert await stage(stream) is None
        store.down = True
        clock.advance(30)
        await stage.renew_leases()  # does not raise
        stats = stage.guard.stats
        assert stats.renew_failures == 1 and stats.lease_renewals == 0 and stage.leases == 1
        clock.advance(31)  # a full TTL without renewal: the slot is free again
        extra = make_ctx(action)
        assert await stage(extra) is None
        store.down = False
        await stage.renew_leases()
        assert stats.leases_lost == 1 and stats.lease_renewals == 1
        assert stage.leases == 1  # only extra's lease is still renewed
        assert stats.snapshot()["leases_lost"] == 1
        for ctx in (stream, extra):
            await stage.settle(ctx)
        assert stage.leases == 0
    finally:
        await stage.guard.close()


async def test_shorter_lease_ttl_of_a_limit_sets_the_cadence(clock: FakeClock) -> None:
    sleep = RenewalSleep(clock, advance=False)
    stage = QuotaStage(MemoryStore(clock), QuotaSettings(lease_ttl=600), clock, sleep=sleep)
    long_ = quota("r1", limit("conc", LimitKind.CONCURRENCY, 5))
    short = quota("r2", limit("conc", LimitKind.CONCURRENCY, 5, lease_ttl=30))
    assert await stage(make_ctx(long_)) is None
    await asyncio.sleep(0)
    assert sleep.delays == [200.0] and len(renewal_tasks()) == 1
    assert await stage(make_ctx(short)) is None  # asleep for 200 s: restarted on 10 s
    await asyncio.sleep(0)
    assert sleep.delays == [200.0, 10.0] and len(renewal_tasks()) == 1
    assert stage.renewal_interval == 10.0
    await stage.close()  # guard.close(): the task is cancelled and not started again
    assert renewal_tasks() == []
    assert await stage(make_ctx(long_)) is None
    assert renewal_tasks() == []


async def test_a_renewal_in_flight_cannot_revive_a_settled_lease(clock: FakeClock) -> None:
    """Settle drops the request from the renewal set before releasing; a round already in flight
    finds the lease released and leaves it (not counted as lost)."""
    stage = QuotaStage(MemoryStore(clock), QuotaSettings(lease_ttl=60), clock,
                       sleep=RenewalSleep(clock, advance=False))
    action = quota("r1", limit("conc", LimitKind.CONCURRENCY, 1))
    stream = make_ctx(action)
    assert await stage(stream) is None
    entered = asyncio.Event()
    release = asyncio.Event()
    renew = stage.guard.renew

    async def slow_renew(leases: Sequence[Receipt], backend: str) -> tuple[bool, ...] | None:
        entered.set()
        await release.wait()
        return await renew(leases, backend)

    stage.guard.renew = slow_renew  # type: ignore[method-assign]
    round_ = asyncio.create_task(stage.renew_leases())
    async with asyncio.timeout(5):
        await entered.wait()
    await stage.settle(stream)
    release.set()
    await round_
    assert stage.guard.stats.leases_lost == 0 and stage.leases == 0
    assert await stage(make_ctx(action)) is None  # the slot stayed free
    await stage.close()
