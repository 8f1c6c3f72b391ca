"""``BehindSignalStore``: mirrored accounts answered locally, writes sent behind, coalesced.

Against a ``MemorySignalStore`` on an injected clock (exact comparisons), and a real Redis for
the coalesced ``EVALSHA`` path, several replicas sharing one store, and a store that goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.risk.behind import BehindSignalStore
from gateway.risk.redis_sigstore import RedisSignalStore
from gateway.risk.settings import RiskSettings, parse_risk_settings
from gateway.risk.sigstore import (
    AccountState,
    AccountTouch,
    BatchResult,
    DecayAdd,
    HllAdd,
    MemorySignalStore,
    Op,
    StateGet,
    StatePut,
)
from gateway.stages.risk import RiskStage, create_signal_store
from gateway.store.base import StoreError
from gateway.yamlsource import Issues, Node
from tests.support.redis_servers import RedisServer, start_server
from tests.unit.risk.helpers import FakeClock, chat_ctx

HOUR = 3600.0


def request_ops(account: str, member: str = "", template: str = "t1") -> list[Op]:
    """The shape of a risk-stage batch: shared HLLs and sums, the account, its friction state."""
    entity = member or account
    return [HllAdd(f"t:{template}", entity, HOUR), DecayAdd(f"tr:{template}", (1.0, 0.5), 600.0),
            HllAdd("p:198.51.100.0/24", entity, HOUR),
            AccountTouch(f"a:{account}", (1.0, 0.5, 1.0, 0.0), template, HOUR, 7 * 86400.0),
            StateGet(f"fr:{account}")]


class CountingStore:
    """A memory store that counts the calls made to it and can be made to fail."""

    def __init__(self, clock: FakeClock) -> None:
        self.inner = MemorySignalStore(clock)
        self.calls: list[int] = []  # ops per call
        self.failing = False

    async def batch(self, ops: Sequence[Op]) -> BatchResult:
        self.calls.append(len(ops))
        if self.failing:
            raise StoreError("store down")
        return await self.inner.batch(ops)

    async def close(self) -> None:
        await self.inner.close()


async def test_first_request_of_an_account_is_awaited_then_answered_locally() -> None:
    clock = FakeClock()
    inner = CountingStore(clock)
    store = BehindSignalStore(inner, clock=clock)
    await store.batch(request_ops("a1"))
    assert (store.inline_batches, store.local_batches, inner.calls) == (1, 0, [5])
    clock.now += 10
    await store.batch(request_ops("a1"))
    assert (store.inline_batches, store.local_batches) == (1, 1)
    assert inner.calls == [5]  # not sent yet: queued for the end of this loop iteration
    await store.drain()
    assert inner.calls == [5, 5]


async def test_local_answers_equal_the_store_for_one_replica_but_hll_lags_one_request() -> None:
    clock = FakeClock()
    reference = MemorySignalStore(FakeClock())
    store = BehindSignalStore(MemorySignalStore(clock), clock=clock)
    for i in range(12):
        clock.now += 7.0 + i  # irregular gaps: mean and variance both move
        reference_clock = reference.clock
        assert isinstance(reference_clock, FakeClock)
        reference_clock.now = clock.now
        ops = request_ops("a1", member=f"m{i}")
        got = await store.batch(ops)
        want = await reference.batch(ops)
        got_account, want_account = got.results[3], want.results[3]
        assert isinstance(got_account, AccountState) and got_account == want_account
        assert got.results[1] == pytest.approx(want.results[1])  # decaying sum
        assert got.results[4] == want.results[4] == {}
        # A new member is counted once the store answered: the local count lags by one.
        assert want.results[0] - 1 <= got.results[0] <= want.results[0]
        await store.drain()


async def test_concurrent_requests_are_sent_as_one_call_split_at_max_ops() -> None:
    clock = FakeClock()
    inner = CountingStore(clock)
    store = BehindSignalStore(inner, clock=clock, max_ops=20)
    for i in range(10):
        await store.batch(request_ops(f"a{i}"))  # inline: first seen
    inner.calls.clear()
    await asyncio.gather(*(store.batch(request_ops(f"a{i}")) for i in range(10)))
    await store.drain()
    assert inner.calls == [20, 20, 10]  # 50 ops queued in one iteration, 20 per call
    assert store.flushes == 3 and store.local_batches == 10


async def test_writes_of_other_replicas_reach_the_mirror_with_the_next_answer() -> None:
    clock = FakeClock()
    shared = MemorySignalStore(clock)
    replica_a = BehindSignalStore(shared, clock=clock)
    replica_b = BehindSignalStore(shared, clock=clock)
    await replica_a.batch(request_ops("a1", template="hydra"))
    for i in range(20):  # twenty other accounts on the same template through replica B
        await replica_b.batch(request_ops(f"b{i}", template="hydra"))
    await replica_b.drain()
    seen = await replica_a.batch(request_ops("a1", template="hydra"))
    assert seen.results[0] == 1  # A's mirror: B's accounts not seen yet (one request of lag)
    await replica_a.drain()
    seen = await replica_a.batch(request_ops("a1", template="hydra"))
    assert seen.results[0] == 21


async def test_friction_state_written_here_sends_the_next_read_to_the_store() -> None:
    clock = FakeClock()
    store = BehindSignalStore(MemorySignalStore(clock), clock=clock)
    await store.batch(request_ops("a1"))
    await store.batch([StatePut("fr:a1", "rule", '{"x": 1}', 60.0)])
    before = store.inline_batches
    result = await store.batch(request_ops("a1"))
    assert store.inline_batches == before + 1
    assert result.results[4] == {"rule": '{"x": 1}'}
    local = await store.batch(request_ops("a1"))  # mirrored again, with the state
    assert store.local_batches == 1 and local.results[4] == {"rule": '{"x": 1}'}


async def test_a_failed_flush_is_counted_and_the_account_goes_back_to_the_store() -> None:
    clock = FakeClock()
    inner = CountingStore(clock)
    store = BehindSignalStore(inner, clock=clock)
    stage = RiskStage(RiskSettings(), store)
    await stage(chat_ctx("hello there", account="a1"))
    inner.failing = True
    ctx = chat_ctx("hello again", account="a1")
    await stage(ctx)  # answered locally; its queued write fails
    assert "store_error" not in ctx.risk.signals
    await store.drain()
    assert store.flush_errors == 1 and "a:a1" not in store._mirror
    ctx = chat_ctx("and again", account="a1")
    await stage(ctx)  # inline now: the failure is seen and scored from local signals
    assert ctx.risk.signals["store_error"] == 1.0 and stage.store_errors == 1
    inner.failing = False
    ctx = chat_ctx("recovered", account="a1")
    await stage(ctx)
    assert "store_error" not in ctx.risk.signals


class SlowStore(CountingStore):
    """Answers after the test releases it: a store slower than the traffic."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.gate = asyncio.Event()

    async def batch(self, ops: Sequence[Op]) -> BatchResult:
        if len(self.calls) >= 1:  # the first call (warm-up) is answered at once
            await self.gate.wait()
        return await super().batch(ops)


