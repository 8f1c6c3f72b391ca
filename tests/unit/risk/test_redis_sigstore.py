"""``SignalStore`` contract: the same cases against ``MemorySignalStore`` and ``RedisSignalStore``
(a single Redis, and a 3-master Redis Cluster where a batch is split into one script per slot).

The memory store runs on an injected clock (``advance`` moves it); the Redis store takes time
from Redis ``TIME`` and its TTLs are Redis's own, so there ``advance`` waits for real time to
pass over short windows (tenths of a second), never a frozen Python clock. HyperLogLog counts
are exact below a few dozen members in both stores; the assertions allow Redis's estimator ±1.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio
from redis.crc import key_slot

from gateway.risk.redis_sigstore import RedisSignalStore
from gateway.risk.settings import RiskSettings, parse_risk_settings
from gateway.risk.sigstore import (
    AccountTouch,
    DecayAdd,
    HllAdd,
    MemorySignalStore,
    Op,
    SignalStore,
    StateDelete,
    StateGet,
    StatePut,
)
from gateway.stages.risk import RiskStage
from gateway.yamlsource import Issues, Node
from tests.support.redis_servers import RedisClusterServers, RedisServer, start_cluster
from tests.unit.risk.helpers import FakeClock, chat_ctx

WINDOW = 0.4  # seconds: short enough for real time on Redis


@dataclass
class Harness:
    store: SignalStore
    clock: FakeClock | None  # None: Redis owns time

    async def advance(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    async def align(self, window: float) -> None:
        """Start just after a ``window`` boundary, so a test's first steps share one bucket."""
        now = (await self.store.batch([])).now
        phase = now % window
        if phase > window * 0.1:
            await self.advance(window - phase + 0.01)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.cluster])])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        store: SignalStore = MemorySignalStore(clock)
        yield Harness(store, clock)
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisSignalStore.from_url(server.url, prefix=f"t:{request.node.name}:", deadline=2.0)
        yield Harness(store, None)
    else:
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        store = RedisSignalStore.from_url(cluster.urls, cluster=True, prefix=f"t:{request.node.name}:",
                                          deadline=2.0)
        yield Harness(store, None)
    await store.close()


def near(value: int, expected: int) -> bool:
    return abs(value - expected) <= 1


async def test_hll_counts_this_window_and_the_previous_one(harness: Harness) -> None:
    store = harness.store
    await harness.align(WINDOW)
    result = await store.batch([HllAdd("k", f"m{i}", WINDOW) for i in range(30)])
    assert [int(r) for r in result.results][-1] == 30 or near(result.results[-1], 30)
    assert near((await store.batch([HllAdd("k", "m0", WINDOW)])).results[0], 30)  # a repeat
    await harness.advance(WINDOW)  # next bucket: the previous one still counts
    assert near((await store.batch([HllAdd("k", "new", WINDOW)])).results[0], 31)
    await harness.advance(2 * WINDOW)  # both old buckets gone
    assert (await store.batch([HllAdd("k", "new2", WINDOW)])).results[0] == 1


async def test_hll_keys_are_independent(harness: Harness) -> None:
    store = harness.store
    await harness.align(WINDOW)
    res = (await store.batch([HllAdd("a", "x", WINDOW), HllAdd("b", "x", WINDOW), HllAdd("a", "y", WINDOW),
                              HllAdd("a", "x", WINDOW)])).results
    assert list(res) == [1, 1, 2, 2]


async def test_decaying_sums_halve_per_half_life(harness: Harness) -> None:
    store = harness.store
    first = (await store.batch([DecayAdd("d", (4.0, 2.0), 0.3)])).results[0]
    assert first == (4.0, 2.0)
    await harness.advance(0.3)
    second = (await store.batch([DecayAdd("d", (0.0, 1.0), 0.3)])).results[0]
    # exactly one half-life with an injected clock; a little more in real time
    assert 1.5 <= second[0] <= 2.0 + 1e-6 and 1.75 <= second[1] <= 2.0 + 1e-6
    assert math.isclose(second[1] - 1.0, second[0] / 2, rel_tol=1e-6)


async def test_account_state_gaps_template_and_expiry(harness: Harness) -> None:
    store = harness.store
    touch = AccountTouch("a:x", (1.0, 0.5), "tpl", 3600.0, 1.0)
    first = (await store.batch([touch])).results[0]
    assert first.previous is None and first.gaps == 0 and first.gap_cv is None
    assert first.counts == (1.0, 0.5) and first.top_template == "tpl" and first.top_count == 1.0
    state = first
    for _ in range(6):
        await harness.advance(0.05)
        state = (await store.batch([touch])).results[0]
    assert state.previous is not None and state.first_seen == first.first_seen
    assert state.gaps == 6 and 0.0499 <= state.gap_mean < 0.08
    assert state.gap_cv is not None and state.gap_cv < 0.5
    assert 6.9 < state.counts[0] <= 7.0 and state.top_template == "tpl" and state.top_count > 6.9
    assert state.hours.bit_count() == 1
    other = (await store.batch([AccountTouch("a:x", (1.0, 0.0), "other", 3600.0, 1.0)])).results[0]
    assert other.top_template == "tpl" and other.top_count < state.top_count  # heavy hitter holds
    await harness.advance(1.1)  # ttl passed: first seen again
    assert (await store.batch([touch])).results[0].previous is None


