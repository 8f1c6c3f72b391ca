"""The quota store's lean connections to a Redis Cluster's primaries, against a real cluster:
routing by slot, redirections after a slot moves, reconciles per primary, dropped connections."""

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
    assert routes is not None and not routes.cold
    a, b = keys_on_two_primaries(store, redis_cluster)
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
        fourth = await store.charge([window(key, 5)])
        assert fourth.allowed and fourth.states[0].remaining == 1
        assert routes.redirects == 1 and not routes.cold  # routed to the new primary directly
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


async def test_a_primary_killed_and_restarted(tmp_path: Path) -> None:
    """A primary dies (its slots uncovered: no replicas here): calls to its slots fail with
    StoreError within the deadline, calls to the others keep working; once it is back (same port
    and cluster config, data lost) its slots are served again over the lean connections."""
    cluster = start_cluster(tmp_path)
    store = RedisStore.from_url(cluster.urls, cluster=True, deadline=0.5)
    try:
        a, b = keys_on_two_primaries(store, cluster)
        for _ in range(2):
            assert (await store.charge([window(a, 100), window(b, 100)])).allowed
        victim = cluster.owner(key_slot(store.key(a).encode()))
        cluster.nodes[victim].kill()
        with pytest.raises(StoreError):
            await store.charge([window(a, 100)])
        routes = store.routes
        assert routes is not None
        survivor = await store.charge([window(b, 100)])
        assert survivor.allowed and survivor.states[0].remaining == 97
        cluster.nodes[victim].start()
        for _ in range(100):  # the node rejoins; redis-py's map and then the routes follow
            try:
                back = await store.charge([window(a, 100), window(b, 100)])
                break
            except StoreError:
                await asyncio.sleep(0.1)
        else:
            pytest.fail("the restarted primary's slots were not served again")
        assert back.allowed and [s.remaining for s in back.states] == [99, 96]  # a's state was lost
        after = await store.charge([window(a, 100), window(b, 100)])
        assert [s.remaining for s in after.states] == [98, 95] and not routes.cold
    finally:
        await store.close()
        cluster.stop()