async def test_a_slow_store_sets_the_pace_past_the_backlog_bound() -> None:
    clock = FakeClock()
    inner = SlowStore(clock)
    store = BehindSignalStore(inner, clock=clock, max_backlog=12)
    await store.batch(request_ops("a1"))  # inline
    await store.batch(request_ops("a1"))  # local: 5 operations unanswered
    await store.batch(request_ops("a1"))  # local: 10
    await asyncio.sleep(0)  # flushed: the store holds them
    assert store.status()["backlog"] == 10 and store.local_batches == 2
    await store.batch(request_ops("a1"))  # local: 15, over the bound
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(store.batch(request_ops("a1")))
    await asyncio.sleep(0.01)
    assert not waiting.done() and store.inline_batches == 2  # awaits the slow store
    inner.gate.set()
    await waiting
    await store.drain()
    assert store.status()["backlog"] == 0
    await store.batch(request_ops("a1"))
    assert store.local_batches == 4  # caught up: local again


async def test_the_mirror_is_bounded() -> None:
    clock = FakeClock()
    store = BehindSignalStore(MemorySignalStore(clock), clock=clock, max_entries=50)
    for i in range(100):
        await store.batch(request_ops(f"a{i}", template=f"t{i}"))
        await store.batch(request_ops(f"a{i}", template=f"t{i}"))
    await store.drain()
    assert len(store) <= 50


