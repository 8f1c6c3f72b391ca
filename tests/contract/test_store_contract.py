"""One contract, every Store: MemoryStore, a real Redis and a real 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import math
import random
import time

from gateway.store.base import Adjustment, Algorithm, Charge, ChargeResult, Receipt, Store
from gateway.store.redis import RedisStore
from tests.contract.conftest import StoreHarness


def gcra(key: str, limit: int, period: float, burst: int = 1, shadow: bool = False) -> Charge:
    return Charge(key, Algorithm.GCRA, limit, int(period * 1000), 1, burst, shadow)


def window(key: str, limit: int, period: float, cost: int, shadow: bool = False) -> Charge:
    return Charge(key, Algorithm.WINDOW, limit, int(period * 1000), cost, shadow=shadow)


def lease(key: str, limit: int, ttl: float, lease_id: str) -> Charge:
    return Charge(key, Algorithm.LEASE, limit, int(ttl * 1000), 1, lease_id=lease_id)


async def remaining(store: Store, key: str, limit: int, period: float) -> int:
    """Peek a window's remaining budget with a zero-cost charge."""
    return (await store.charge([window(key, limit, period, 0)])).states[0].remaining


async def test_gcra_rate_and_burst(harness: StoreHarness) -> None:
    store = harness.store
    results = [await store.charge([gcra("g", 10, 1.0, burst=3)]) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, True]
    assert [r.states[0].remaining for r in results] == [2, 1, 0]
    assert 0.25 <= results[2].states[0].reset <= 0.3
    denied = await store.charge([gcra("g", 10, 1.0, burst=3)])
    assert not denied.allowed and not denied.states[0].allowed
    assert 0.05 <= denied.states[0].retry_after <= 0.1  # one emission interval (100 ms)
    await harness.advance(0.11)
    assert (await store.charge([gcra("g", 10, 1.0, burst=3)])).allowed
    assert not (await store.charge([gcra("g", 10, 1.0, burst=3)])).allowed


async def test_window_has_no_boundary_burst(harness: StoreHarness) -> None:
    """Usage stays counted for a full window after it was charged, wherever boundaries fall:
    no interval of one window length ever sees more than the limit."""
    store, period, limit, step = harness.store, 0.5, 5, 0.02
    admitted: list[float] = []
    for _ in range(75):  # 1.5 s
        result = await store.charge([window("w", limit, period, 1)])
        if result.allowed:
            admitted.append(result.now)
        await harness.advance(step)
    for t in admitted:
        assert sum(1 for u in admitted if t - period < u <= t) <= limit
    # Precision bound: usage is held at most period/30 extra, so ~3 windows admit ~3 limits.
    assert len(admitted) >= 12


async def test_window_denies_until_a_full_window_passed(harness: StoreHarness) -> None:
    store = harness.store
    assert (await store.charge([window("b", 10, 1.0, 10)])).allowed
    denied = await store.charge([window("b", 10, 1.0, 1)])
    assert not denied.allowed
    assert 0.9 <= denied.states[0].retry_after <= 1.04
    await harness.advance(0.6)
    assert not (await store.charge([window("b", 10, 1.0, 1)])).allowed
    await harness.advance(0.5)
    assert (await store.charge([window("b", 10, 1.0, 10)])).allowed


async def test_all_or_nothing(harness: StoreHarness) -> None:
    store = harness.store
    a, b = "aon-a", "aon-b"
    if isinstance(store, RedisStore) and harness.kind == "cluster":
        from redis.crc import key_slot
        assert key_slot(store.key(a).encode()) != key_slot(store.key(b).encode())
    first = await store.charge([window(a, 5, 10, 2), gcra(b, 1, 10)])
    assert first.allowed and first.states[0].remaining == 3
    second = await store.charge([window(a, 5, 10, 2), gcra(b, 1, 10)])
    assert not second.allowed
    assert second.states[0].allowed and not second.states[1].allowed
    assert second.states[0].remaining == 3  # what is really left, not 1 (it was not charged)
    assert not any(r.applied for r in second.receipts)
    assert await remaining(store, a, 5, 10) == 3  # the denied request charged nothing
    # A shadow charge that would deny neither blocks the request nor gets charged.
    third = await store.charge([window(a, 5, 10, 1), gcra(b, 1, 10, shadow=True)])
    assert third.allowed and not third.states[1].allowed
    assert third.receipts[0].applied and not third.receipts[1].applied
    assert await remaining(store, a, 5, 10) == 2