async def test_friction_state_put_get_expire_delete(harness: Harness) -> None:
    store = harness.store
    await store.batch([StatePut("fr:x", "rule", '{"a":1}', 0.3), StatePut("fr:x", "long", "{}", 5.0)])
    assert (await store.batch([StateGet("fr:x")])).results[0] == {"rule": '{"a":1}', "long": "{}"}
    await harness.advance(0.35)
    assert (await store.batch([StateGet("fr:x")])).results[0] == {"long": "{}"}
    await store.batch([StateDelete("fr:x", "long")])
    assert (await store.batch([StateGet("fr:x")])).results[0] == {}
    await store.batch([StatePut("fr:x", "a", "1", 5.0), StatePut("fr:x", "b", "2", 5.0)])
    await store.batch([StateDelete("fr:x")])
    assert (await store.batch([StateGet("fr:x")])).results[0] == {}
    assert (await store.batch([StateGet("fr:never")])).results[0] == {}


async def test_one_batch_keeps_results_in_op_order(harness: Harness) -> None:
    result = await harness.store.batch([
        StatePut("fr:o", "f", "v", 5.0), HllAdd("h", "m", WINDOW), DecayAdd("d2", (1.0,), 60.0),
        AccountTouch("a:o", (1.0,), "", 60.0, 60.0), StateGet("fr:o"), StateDelete("fr:o", "f"),
        StateGet("fr:o")])
    put, hll, dec, acc, got, deleted, gone = result.results
    assert put is None and hll == 1 and dec == (1.0,) and acc.counts == (1.0,) and acc.top_template == ""
    assert got == {"f": "v"} and deleted is None and gone == {}
    assert result.now > 1_600_000_000


async def test_risk_stage_hydra_cluster_on_either_store(harness: Harness) -> None:
    stage = RiskStage(RiskSettings(), harness.store)
    template = "Solve the following problem carefully. {q} Think step by step and show your work."
    ctx = None
    for i in range(40):
        ctx = chat_ctx(template.format(q=f"Item {i} costs {i * 3} dollars. What do {i} items cost?"),
                       account=f"hydra{i}", ip=f"198.51.100.{i + 1}", asn=64999)
        await stage(ctx)
        await harness.advance(0.001)
    assert ctx is not None and "store_error" not in ctx.risk.signals
    assert ctx.risk.signals["template_accounts"] >= 39 and ctx.risk.cluster_size >= 39
    assert ctx.risk.cluster_score > 0.8 and ctx.risk.score > 0.8


@pytest.mark.redis
async def test_redis_script_reloaded_after_flush(redis_server: RedisServer) -> None:
    store = RedisSignalStore.from_url(redis_server.url, prefix="t:flush:", deadline=2.0)
    try:
        assert (await store.batch([HllAdd("k", "a", 60.0)])).results == (1,)
        await store._client.script_flush()
        assert (await store.batch([HllAdd("k", "b", 60.0)])).results == (2,)
        assert store.script_reloads >= 1
    finally:
        await store.close()


@pytest.mark.redis
async def test_redis_hll_view_counts_equal_the_two_bucket_merge(redis_server: RedisServer) -> None:
    """The per-bucket union view gives exactly ``PFCOUNT current previous`` (the estimate of the
    two-key merge), sparse and dense, with members repeating across buckets."""
    window, prefix = 0.5, "t:view:"
    store = RedisSignalStore.from_url(redis_server.url, prefix=prefix, deadline=2.0)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    checked = 0
    try:
        harness = Harness(store, None)
        await harness.align(window)
        for bucket in range(3):
            for step in range(30):  # 30 × 60 members per bucket: past the sparse encoding's limit
                base = bucket * 900 + step * 60
                result = await store.batch([HllAdd("k", f"m{base + i}", window) for i in range(60)]
                                           + [HllAdd("k", f"m{i}", window) for i in range(step)])
                b = math.floor(result.now / window)
                if (result.now - b * window) > window - 0.01:
                    continue  # so near the bucket's end that the rounded time may be in the next
                expected = await client.pfcount(f"{prefix}{{k}}:{b}", f"{prefix}{{k}}:{b - 1}")
                assert result.results[-1] == expected
                checked += 1
            await harness.advance(window - (result.now % window) + 0.01)  # the next bucket
        assert checked > 60 and result.results[-1] > 1500
        assert (await client.object("ENCODING", f"{prefix}{{k}}:u{b}")) == b"raw"
    finally:
        await client.aclose()
        await store.close()