async def test_an_account_evicted_while_its_request_is_answered_still_gets_its_state() -> None:
    """The mirror is first-in first-out: a long-lived account's entry is the oldest, and the new
    keys of its own request can push it out mid-answer."""
    clock = FakeClock()
    store = BehindSignalStore(MemorySignalStore(clock), clock=clock, max_entries=6)
    first = await store.batch(request_ops("a1", template="t1"))
    for template in ("t2", "t3", "t4"):
        clock.now += 5.0
        result = await store.batch(request_ops("a1", template=template))
        state = result.results[3]
        assert isinstance(state, AccountState) and state.first_seen == first.results[3].first_seen
        await store.drain()
    assert len(store) <= 6


async def test_per_request_sends_keep_each_request_context() -> None:
    """Without coalescing each request's batch is sent in its own context (the simulator's
    virtual clock is a context variable read by the store)."""
    import contextvars

    now: contextvars.ContextVar[float] = contextvars.ContextVar("now", default=1_700_000_000.0)
    inner = MemorySignalStore(now.get)
    store = BehindSignalStore(inner, clock=now.get, coalesce=False)
    await store.batch(request_ops("a1"))

    async def at(t: float) -> None:
        now.set(t)
        await store.batch(request_ops("a1"))

    await asyncio.gather(at(1_700_000_010.0), at(1_700_000_030.0))
    await store.drain()
    final = await inner.batch([AccountTouch("a:a1", (0.0, 0.0, 0.0, 0.0), "", HOUR, 86400.0)])
    state = final.results[0]
    assert isinstance(state, AccountState)
    # Gaps of 10 s and 20 s: each queued write was applied at its own request's time.
    assert state.gaps == 2 and state.previous == 1_700_000_030.0
    assert state.gap_mean == pytest.approx(10.0 + 0.2 * (20.0 - 10.0))


def _settings(text: str) -> RiskSettings:
    issues = Issues()
    settings = parse_risk_settings(Node.parse(text + "\n", "risk.yaml", issues))
    assert not issues.errors, issues.errors
    return settings


def _errors(text: str) -> list[str]:
    issues = Issues()
    parse_risk_settings(Node.parse(text + "\n", "risk.yaml", issues))
    return [str(i) for i in issues.errors]


def test_store_mode_settings() -> None:
    assert _settings("store: {backend: redis, url: 'redis://h:1'}").store.mode == "behind"
    inline = _settings("store: {backend: redis, url: 'redis://h:1', mode: inline, mirror_entries: 10}")
    assert (inline.store.mode, inline.store.mirror_entries) == ("inline", 10)
    assert any("risk.yaml:1" in e and "expected behind or inline" in e
               for e in _errors("store: {backend: redis, url: 'redis://h:1', mode: later}"))
    assert any("applies to the redis backend" in e for e in _errors("store: {backend: memory, mode: inline}"))
    assert any("positive number" in e
               for e in _errors("store: {backend: redis, url: 'redis://h:1', mirror_entries: 0}"))


async def test_create_signal_store_wraps_redis_in_behind_mode_by_default() -> None:
    url = "url: 'redis://127.0.0.1:1'"
    behind = create_signal_store(_settings(f"store: {{backend: redis, {url}}}").store)
    inline = create_signal_store(_settings(f"store: {{backend: redis, {url}, mode: inline}}").store)
    try:
        assert isinstance(behind, BehindSignalStore) and isinstance(behind.inner, RedisSignalStore)
        assert isinstance(inline, RedisSignalStore)
    finally:
        await behind.close()
        await inline.close()


