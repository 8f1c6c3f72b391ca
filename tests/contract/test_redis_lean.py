"""The lean hot-path connection and deferred reconciles of RedisStore, against a real Redis."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from gateway.quota.limits import LimitKind
from gateway.quota.settings import QuotaSettings
from gateway.quota.stage import QuotaStage
from gateway.store.base import Adjustment, Algorithm, Charge, Receipt, StoreError
from gateway.store.redis import RedisStore
from gateway.store.resp import RespConnection, pack
from tests.support.quota_ctx import limit, make_ctx, quota
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis


def window(key: str, n: int, cost: int) -> Charge:
    return Charge(key, Algorithm.WINDOW, n, 60_000, cost)


def pause(server: RedisServer, ms: int) -> None:
    subprocess.run(["redis-cli", "-p", str(server.port), "client", "pause", str(ms), "all"], check=True,
                   capture_output=True)


class Outcomes:
    """Collects ``done`` callbacks of adjust_soon."""

    def __init__(self) -> None:
        self.errors: list[StoreError | None] = []
        self.event = asyncio.Event()

    def __call__(self, error: StoreError | None) -> None:
        self.errors.append(error)
        self.event.set()


async def used(server: RedisServer, store: RedisStore, key: str) -> int:
    """Units counted in a window key, read over a separate redis-py connection: the sum of its
    buckets, which must equal the running total charge.lua keeps beside them (field ``-1``)."""
    client = Redis.from_url(server.url)
    try:
        fields = await client.hgetall(store.key(key))
    finally:
        await client.aclose()
    buckets = sum(int(v) for f, v in fields.items() if int(f) >= 0)
    assert int(fields.get(b"-1", 0)) == buckets
    return buckets


async def test_pipelined_replies_resolve_in_order(redis_server: RedisServer) -> None:
    conn = RespConnection("127.0.0.1", redis_server.port, deadline=2.0)
    try:
        calls = [conn.call(pack("ECHO", f"m{i}")) for i in range(300)]
        calls.insert(150, conn.call(pack("EVALSHA", "0" * 40, 0)))  # an error reply mid-stream
        replies = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(replies.pop(150), NoScriptError)
        assert replies == [f"m{i}".encode() for i in range(300)]
        assert conn.connects == 1  # all of them on one connection
    finally:
        await conn.close()


async def test_replies_stay_in_step_after_a_deadline(redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    store = RedisStore.from_url(server.url, deadline=0.05)
    try:
        assert (await store.charge([window("late", 10, 1)])).allowed
        pause(server, 300)
        with pytest.raises(StoreError, match="deadline of 50 ms"):
            await store.charge([window("late", 10, 1)])
        await asyncio.sleep(0.4)  # the late reply arrives: not handed to a later call
        result = await store.charge([window("late", 10, 0)])
        # the first charge stands; the late one was undone (test_abandoned_charges.py)
        assert result.allowed and result.states[0].remaining == 9
        assert store.stats.abandoned_refunds == 1
    finally:
        await store.close()


async def test_a_connection_that_stops_answering_is_aborted(
        redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    conn = RespConnection("127.0.0.1", server.port, deadline=0.05, stale_after=0.2)
    try:
        assert await conn.call(pack("PING")) == b"PONG"
        pause(server, 1500)
        with pytest.raises(TimeoutError):
            await conn.call(pack("PING"))
        await asyncio.sleep(0.4)
        assert conn.ready is None  # presumed dead and dropped: the next call reconnects
    finally:
        await conn.close()


async def test_reconnects_after_a_redis_restart(redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    store = RedisStore.from_url(server.url, deadline=0.5)
    try:
        assert (await store.charge([window("rs", 5, 1)])).allowed
        server.kill()
        with pytest.raises(StoreError):
            await store.charge([window("rs", 5, 1)])
        server.restart()  # state and scripts are gone: reconnect (which loads the scripts again)
        result = await store.charge([window("rs", 5, 1)])
        assert result.allowed and result.states[0].remaining == 4
        assert store.stats.script_reloads == 0
    finally:
        await store.close()


async def test_deferred_reconcile_goes_before_the_next_charge(redis_server: RedisServer,
                                                              redis_store: RedisStore) -> None:
    first = await redis_store.charge([window("rc", 150, 100)])
    outcomes = Outcomes()
    assert redis_store.adjust_soon([Adjustment(first.receipts[0], -90)], outcomes)
    # No await in between: the charge is sent after the queued reconcile and sees it applied.
    second = await redis_store.charge([window("rc", 150, 100)])
    assert second.allowed and second.states[0].remaining == 40  # 150 - 10 - 100
    await asyncio.wait_for(outcomes.event.wait(), 2)
    assert outcomes.errors == [None]


async def test_deferred_reconcile_delay_bound(redis_server: RedisServer, redis_store: RedisStore) -> None:
    """Written on the next event-loop iteration, answered one round trip later."""
    first = await redis_store.charge([window("db", 1000, 100)])
    queue = redis_store.reconcile
    assert queue is not None
    outcomes = Outcomes()
    for _ in range(5):  # several settles of one iteration: one batch
        redis_store.adjust_soon([Adjustment(first.receipts[0], -10)], outcomes)
    assert queue.pending == 5
    batches = queue.batches
    await asyncio.sleep(0)
    assert queue.pending == 0 and queue.batches == batches + 1
    await asyncio.wait_for(outcomes.event.wait(), 1)
    assert outcomes.errors == [None] * 5
    assert await used(redis_server, redis_store, "db") == 50


async def test_a_batch_reconciles_each_bucket_once(redis_server: RedisServer,
                                                   redis_store: RedisStore) -> None:
    """Five settles of one token budget in one event-loop iteration: one reconcile of its bucket
    in Redis (two HINCRBY: the bucket and the total), with the five deltas summed."""
    first = await redis_store.charge([window("one", 1000, 100)])
    other = await redis_store.charge([window("two", 1000, 100)])
    await redis_store.client.config_resetstat()
    outcomes = Outcomes()
    for delta in (-10, -20, 5, -1, -4):
        redis_store.adjust_soon([Adjustment(first.receipts[0], delta)], outcomes)
    redis_store.adjust_soon([Adjustment(other.receipts[0], -50)], outcomes)
    await asyncio.sleep(0)
    await asyncio.wait_for(outcomes.event.wait(), 1)
    while len(outcomes.errors) < 6:
        await asyncio.sleep(0.01)
    assert outcomes.errors == [None] * 6  # every settle told once
    assert await used(redis_server, redis_store, "one") == 70
    assert await used(redis_server, redis_store, "two") == 50
    stats = await redis_store.client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert stats["cmdstat_hincrby"]["calls"] == 4  # bucket and total, per key


async def test_close_sends_queued_reconciles(redis_server: RedisServer) -> None:
    store = RedisStore.from_url(redis_server.url, deadline=2.0)
    first = await store.charge([window("cl", 1000, 300)])
    outcomes = Outcomes()
    store.adjust_soon([Adjustment(first.receipts[0], -200)], outcomes)
    await store.close()
    assert outcomes.errors == [None]
    assert await used(redis_server, store, "cl") == 100


async def test_settle_failures_are_counted_when_redis_is_gone(
        redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    store = RedisStore.from_url(server.url, deadline=0.2)
    stage = QuotaStage(store, QuotaSettings(backend="redis"))
    action = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 100_000, 60))
    try:
        ctxs = [make_ctx(action, input_tokens=100, max_tokens=100) for _ in range(3)]
        for ctx in ctxs:
            assert await stage(ctx) is None
        server.kill()
        for ctx in ctxs:
            ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.complete = 100, 10, True
            await stage.settle(ctx)  # queued: returns at once
        stats = stage.guard.stats
        for _ in range(100):
            if stats.settle_failures == 3:
                break
            await asyncio.sleep(0.02)
        assert stats.settle_failures == 3 and stats.errors == 3
    finally:
        await stage.guard.close()


def test_memoised_charge_encoding_is_what_hiredis_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean path joins per-charge RESP pieces; they must equal one packed EVALSHA."""
    import gateway.store.wire as wire_module

    monkeypatch.setattr(wire_module, "WIRE_MEMO_ENTRIES", 3)
    monkeypatch.setattr(wire_module, "WHOLE_MEMO_ENTRIES", 3)
    store = RedisStore(Redis(), prefix="p:")
    codec = store.codec
    charges = [
        Charge("q|r|rpm|requests|principal.account=ü", Algorithm.GCRA, 10**9, 60_000, 1, burst=7),
        window("q|r|tpd|total_tokens|", 10**12, 84),
        Charge("q|r|shadow", Algorithm.GCRA, 5, 1_000, 1, shadow=True),
        Charge("q|r|conc", Algorithm.LEASE, 4, 600_000, 1, lease_id="req-1.ab1"),
        Charge("q|r|empty-cost", Algorithm.WINDOW, 10, 30_000, 0),
        # the first charge's limit for another account: its arguments come from the shape memo
        Charge("q|r|rpm|requests|principal.account=b\u00fcro", Algorithm.GCRA, 10**9, 60_000, 1, burst=7),
    ]
    for _ in range(2):  # cold, then from the memo (evicting: it holds only 3)
        for n in range(1, len(charges) + 1):
            keys, args = codec.charge_args(charges[:n], "c")
            expected = pack("EVALSHA", store._charge.sha, n, *keys, *args)
            assert codec.pack_charge(charges[:n]) == expected
            whole = tuple(charges[:n])  # a tuple is memoised whole, by identity
            assert codec.pack_charge(whole) == expected and codec.pack_charge(whole) == expected
            keys, args = codec.charge_args(charges[:n], "f")  # the full-reply form (Cluster slots)
            full = pack("EVALSHA", store._charge.sha, n, *keys, *args)
            assert codec.pack_charge(charges[:n], full=True) == full
    assert len(codec._wire) == 3 and len(codec._packed) == 3 and len(codec._shapes) <= 3
    receipts = [Receipt(c, 1_795_898_880_000 + i, True) for i, c in enumerate(charges)]
    adjustments = [Adjustment(r, delta) for r, delta in zip(receipts, (-1, 37, -5, -1, 12, 3), strict=True)]
    for n in range(1, len(adjustments) + 1):  # the settle path joins memoised pieces too
        keys, args = codec.adjust_args(adjustments[:n])
        assert codec.pack_adjust(adjustments[:n]) == pack("EVALSHA", store._adjust.sha, n, *keys, *args)


