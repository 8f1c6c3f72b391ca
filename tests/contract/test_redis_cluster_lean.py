"""The quota store's lean connections to a Redis Cluster's primaries, against a real cluster:
routing by slot, redirections after a slot moves, reconciles per primary, dropped connections,
one primary down (only its slots cold) and back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from gateway.store.base import Adjustment, Algorithm, Charge, StoreError
from gateway.store.redis import RedisStore
from tests.contract.conftest import TEST_DEADLINE
from tests.support.redis_servers import RedisClusterServers, node_command, start_cluster

pytestmark = [pytest.mark.redis, pytest.mark.cluster]


def window(key: str, n: int, cost: int = 1) -> Charge:
    return Charge(key, Algorithm.WINDOW, n, 60_000, cost)


def keys_on_two_primaries(store: RedisStore, cluster: RedisClusterServers) -> tuple[str, str]:
    first = "lean-a"
    home = cluster.owner(key_slot(store.key(first).encode()))
    other = next(f"lean-{i}" for i in range(1000)
                 if cluster.owner(key_slot(store.key(f"lean-{i}").encode())) != home)
    return first, other


def keys_by_primary(store: RedisStore, cluster: RedisClusterServers, prefix: str) -> list[str]:
    """One key per primary, in node order (the slot map read once)."""
    ports = [n.port for n in cluster.nodes]
    ranges = [(start, end, ports.index(int(primary[1])))
              for start, end, primary, *_ in cluster.command(0, "CLUSTER", "SLOTS")]
    found: dict[int, str] = {}
    for i in range(10_000):
        key = f"{prefix}-{i}"
        slot = key_slot(store.key(key).encode())
        found.setdefault(next(node for start, end, node in ranges if start <= slot <= end), key)
        if len(found) == len(ports):
            return [found[node] for node in range(len(ports))]
    raise AssertionError("no key found for every primary")


@pytest.fixture
async def lean_cluster_store(redis_cluster: RedisClusterServers) -> AsyncIterator[RedisStore]:
    store = RedisStore.from_url(redis_cluster.urls, cluster=True, deadline=TEST_DEADLINE)
    await store.client.flushall()
    assert (await store.charge([window("warm-up", 10)])).allowed  # redis-py builds its slot map
    yield store
    await store.close()


async def test_charges_across_primaries_go_over_lean_connections(
        lean_cluster_store: RedisStore, redis_cluster: RedisClusterServers) -> None:
    store = lean_cluster_store
    routes = store.routes
    assert routes is not None and routes.cold_nodes == [] and not routes.cold
    a, b = keys_on_two_primaries(store, redis_cluster)
    through_client = routes.client_calls
    results = await asyncio.gather(*(store.charge([window(a, 20), window(b, 10)]) for _ in range(30)))
    assert routes.connections >= 2  # one per primary reached, opened by the first calls
    admitted = sum(r.allowed for r in results)
    assert 1 <= admitted <= 10  # never over: a denial in one slot refunds the other
    used_a = 20 - (await store.charge([window(a, 20, 0)])).states[0].remaining
    used_b = 10 - (await store.charge([window(b, 10, 0)])).states[0].remaining
    assert (used_a, used_b) == (admitted, admitted)  # every refund applied: nothing leaked
    assert store.stats.compensations >= 1 and store.stats.compensation_failures == 0
    later = [await store.charge([window(a, 20), window(b, 10)]) for _ in range(12)]
    assert admitted + sum(r.allowed for r in later) == 10
    denied = later[-1]
    assert [s.allowed for s in denied.states] == [True, False]
    assert denied.states[0].remaining == 10  # a's state as refunded (10 of 20 used), not as charged
    assert routes.redirects == 0 and not routes.cold
    assert routes.client_calls == through_client  # every call on the lean connections


async def test_reconciles_ride_on_each_primary(lean_cluster_store: RedisStore,
                                               redis_cluster: RedisClusterServers) -> None:
    store = lean_cluster_store
    a, b = keys_on_two_primaries(store, redis_cluster)
    result = await store.charge([window(a, 100, 10), window(b, 100, 10)])
    assert result.allowed
    outcomes: list[StoreError | None] = []
    queued = store.adjust_soon([Adjustment(r, -7) for r in result.receipts], outcomes.append)
    assert queued  # not the awaited path
    for _ in range(200):
        if outcomes:
            break
        await asyncio.sleep(0.005)
    assert outcomes == [None]  # told once, after both primaries answered
    after = await store.charge([window(a, 100, 0), window(b, 100, 0)])
    assert [s.remaining for s in after.states] == [97, 97]


async def test_dropped_connections_reconnect_and_stay_exact(
        lean_cluster_store: RedisStore, redis_cluster: RedisClusterServers) -> None:
    store = lean_cluster_store
    a, b = keys_on_two_primaries(store, redis_cluster)
    admitted = 0
    for _ in range(5):
        admitted += (await store.charge([window(a, 50), window(b, 50)])).allowed
    for node in redis_cluster.nodes:  # every client connection, the lean ones included
        node_command(node.port, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    await asyncio.sleep(0.05)
    failures = 0
    for _ in range(30):  # until 10 more are admitted: each dropped connection may fail one call
        try:
            admitted += (await store.charge([window(a, 50), window(b, 50)])).allowed
        except StoreError:
            failures += 1  # a call caught by the drop (never resent: it may have run)
        if admitted == 15:
            break
    assert admitted == 15 and failures <= 2 * len(redis_cluster.nodes)
    after = await store.charge([window(a, 50, 0), window(b, 50, 0)])
    assert [50 - s.remaining for s in after.states] == [admitted, admitted]


async def test_a_moved_slot_is_followed(tmp_path: Path) -> None:
    """A slot moved to another primary (with its keys) mid-run: the lean call is answered with
    MOVED, sent again through redis-py, and later calls route to the new primary."""
    cluster = start_cluster(tmp_path)
    store = RedisStore.from_url(cluster.urls, cluster=True, deadline=TEST_DEADLINE)
    try:
        key = "moving"
        for _ in range(2):
            assert (await store.charge([window(key, 5)])).allowed
        routes = store.routes
        assert routes is not None and not routes.cold and routes.redirects == 0
        slot = key_slot(store.key(key).encode())
        dst = (cluster.owner(slot) + 1) % len(cluster.nodes)
        cluster.move_slot(slot, dst)
        assert cluster.owner(slot) == dst

        third = await store.charge([window(key, 5)])
        assert third.allowed and third.states[0].remaining == 2  # the state moved with the slot
        assert routes.redirects == 1
        through_client = routes.client_calls  # the redirected call, resent through redis-py
        fourth = await store.charge([window(key, 5)])
        assert fourth.allowed and fourth.states[0].remaining == 1
        assert routes.redirects == 1 and not routes.cold  # routed to the new primary directly
        assert routes.cold_nodes == [] and routes.client_calls == through_client
    finally:
        await store.close()
        cluster.stop()


async def test_a_cluster_with_a_password(tmp_path: Path) -> None:
    """The startup URLs' password reaches every node the client discovers, the lean connections
    included (they AUTH as they connect); without it every call is refused."""
    cluster = start_cluster(tmp_path, password="tg-s3cret")
    store = RedisStore.from_url(cluster.urls, cluster=True, deadline=TEST_DEADLINE)
    anonymous = RedisStore.from_url([f"redis://127.0.0.1:{n.port}/0" for n in cluster.nodes], cluster=True,
                                    deadline=TEST_DEADLINE)
    try:
        a, b = keys_on_two_primaries(store, cluster)
        results = [await store.charge([window(a, 3), window(b, 3)]) for _ in range(4)]
        assert [r.allowed for r in results] == [True, True, True, False]
        routes = store.routes
        assert routes is not None and not routes.cold and routes.connections >= 2
        with pytest.raises(StoreError):
            await anonymous.charge([window(a, 3)])
    finally:
        await anonymous.close()
        await store.close()
        cluster.stop()


async def test_a_dead_primary_is_cold_alone(tmp_path: Path) -> None:
    """A primary dies (no replica here, so no failover): only its slots leave the lean path.
    Calls for them fail with StoreError (the first on the lean connection, which is never
    resent, then through redis-py); charges on the other primaries stay on their lean
    connections, exact, refunds of a cross-slot charge caught by the dead slot included, and do
    not flap the dead primary warm. Once it is back (same port and cluster config, data lost),
    a call through redis-py succeeds and its slots return to the lean path."""
    cluster = start_cluster(tmp_path)
    for node in range(len(cluster.nodes)):  # survivors keep serving their slots past the node timeout
        cluster.command(node, "CONFIG", "SET", "cluster-require-full-coverage", "no")
    store = RedisStore.from_url(cluster.urls, cluster=True, deadline=0.5)
    try:
        dead, live, other = keys_by_primary(store, cluster, "cold")
        assert (await store.charge([window(dead, 100), window(live, 100), window(other, 1000)])).allowed
        warm = await store.charge([window(dead, 100), window(live, 100), window(other, 1000)])
        assert warm.allowed
        dead_receipt = warm.receipts[0]
        routes = store.routes
        assert routes is not None and routes.cold_nodes == [] and routes.connections == 3
        dead_slot = key_slot(store.key(dead).encode())
        through_client = routes.client_calls

        cluster.nodes[0].kill()
        with pytest.raises(StoreError):
            await store.charge([window(dead, 100)])
        assert routes.client_calls == through_client  # it failed on the lean connection
        assert routes.cold_nodes == [f"127.0.0.1:{cluster.nodes[0].port}"]
        assert routes.connection(dead_slot) is None
        for _ in range(5):  # the dead primary through redis-py, the others lean: no flapping
            with pytest.raises(StoreError):
                await store.charge([window(dead, 100)])
            assert (await store.charge([window(live, 100)])).allowed
        assert routes.client_calls == through_client + 5
        assert routes.cold_nodes == [f"127.0.0.1:{cluster.nodes[0].port}"]

        # Concurrent cross-slot charges on the live primaries: the pipelined lean path, exact.
        results = await asyncio.gather(*(store.charge([window(live, 100, 2), window(other, 1000)])
                                         for _ in range(60)))
        assert sum(r.allowed for r in results) == 46  # live had 7 of 100 used; other never denies
        compensations = store.stats.compensations
        with pytest.raises(StoreError):  # spans the dead slot: what the live slot applied is refunded
            await store.charge([window(live, 100), window(dead, 100)])
        assert store.stats.compensations == compensations + 1 and store.stats.compensation_failures == 0
        outcomes: list[StoreError | None] = []
        settle = await store.charge([window(other, 1000, 5)])
        assert store.adjust_soon([Adjustment(settle.receipts[0], -5)], outcomes.append)  # queued lean
        # a reconcile for the cold primary's slot: not queued (the caller awaits it through redis-py)
        assert not store.adjust_soon([Adjustment(dead_receipt, -1)], outcomes.append)
        for _ in range(100):
            if outcomes:
                break
            await asyncio.sleep(0.005)
        assert outcomes == [None]
        after = await store.charge([window(live, 100, 0), window(other, 1000, 0)])
        # refunds applied, nothing leaked: 2 + 5 + 2 × 46 of live's 100, 2 + 46 of other's 1000
        assert [100 - after.states[0].remaining, 1000 - after.states[1].remaining] == [99, 48]
        assert routes.client_calls == through_client + 6  # the cross-slot charge's dead slot only
        assert routes.cold_nodes == [f"127.0.0.1:{cluster.nodes[0].port}"]

        cluster.nodes[0].start()
        for _ in range(100):  # the node rejoins; a call through redis-py warms its slots
            try:
                back = await store.charge([window(dead, 100)])
                break
            except StoreError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the restarted primary's slots were not served again")
        assert back.allowed and back.states[0].remaining == 99  # its state was lost
        assert routes.cold_nodes == [] and not routes.cold
        through_client, connections = routes.client_calls, routes.connections
        again = await store.charge([window(dead, 100)])
        assert again.allowed and again.states[0].remaining == 98
        assert routes.connections == connections + 1  # reconnected lean to the restarted primary
        every = await store.charge([window(dead, 100), window(live, 100), window(other, 1000)])
        assert every.allowed and [s.remaining for s in every.states] == [97, 0, 951]
        assert routes.client_calls == through_client
    finally:
        await store.close()
        cluster.stop()