async def test_reserve_reconcile_refund(harness: StoreHarness) -> None:
    store = harness.store
    reserved = await store.charge([window("t", 1000, 10, 600)])
    receipt = reserved.receipts[0]
    assert reserved.states[0].remaining == 400
    await store.adjust([Adjustment(receipt, -400)])  # actual usage was 200
    assert await remaining(store, "t", 1000, 10) == 800
    await store.adjust([Adjustment(receipt, 100)])  # more than reserved: charged as debt
    assert await remaining(store, "t", 1000, 10) == 700
    await store.adjust([Adjustment(receipt, -300)])
    assert await remaining(store, "t", 1000, 10) == 1000
    await store.adjust([Adjustment(receipt, -50)])  # never below zero
    assert await remaining(store, "t", 1000, 10) == 1000


async def test_reconcile_after_the_bucket_left_the_window_is_dropped(harness: StoreHarness) -> None:
    store = harness.store
    receipt = (await store.charge([window("old", 100, 0.3, 50)])).receipts[0]
    await harness.advance(0.4)
    await store.adjust([Adjustment(receipt, 30)])
    assert await remaining(store, "old", 100, 0.3) == 100


async def test_window_counts_exactly_what_its_buckets_hold(harness: StoreHarness) -> None:
    """Random charges and reconciles over three windows of 30 buckets each: at every step the
    budget left is the limit minus the units of the buckets still inside the window, as kept in
    a ledger here from the receipts. The stores keep a running total and drop the buckets that
    left the window only when the oldest one does, so this checks that the total follows every
    charge, refund to zero, debt and slide; and when it will all have left the window (the
    newest bucket, also kept beside the buckets), which a refund to zero may move back."""
    store, limit, period = harness.store, 10**9, 0.3
    gran = window("t", limit, period, 1).bucket_ms
    rng = random.Random(5)
    ledger: dict[int, int] = {}  # bucket start (store ms) -> units
    young: list[tuple[Receipt, float]] = []  # receipts and when they were charged (store s)
    for _ in range(60):
        result = await store.charge([window("t", limit, period, rng.randint(1, 50))])
        receipt = result.receipts[0]
        ledger[receipt.bucket_ms] = ledger.get(receipt.bucket_ms, 0) + receipt.charge.cost
        young.append((receipt, result.now))
        # Reconcile a reservation at most 0.1 s old: its bucket is surely still in the window.
        young = [(r, t) for r, t in young if result.now - t < 0.1]
        if rng.random() < 0.4:
            receipt, _ = rng.choice(young)
            delta = rng.choice([-1000, -5, 7])  # a refund to zero, a part of it, a debt
            await store.adjust([Adjustment(receipt, delta)])
            ledger[receipt.bucket_ms] = max(0, ledger[receipt.bucket_ms] + delta)
        peek = await store.charge([window("t", limit, period, 0)])
        now_ms = round(peek.now * 1000)
        live = [start for start, units in ledger.items() if units and start + gran > now_ms - period * 1000]
        assert peek.states[0].remaining == limit - sum(ledger[start] for start in live)
        # a zero-cost charge reports when all of it will have left: the newest bucket's end + period
        newest_end = max(live) + gran + round(period * 1000) - now_ms if live else 0
        assert round(peek.states[0].reset * 1000) == newest_end
        await harness.advance(rng.choice([0.0, 0.005, 0.02]))


async def test_gcra_refund(harness: StoreHarness) -> None:
    store = harness.store
    first = await store.charge([gcra("r", 1, 10)])
    assert first.allowed
    assert not (await store.charge([gcra("r", 1, 10)])).allowed
    await store.adjust([Adjustment(first.receipts[0], -1)])
    assert (await store.charge([gcra("r", 1, 10)])).allowed