async def test_lean_charges_reuse_their_encoding_and_stay_correct(redis_store: RedisStore) -> None:
    rpm = Charge("enc|rpm", Algorithm.GCRA, 3, 60_000, 1, burst=3)
    results = [await redis_store.charge([rpm, window("enc|tpm", 100, 40)]) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False]  # 40 + 40 + 40 > 100
    assert [r.states[0].remaining for r in results] == [2, 1, 1]  # the denied one was not applied
    assert results[2].states[1].remaining == 20 and not results[2].receipts[0].applied


def test_cluster_slot_calls_are_what_hiredis_packs_per_slot() -> None:
    """In a Cluster a request's charges go out as one call per slot: compact replies for one
    slot, full ones for several; each call must equal hiredis' packing of that slot's charges."""
    from redis.crc import key_slot

    from gateway.store.wire import ScriptCodec

    codec = ScriptCodec("p:", "a" * 40, "b" * 40, cluster=True)
    charges = (Charge("acct-1", Algorithm.GCRA, 10, 60_000, 1, burst=10), window("org-1", 1000, 40),
               Charge("acct-1|x", Algorithm.GCRA, 5, 1_000, 1, burst=5))
    slots = [key_slot(f"p:{{{c.key}}}".encode()) for c in charges]
    assert len(set(slots)) == 3
    groups, subs, calls = codec.slot_calls(charges)
    assert [slot for slot, _ in groups] == slots and [list(sub) for sub in subs] == [[c] for c in charges]
    for sub, call in zip(subs, calls, strict=True):
        keys, args = codec.charge_args(sub, "f")
        assert call == pack("EVALSHA", "a" * 40, 1, *keys, *args)
    assert codec.slot_calls(charges)[2] is calls  # memoised for the reused tuple
    one = (charges[1],)
    groups, _, calls = codec.slot_calls(one)
    keys, args = codec.charge_args(one, "c")
    assert groups == [(slots[1], [0])] and calls == [pack("EVALSHA", "a" * 40, 1, *keys, *args)]