@pytest.mark.redis
@pytest.mark.cluster
async def test_cluster_batch_spans_slots_and_keeps_op_order(redis_cluster: RedisClusterServers) -> None:
    store = RedisSignalStore.from_url(redis_cluster.urls, cluster=True, prefix="t:slots:", deadline=2.0)
    try:
        ops = [HllAdd(f"h{i}", f"m{j}", 60.0) for i in range(20) for j in range(i % 3 + 1)]
        results = (await store.batch(ops)).results
        assert list(results) == [j + 1 for i in range(20) for j in range(i % 3 + 1)]
        assert store._lean is None
        routes = store._routes
        assert routes is not None and not routes.cold  # redis-py answered: slots route by its map
        # the second batch goes over the primaries' lean connections, with the same answers
        again = (await store.batch([HllAdd(f"h{i}", "m-new", 60.0) for i in range(20)])).results
        assert list(again) == [i % 3 + 2 for i in range(20)]
        assert routes.connections == len(redis_cluster.nodes) and routes.redirects == 0
    finally:
        await store.close()


def test_parse_cluster_store_settings() -> None:
    issues = Issues()
    node = Node.parse("store: {backend: redis, cluster: true, nodes: [redis://a:7000, redis://b:7001]}\n",
                      "r.yaml", issues)
    settings = parse_risk_settings(node)
    assert not issues.errors
    assert settings.store.cluster and settings.store.urls == ("redis://a:7000", "redis://b:7001")
    issues = Issues()
    parse_risk_settings(Node.parse("store: {backend: redis, nodes: [redis://a:7000]}\n", "r.yaml", issues))
    assert [str(i).split(": ", 1)[1] for i in issues.errors] == [
        "store.nodes: 'nodes' are Redis Cluster startup nodes: set 'cluster: true'"]
    issues = Issues()
    parse_risk_settings(Node.parse("store: {backend: redis, cluster: true, nodes: [redis://:pw@a:7000, "
                                   "redis://b:7001]}\n", "r.yaml", issues))
    assert [str(i).split(": ", 1)[1] for i in issues.errors] == [
        "store.nodes: the startup node URLs must share one scheme, user, password and ssl_* options"]
    single = parse_risk_settings(Node.parse("store: {backend: redis, url: redis://h:6379/0}\n", "r.yaml",
                                            Issues()))
    assert not single.store.cluster and single.store.urls == ("redis://h:6379/0",)


@pytest.mark.redis
async def test_redis_state_of_the_earlier_hash_format_carries_over(redis_server: RedisServer) -> None:
    """Decaying sums and account state written as hashes (the format before packed doubles) are
    read once and replaced: an upgraded gateway continues from them."""
    prefix = "t:legacy:"
    store = RedisSignalStore.from_url(redis_server.url, prefix=prefix, deadline=2.0)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        now = (await store.batch([])).now
        await client.hset(f"{prefix}{{d}}", mapping={"t": repr(now - 60.0), "v1": "8", "v2": "4"})
        await client.hset(f"{prefix}{{a:x}}", mapping={
            "l": repr(now - 10.0), "f": repr(now - 1000.0), "gm": "10", "gv": "1", "gk": "3", "h": "1",
            "hs": repr(now - 100.0), "tp": "tpl", "tc": "5", "c1": "7", "c2": "2"})
        result = await store.batch([DecayAdd("d", (1.0, 0.0), 60.0),
                                    AccountTouch("a:x", (1.0, 1.0), "tpl", 3600.0, 60.0)])
        (count, total), state = result.results
        assert 4.9 < count < 5.0 + 1e-6 and 1.9 < total < 2.0 + 1e-6  # one half-life, then + (1, 0)
        assert state.previous is not None and abs(state.previous - (now - 10.0)) < 1e-3
        assert abs(state.first_seen - (now - 1000.0)) < 1e-3 and state.gaps == 4
        assert state.top_template == "tpl" and 5.9 < state.top_count <= 6.0
        assert 7.9 < state.counts[0] <= 8.0 and 2.9 < state.counts[1] <= 3.0
        assert await client.type(f"{prefix}{{a:x}}") == b"string"
        again = (await store.batch([AccountTouch("a:x", (1.0, 1.0), "", 3600.0, 60.0)])).results[0]
        assert again.gaps == 5 and 8.9 < again.counts[0] <= 9.0
        assert 0 < await client.pttl(f"{prefix}{{a:x}}") <= 60_000
    finally:
        await client.aclose()
        await store.close()


