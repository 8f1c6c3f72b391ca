"""Redis-only behaviour: scripts, server time, deadlines, faults, cluster slots, processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.crc import key_slot

from gateway.quota.limits import LimitKind
from gateway.quota.settings import QuotaSettings
from gateway.quota.stage import QuotaStage
from gateway.store.base import Adjustment, Algorithm, Charge, StoreError
from gateway.store.breaker import BreakerSettings, BreakerState, FailureMode
from gateway.store.redis import RedisStore
from tests.support.quota_ctx import limit, make_ctx, quota
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parents[2]


def gcra(key: str, n: int = 1, period_ms: int = 10_000) -> Charge:
    return Charge(key, Algorithm.GCRA, n, period_ms, 1, burst=n)


def window(key: str, n: int, cost: int = 1) -> Charge:
    return Charge(key, Algorithm.WINDOW, n, 60_000, cost)


async def test_script_flush_mid_run(any_redis_store: RedisStore) -> None:
    store = any_redis_store
    assert (await store.charge([window("sf", 3)])).allowed
    await store.client.script_flush()  # as after a restart or failover: every SHA is unknown
    assert (await store.charge([window("sf", 3)])).allowed
    await store.client.script_flush()
    assert (await store.charge([window("sf", 3), gcra("sf2")])).allowed
    third = await store.charge([window("sf", 3)])
    assert not third.allowed  # state survived: 3 of 3 used
    # At least one NOSCRIPT was met and answered by a reload (a connection opened after a flush,
    # as a Cluster primary's lean one may be, loads the scripts as it connects: no NOSCRIPT).
    assert store.stats.script_reloads >= 1


async def test_skewed_client_clocks_do_not_matter(redis_store: RedisStore, redis_server: RedisServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas whose clocks disagree by hours share one limit and one time (Redis TIME)."""
    other = RedisStore.from_url(redis_server.url, deadline=2.0)
    real = time.time
    try:
        first = await redis_store.charge([gcra("skew")])
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this replica runs an hour ahead
        ahead = await other.charge([gcra("skew")])
        monkeypatch.setattr(time, "time", lambda: real() - 3600)  # and this one an hour behind
        behind = await redis_store.charge([gcra("skew")])
    finally:
        await other.close()
    assert first.allowed and not ahead.allowed and not behind.allowed
    assert abs(ahead.now - first.now) < 1 and abs(behind.now - first.now) < 1
    assert 9 < ahead.states[0].retry_after <= 10 and 9 < behind.states[0].retry_after <= 10