async def test_concurrency_leases(harness: StoreHarness) -> None:
    store = harness.store
    a = await store.charge([lease("c", 2, 0.3, "a")])
    b = await store.charge([lease("c", 2, 0.3, "b")])
    assert a.allowed and b.allowed and b.states[0].remaining == 0
    c = await store.charge([lease("c", 2, 0.3, "c")])
    assert not c.allowed and 0 < c.states[0].retry_after <= 1.0
    await store.adjust([Adjustment(a.receipts[0], -1)])  # release
    assert (await store.charge([lease("c", 2, 0.3, "c")])).allowed
    assert not (await store.charge([lease("c", 2, 0.3, "d")])).allowed
    await harness.advance(0.35)  # a crashed gateway's leases expire on their own
    e = await store.charge([lease("c", 2, 0.3, "e")])
    assert e.allowed and e.states[0].remaining == 1


async def test_renew_extends_live_leases(harness: StoreHarness) -> None:
    """A lease renewed before its TTL keeps its slot past the TTL, on every key in the batch."""
    store = harness.store
    a = await store.charge([lease("rn-a", 1, 0.4, "a"), lease("rn-b", 1, 0.4, "a")])
    tokens = await store.charge([window("rn-w", 10, 10, 1)])
    assert a.allowed
    if isinstance(store, RedisStore) and harness.kind == "cluster":  # one batch, two slots
        from redis.crc import key_slot
        assert key_slot(store.key("rn-a").encode()) != key_slot(store.key("rn-b").encode())
    batch = [a.receipts[0], tokens.receipts[0], a.receipts[1]]
    for _ in range(2):  # 0.5 s in all: past the 0.4 s TTL, renewed every 0.25 s
        await harness.advance(0.25)
        assert await store.renew(batch) == (True, False, True)  # not a lease: False, untouched
    for key in ("rn-a", "rn-b"):
        assert not (await store.charge([lease(key, 1, 0.4, "b")])).allowed  # still held
    await store.adjust([Adjustment(a.receipts[0], -1)])  # released: the slot is free at once
    assert (await store.charge([lease("rn-a", 1, 0.4, "b")])).allowed
    assert await remaining(store, "rn-w", 10, 10) == 9


async def test_renew_never_resurrects_a_lease(harness: StoreHarness) -> None:
    """An expired or released lease stays gone: renewal cannot add a slot."""
    store = harness.store
    a = await store.charge([lease("rx", 3, 0.4, "a")])
    b = await store.charge([lease("rx", 3, 0.4, "b")])
    await store.adjust([Adjustment(b.receipts[0], -1)])  # released (a renewal raced the settle)
    await harness.advance(0.2)
    d = await store.charge([lease("rx", 3, 0.4, "d")])  # keeps the key alive past a's expiry
    await harness.advance(0.25)  # a expired (its gateway stopped renewing), d has not
    assert await store.renew([a.receipts[0], b.receipts[0], d.receipts[0]]) == (False, False, True)
    c = await store.charge([lease("rx", 3, 0.4, "c")])
    assert c.allowed and c.states[0].remaining == 1  # d and c: neither a nor b came back
    gone = await store.charge([lease("rx-gone", 1, 0.1, "z")])
    await harness.advance(0.15)  # the whole key expired
    assert await store.renew(gone.receipts) == (False,)
    assert (await store.charge([lease("rx-gone", 1, 0.1, "y")])).allowed
    assert await store.renew([]) == ()


async def test_cost_above_limit_never_fits(harness: StoreHarness) -> None:
    result = await harness.store.charge([window("big", 100, 10, 101)])
    assert not result.allowed and math.isinf(result.states[0].retry_after)


async def test_exact_under_asyncio_concurrency(harness: StoreHarness) -> None:
    results: list[ChargeResult] = await asyncio.gather(
        *(harness.store.charge([window("many", 50, 10, 1)]) for _ in range(200)))
    assert sum(r.allowed for r in results) == 50


async def test_set_if_absent(harness: StoreHarness) -> None:
    store = harness.store
    assert await store.set_if_absent("nonce", ttl=0.2)
    assert not await store.set_if_absent("nonce", ttl=0.2)
    await harness.advance(0.25)
    assert await store.set_if_absent("nonce", ttl=0.2)


async def test_time_comes_from_the_store(harness: StoreHarness) -> None:
    store = harness.store
    now = await store.now()
    result = await store.charge([gcra("time", 1, 1)])
    assert now <= result.now + 0.001 and result.now - now < 1.0
    if harness.kind == "memory":
        assert now == 1_700_000_000.125  # the injected clock, not the system's
    else:
        assert abs(now - time.time()) < 2.0
    assert await store.ping()