@pytest.mark.redis
@pytest.mark.parametrize("topology", ["single", pytest.param("cluster", marks=pytest.mark.cluster)])
async def test_redis_replicas_write_behind_and_agree_on_the_counts(topology: str,
                                                                   request: pytest.FixtureRequest) -> None:
    """Three replicas, 30 accounts, 10 requests each, concurrently: every write reaches Redis in
    coalesced calls (on a Cluster: one script per slot, sent by a task) and the counts are those
    of the same traffic awaited request by request."""
    if topology == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        urls: str | list[str] = server.url
    else:
        urls = request.getfixturevalue("redis_cluster").urls
    cluster = topology == "cluster"
    replicas = [BehindSignalStore(RedisSignalStore.from_url(urls, cluster=cluster, prefix="t:behind:",
                                                            deadline=2.0)) for _ in range(3)]
    reference = RedisSignalStore.from_url(urls, cluster=cluster, prefix="t:inline:", deadline=2.0)
    try:
        for round_ in range(10):
            await asyncio.gather(*(replicas[i % 3].batch(request_ops(f"a{i}", template="shared"))
                                   for i in range(30)))
            for i in range(30):
                await reference.batch(request_ops(f"a{i}", template="shared"))
            if round_ == 0:
                assert all(r.inline_batches == 10 for r in replicas)
        for replica in replicas:
            await replica.drain()
        assert sum(r.local_batches for r in replicas) == 270
        assert sum(r.flushes for r in replicas) < 270  # coalesced
        probe = [HllAdd("t:shared", "a0", HOUR)] + [
            AccountTouch(f"a:a{i}", (0.0, 0.0, 0.0, 0.0), "", HOUR, 86400.0) for i in range(30)]
        behind = await replicas[0].inner.batch(probe)
        inline = await reference.batch(probe)
        assert behind.results[0] == inline.results[0] == 30
        for got, want in zip(behind.results[1:], inline.results[1:], strict=True):
            assert got.counts[0] == pytest.approx(want.counts[0], rel=1e-3)  # ten requests each
            assert got.gaps == want.gaps == 10
    finally:
        for replica in replicas:
            await replica.close()
        await reference.close()


@pytest.mark.redis
async def test_redis_going_away_mid_traffic_fails_open_and_recovers(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    store = BehindSignalStore(RedisSignalStore.from_url(server.url, prefix="t:gone:", deadline=0.5))
    stage = RiskStage(RiskSettings(), store)
    try:
        await stage(chat_ctx("first", account="a1"))
        server.kill()
        ctx = chat_ctx("second", account="a1")
        await stage(ctx)  # local: the failure lands on the queued write
        await store.drain()
        assert store.flush_errors == 1
        ctx = chat_ctx("third", account="a1")
        await stage(ctx)
        assert ctx.risk.signals.get("store_error") == 1.0
        server.start()
        for _ in range(50):  # reconnects on the next call
            ctx = chat_ctx("fourth", account="a1")
            await stage(ctx)
            if "store_error" not in ctx.risk.signals:
                break
            await asyncio.sleep(0.1)
        assert "store_error" not in ctx.risk.signals
    finally:
        await store.close()
        server.stop()


@pytest.mark.redis
async def test_redis_queued_writes_survive_a_script_flush(redis_server: RedisServer) -> None:
    """A queued write refused with NOSCRIPT goes the awaited way, which reloads the script."""
    inner = RedisSignalStore.from_url(redis_server.url, prefix="t:flushed:", deadline=2.0)
    store = BehindSignalStore(inner)
    try:
        await store.batch(request_ops("a1"))  # inline: connects, loads the script
        await store.batch(request_ops("a1"))  # local: sent without a task
        await store.drain()
        await inner._client.script_flush()
        await store.batch(request_ops("a1"))
        await store.drain()
        assert store.flush_errors == 0 and inner.script_reloads >= 1
        probe = await inner.batch([AccountTouch("a:a1", (0.0, 0.0, 0.0, 0.0), "", HOUR, 86400.0)])
        state = probe.results[0]
        assert isinstance(state, AccountState) and state.counts[0] == pytest.approx(3.0, rel=1e-3)
    finally:
        await store.close()