def test_repeated_hll_and_decay_parameters_are_sent_once() -> None:
    """'H'/'D' stand for the previous 'h'/'d' parameters; amounts repeat only as one object."""
    from gateway.risk.redis_sigstore import _encode

    ev = (1.0, 0.5)
    ops: list[Op] = [HllAdd("t:x", "acct", 60.0), DecayAdd("tr:x", ev, 30.0), HllAdd("ip:y", "acct", 60.0),
                     DecayAdd("ce:y", ev, 30.0), HllAdd("p:y", "other", 60.0), HllAdd("q", "other", 90.0),
                     DecayAdd("ce:z", tuple([1.0, 0.5]), 30.0), DecayAdd("ce:w", ev, 45.0),
                     AccountTouch("a:acct", (1.0,), "", 60.0, 60.0), StateGet("fr:acct")]
    assert _encode(ops) == ["h", "acct", 60.0, "d", 30.0, 2, 1.0, 0.5, "H", "D", "h", "other", 60.0,
                            "h", "other", 90.0,
                            "d", 30.0, 2, 1.0, 0.5,  # equal amounts, another tuple: in full
                            "d", 45.0, 2, 1.0, 0.5,  # another half-life
                            "a", 60.0, 60.0, "", 1, 1.0, "g"]


async def test_repeated_and_changing_parameters_in_one_batch(harness: Harness) -> None:
    """A batch mixing repeated and new HLL members, windows, amounts and half-lives (the compact
    encoding on Redis) gives what the memory store gives."""
    store = harness.store
    await harness.align(WINDOW)
    ev, other = (1.0, 0.25), (2.0, 0.5)
    first = await store.batch([
        HllAdd("c1", "m1", WINDOW), DecayAdd("cd1", ev, 60.0), HllAdd("c2", "m1", WINDOW),
        DecayAdd("cd2", ev, 60.0), HllAdd("c1", "m2", WINDOW), HllAdd("c3", "m2", 2 * WINDOW),
        DecayAdd("cd3", other, 60.0), DecayAdd("cd1", other, 120.0), DecayAdd("cd4", other, 120.0),
        DecayAdd("cd5", (3.0,), 120.0), HllAdd("c2", "m3", WINDOW)])
    hll_c1a, cd1, hll_c2a, cd2, hll_c1b, hll_c3, cd3, cd1b, cd4, cd5, hll_c2b = first.results
    assert (hll_c1a, hll_c2a, hll_c1b, hll_c3, hll_c2b) == (1, 1, 2, 1, 2)
    assert cd1 == cd2 == ev and cd3 == cd4 == other and cd5 == (3.0,)
    assert cd1b[0] == pytest.approx(3.0, rel=1e-3) and cd1b[1] == pytest.approx(0.75, rel=1e-3)
    again = await store.batch([HllAdd("c1", "m1", WINDOW), HllAdd("c2", "m1", WINDOW),
                               DecayAdd("cd2", ev, 60.0), DecayAdd("cd3", ev, 60.0)])
    assert again.results[:2] == (2, 2)
    assert again.results[2][0] == pytest.approx(2.0, rel=1e-3)
    assert again.results[3][1] == pytest.approx(0.75, rel=1e-3)


@pytest.mark.redis
@pytest.mark.cluster
async def test_cluster_batch_follows_a_moved_slot(tmp_path: Path) -> None:
    """A slot moved mid-run (with its keys): the lean call is answered with MOVED and sent again
    through redis-py; the HyperLogLog's count carries on, and later batches route to the new
    primary."""
    cluster = start_cluster(tmp_path)
    store = RedisSignalStore.from_url(cluster.urls, cluster=True, prefix="t:moved:", deadline=2.0)
    try:
        batch = [HllAdd("acct", "m1", 60.0), HllAdd("net", "m1", 60.0)]
        assert list((await store.batch(batch)).results) == [1, 1]
        routes = store._routes
        assert routes is not None and not routes.cold
        slot = key_slot(b"t:moved:{acct}")
        assert slot != key_slot(b"t:moved:{net}")  # two slots: the batch is split
        cluster.move_slot(slot, (cluster.owner(slot) + 1) % len(cluster.nodes))
        moved = [HllAdd("acct", "m2", 60.0), HllAdd("net", "m2", 60.0)]
        assert list((await store.batch(moved)).results) == [2, 2]  # the state moved with the slot
        assert routes.redirects == 1
        again = [HllAdd("acct", "m3", 60.0), HllAdd("net", "m3", 60.0)]
        assert list((await store.batch(again)).results) == [3, 3]
        assert routes.redirects == 1 and not routes.cold
    finally:
        await store.close()
        cluster.stop()