async def test_every_call_has_a_deadline(redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    store = RedisStore.from_url(server.url, deadline=0.05)
    try:
        assert await store.ping()
        subprocess.run(["redis-cli", "-p", str(server.port), "client", "pause", "500", "all"], check=True,
                       capture_output=True)
        started = time.monotonic()
        with pytest.raises(StoreError, match="deadline of 50 ms"):
            await store.charge([gcra("slow")])
        assert time.monotonic() - started < 0.3
    finally:
        await store.close()


@pytest.mark.parametrize("mode", list(FailureMode))
async def test_redis_killed_and_restarted_mid_load(
        mode: FailureMode, redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    settings = QuotaSettings(backend="redis", deadline=0.2, on_store_failure=mode, replicas=2,
                             breaker=BreakerSettings(failures=2, reset_after=0.3))
    store = RedisStore.from_url(server.url, deadline=0.2)
    stage = QuotaStage(store, settings)
    action = quota("r1", limit("rpm", LimitKind.REQUESTS, 20, 3600, burst=20))

    async def one() -> tuple[int, str]:
        ctx = make_ctx(action)
        decision = await stage(ctx)
        await stage.settle(ctx)
        return (decision.status if decision else 200), ctx.audit["quota"]["backend"]

    try:
        # Connected (scripts loaded) before the load: the first connection shares the 0.2 s
        # deadline, which a slow moment of a loaded CI box can exceed; that is not this test's case.
        async with asyncio.timeout(5):
            while True:
                try:
                    await store.charge([gcra("warm-up")])
                    break
                except StoreError:
                    await asyncio.sleep(0.05)
        healthy = await asyncio.gather(*(one() for _ in range(5)))
        assert healthy == [(200, "store")] * 5
        server.kill()
        outage = [await one() for _ in range(30)]  # one at a time: the breaker opens, then fails fast
        statuses = [s for s, _ in outage]
        if mode is FailureMode.OPEN:
            assert statuses == [200] * 30 and {b for _, b in outage} == {"none"}
        elif mode is FailureMode.CLOSED:
            assert statuses == [503] * 30
        else:  # this replica's share: 20 / 2 replicas
            assert statuses.count(200) == 10 and statuses.count(429) == 20
            assert {b for _, b in outage} == {"local"}
        assert stage.guard.stats.breaker_state is BreakerState.OPEN
        assert stage.guard.stats.short_circuited > 0
        assert stage.guard.stats.fallbacks[mode.value] == 30
        server.restart()
        deadline = time.monotonic() + 10
        while True:  # half-open probes until one succeeds
            status, backend = await one()
            if backend == "store":
                break
            assert time.monotonic() < deadline, "breaker did not recover"
            await asyncio.sleep(0.05)
        # Through a fresh name: mypy would keep the OPEN asserted above, though the awaits since changed it.
        stats = stage.guard.stats
        assert status == 200 and stats.breaker_state is BreakerState.CLOSED
    finally:
        await stage.guard.close()


@pytest.mark.cluster
async def test_cluster_cross_slot_over_admission_bound(cluster_store: RedisStore) -> None:
    """Limits in different slots are charged per slot and compensated: never over-admits, and
    once refunds are done every counter equals the number admitted (nothing leaks)."""
    a, b = "xs-a", "xs-b"
    assert key_slot(cluster_store.key(a).encode()) != key_slot(cluster_store.key(b).encode())
    results = await asyncio.gather(*(cluster_store.charge([window(a, 20), window(b, 10)])
                                     for _ in range(100)))
    admitted = sum(r.allowed for r in results)
    assert 1 <= admitted <= 10
    used_a = 20 - (await cluster_store.charge([window(a, 20, 0)])).states[0].remaining
    used_b = 10 - (await cluster_store.charge([window(b, 10, 0)])).states[0].remaining
    assert used_a == admitted and used_b == admitted
    assert cluster_store.stats.compensations > 0 and cluster_store.stats.compensation_failures == 0
    later = [await cluster_store.charge([window(a, 20), window(b, 10)]) for _ in range(20)]
    assert admitted + sum(r.allowed for r in later) == 10  # spurious denials were transient


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["g", "w", "l"])
async def test_processes_sharing_one_redis_admit_exactly_n(algo: str, redis_server: RedisServer,
                                                           redis_store: RedisStore) -> None:
    """4 processes × 125 concurrent requests = 500 against a limit of 37 on one key."""
    workers, per_worker, n = 4, 125, 37
    procs = [subprocess.Popen(
        [sys.executable, "-m", "tests.support.load_worker", redis_server.url, f"mp-{algo}", algo,
         str(n), str(per_worker)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        counts = [int(p.communicate(timeout=60)[0].strip()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sum(counts) == n


async def test_long_stream_keeps_its_lease_with_a_real_ttl(redis_store: RedisStore) -> None:
    """lease_ttl 1 s, renewed every ~0.33 s by the stage's task: a stream of 2 s keeps its slot
    in Redis (Redis owns the TTL, so this runs in real time), and settle frees it at once."""
    stage = QuotaStage(redis_store, QuotaSettings(backend="redis", lease_ttl=1.0))
    assert abs(stage.renewal_interval - 1 / 3) < 1e-9
    action = quota("r1", limit("conc", LimitKind.CONCURRENCY, 1))
    stream = make_ctx(action)
    key = redis_store.key(action.value.limits[0].identity("r1", stream))
    try:
        assert await stage(stream) is None
        for _ in range(4):  # 2 s: twice the TTL
            await asyncio.sleep(0.5)
            refused = await stage(make_ctx(action))
            assert refused is not None and refused.status == 429
            (entry,) = await redis_store.client.zrange(key, 0, -1, withscores=True)
            assert not isinstance(entry, (bytes, str))  # withscores: a (member, score) pair
            _, expires = entry
            assert expires - (await redis_store.now()) * 1000 > 300  # renewed ~0.33 s ago at most
        stats = stage.guard.stats
        assert stats.lease_renewals >= 5 and stats.renew_failures == stats.leases_lost == 0
        await stage.settle(stream)  # the release is queued and written before the next charge
        third = make_ctx(action)
        assert await stage(third) is None
        await stage.settle(third)
    finally:
        await stage.guard.close()


async def _window_of_30_buckets(store: RedisStore, name: str, units: int) -> tuple[str, Charge]:
    """A window key holding ``units`` in each of its 30 buckets, written as a hash of buckets
    only (the layout before the running total: what a key left by an older version holds)."""
    charge = window(name, 10**9)
    key = store.key(name)
    seconds, micros = await store.client.time()
    now = seconds * 1000 + micros // 1000
    gran = charge.bucket_ms
    newest = now - now % gran
    await store.client.hset(key, mapping={str(newest - k * gran): units for k in range(30)})
    await store.client.pexpire(key, charge.period_ms * 2)
    return key, charge


async def test_window_key_without_a_total_is_recounted(redis_store: RedisStore) -> None:
    store = redis_store
    key, charge = await _window_of_30_buckets(store, "legacy", 10)
    result = await store.charge([charge])
    assert result.states[0].remaining == 10**9 - 300 - 1
    fields = await store.client.hgetall(key)
    assert int(fields[b"-1"]) == 301 == sum(int(v) for f, v in fields.items() if int(f) >= 0)
    assert int(fields[b"-2"]) == min(int(f) for f in fields if int(f) >= 0)
    assert int(fields[b"-3"]) == max(int(f) for f in fields if int(f) >= 0)


async def test_window_stays_exact_beside_a_replica_of_the_older_layout(redis_store: RedisStore) -> None:
    """During a rolling upgrade an older replica charges the same key: it adds to the bucket and,
    reading the fields with negative names as long-dead buckets, deletes them. The next charge
    here finds them missing and recounts, so nothing the older replica charged is lost."""
    store = redis_store
    key, charge = await _window_of_30_buckets(store, "mixed", 10)
    first = await store.charge([charge])
    assert first.states[0].remaining == 10**9 - 301
    bucket = str(first.receipts[0].bucket_ms)
    # what charge.lua before the running total did to this key, cost 40
    await store.client.hincrby(key, bucket, 40)
    await store.client.hdel(key, "-1", "-2", "-3")
    again = await store.charge([charge])
    assert again.states[0].remaining == 10**9 - 301 - 40 - 1
    fields = await store.client.hgetall(key)
    assert int(fields[b"-1"]) == 342 == sum(int(v) for f, v in fields.items() if int(f) >= 0)


async def test_window_charge_reads_no_buckets_while_none_left(redis_store: RedisStore) -> None:
    """A daily token budget holds 30 buckets most of the time: a charge reads the total, the
    oldest and newest starts and its bucket (HMGET), not every bucket (HGETALL), until the oldest
    one leaves the window."""
    store = redis_store
    _, charge = await _window_of_30_buckets(store, "steady", 10)
    await store.charge([charge])  # recounts once: the key had no total
    await store.client.config_resetstat()
    results = [await store.charge([charge]) for _ in range(20)]
    assert [r.states[0].remaining for r in results] == [10**9 - 301 - i for i in range(1, 21)]
    # The full reply (what Redis Cluster asks for: idle states too) needs no bucket either.
    full = [await store._charge_group([charge]) for _ in range(5)]
    assert [r.states[0].remaining for r in full] == [10**9 - 321 - i for i in range(1, 6)]
    stats = await store.client.info("commandstats")
    assert "cmdstat_hgetall" not in stats
    assert stats["cmdstat_hmget"]["calls"] == 25


async def test_window_keys_always_carry_their_expiry(redis_store: RedisStore) -> None:
    """charge.lua sets a window key's expiry only when a charge opens a new bucket, and adjust.lua
    only when it re-creates a bucket: every path must still leave a TTL that covers the newest
    bucket's end, and no key without one (a key that never expires would leak)."""
    store = redis_store
    client = store.client
    key = store.key("ttl|tpd")
    tpd = window("ttl|tpd", 1_000, cost=10)
    period_ms = tpd.period_ms

    async def ttl_ms() -> int:
        return int(await client.pttl(key))

    first = await store.charge([tpd])  # new bucket: the expiry is set
    assert period_ms < await ttl_ms() <= period_ms + tpd.bucket_ms + 1
    await client.pexpire(key, period_ms)  # (made shorter, so that a skipped PEXPIRE shows)
    again = await store.charge([tpd])  # same bucket: already covered, left alone
    assert again.receipts[0].bucket_ms == first.receipts[0].bucket_ms
    assert await ttl_ms() <= period_ms
    await store.adjust([Adjustment(first.receipts[0], 5)])  # an existing bucket: left alone
    assert await ttl_ms() <= period_ms
    bucket = await client.hget(key, str(first.receipts[0].bucket_ms))
    assert bucket is not None and int(bucket) == 25

    await client.delete(key)  # the key is gone (expired, or removed by hand)
    await store.adjust([Adjustment(first.receipts[0], 7)])  # re-created by a reconcile: needs a TTL
    assert period_ms < await ttl_ms() <= period_ms + tpd.bucket_ms + 1
    await store.adjust([Adjustment(first.receipts[0], -7)])  # back to nothing: the bucket goes
    assert await client.exists(key) == 0
    await store.adjust([Adjustment(first.receipts[0], -3)])  # a refund of nothing creates nothing
    assert await client.exists(key) == 0
