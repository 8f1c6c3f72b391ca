"""Charges given up on while Redis still runs them: past the store deadline, or cancelled because
the client went away. Nobody acts on such a charge's result, so whatever Redis applied must be
refunded when its reply comes after all, against real Redis servers paused with CLIENT PAUSE.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.store.base import Adjustment, Algorithm, Charge, StoreError
from gateway.store.redis import RedisStore
from gateway.store.resp import RespProtocol, pack
from tests.support.redis_servers import RedisClusterServers, RedisServer

pytestmark = pytest.mark.redis


def window(key: str, n: int, cost: int) -> Charge:
    return Charge(key, Algorithm.WINDOW, n, 60_000, cost)


def lease(key: str, n: int, lease_id: str) -> Charge:
    return Charge(key, Algorithm.LEASE, n, 60_000, 1, lease_id=lease_id)


def pause(port: int, ms: int) -> None:
    """Redis stops answering every client for ``ms`` (commands already sent run afterwards)."""
    subprocess.run(["redis-cli", "-p", str(port), "client", "pause", str(ms), "all"], check=True,
                   capture_output=True)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.02)


async def remaining(store: RedisStore, charge: Charge) -> int:
    """What a limit has left, read with a zero-cost charge (a lease charge would take a slot)."""
    probe = window(charge.key, charge.limit, 0) if charge.algorithm is Algorithm.WINDOW else None
    if probe is None:  # a lease: admitted only while a slot is free; release it again
        result = await store.charge([lease(charge.key, charge.limit, "probe")])
        if result.allowed:
            await store.adjust([Adjustment(result.receipts[0], -1)])
        return result.states[0].remaining + (1 if result.allowed else 0)
    return (await store.charge([probe])).states[0].remaining


async def test_a_charge_past_its_deadline_is_refunded_when_redis_answers_after_all(
        redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    store = RedisStore.from_url(server.url, deadline=0.05)
    budget, slots = window("late-budget", 1000, 300), lease("late-conc", 1, "req-1")
    try:
        assert (await store.charge([window("late-budget", 1000, 0)])).allowed  # connected
        pause(server.port, 300)
        with pytest.raises(StoreError, match="deadline of 50 ms"):
            await store.charge([budget, slots])
        # The failure mode decided that request; the script runs once the pause ends and what it
        # reserved (300 tokens, the only concurrency slot) is given back.
        await eventually(lambda: _true(store.stats.abandoned_refunds == 1))
        await eventually(lambda: _equals(remaining(store, budget), 1000))
        assert await remaining(store, slots) == 1
        assert store.stats.abandoned_unknown == 0 and store.stats.abandoned_refund_failures == 0
    finally:
        await store.close()


async def test_a_cancelled_charge_is_refunded(redis_server_factory: Callable[[], RedisServer]) -> None:
    """The request's task is cancelled (aiohttp cancels the handler when the client disconnects)
    while its charge waits on Redis: the charge still runs, and is undone."""
    server = redis_server_factory()
    store = RedisStore.from_url(server.url, deadline=2.0)
    budget, slots = window("cx-budget", 1000, 400), lease("cx-conc", 1, "req-2")
    try:
        assert (await store.charge([window("cx-budget", 1000, 0)])).allowed
        pause(server.port, 300)
        task = asyncio.ensure_future(store.charge([budget, slots]))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: _true(store.stats.abandoned_refunds == 1))
        await eventually(lambda: _equals(remaining(store, budget), 1000))
        assert await remaining(store, slots) == 1
        # A denied charge applied nothing, so an abandoned denial refunds nothing.
        assert (await store.charge([window("cx-full", 10, 10)])).allowed
        pause(server.port, 200)
        denied = asyncio.ensure_future(store.charge([window("cx-full", 10, 5)]))
        await asyncio.sleep(0.05)
        denied.cancel()
        await asyncio.sleep(0.4)
        assert store.stats.abandoned_refunds == 1
        assert await remaining(store, window("cx-full", 10, 0)) == 0
    finally:
        await store.close()


async def test_an_abandoned_charge_on_a_lost_connection_is_counted_as_unknown(
        redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    store = RedisStore.from_url(server.url, deadline=0.05)
    try:
        assert (await store.charge([window("gone", 10, 0)])).allowed
        pause(server.port, 2000)
        with pytest.raises(StoreError):
            await store.charge([window("gone", 10, 1)])
        server.kill()  # the reply never comes: whether the script ran cannot be known
        await eventually(lambda: _true(store.stats.abandoned_unknown == 1))
        assert store.stats.abandoned_refunds == 0
    finally:
        await store.close()


@pytest.mark.cluster
async def test_a_cancelled_charge_across_primaries_is_refunded_on_each(
        redis_cluster: RedisClusterServers) -> None:
    """In a Cluster a request's limits may live on several primaries, each charged by its own
    call: cancelled after one answered and while the other waits, both are refunded."""
    store = RedisStore.from_url(redis_cluster.urls, cluster=True, deadline=2.0)
    try:
        await store.client.flushall()
        assert (await store.charge([window("ab-warm", 10, 1)])).allowed  # redis-py's slot map
        first = "ab-0"
        home = redis_cluster.owner(key_slot(store.key(first).encode()))
        second = next(f"ab-{i}" for i in range(1, 1000)
                      if redis_cluster.owner(key_slot(store.key(f"ab-{i}").encode())) != home)
        waits = redis_cluster.owner(key_slot(store.key(second).encode()))
        charges = [window(first, 100, 30), window(second, 100, 40)]
        # both routes warm (lean connections to both primaries)
        assert (await store.charge([window(first, 100, 0), window(second, 100, 0)])).allowed
        pause(redis_cluster.nodes[waits].port, 300)
        task = asyncio.ensure_future(store.charge(charges))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: _equals(remaining(store, charges[0]), 100))
        await eventually(lambda: _equals(remaining(store, charges[1]), 100))
        assert store.stats.abandoned_refunds == 2  # one per slot's call
    finally:
        await store.close()


async def test_a_reply_that_came_before_the_claim_is_not_lost() -> None:
    """The caller's wake-up (cancelled, or past its deadline) can be queued behind its reply, when
    both are delivered in one event-loop turn: the protocol keeps such a reply until the caller
    has had its turn to claim it. The protocol talks to one end of a socket pair; the test plays
    Redis on the other, so it decides when each reply is delivered."""
    loop = asyncio.get_running_loop()
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    _, proto = await loop.create_connection(RespProtocol, sock=ours)
    assert isinstance(proto, RespProtocol)
    try:
        late: list[Any] = []
        # Answered, then the caller gave up before it resumed: handed over at once.
        answered = proto.send(pack("ECHO", "one"))
        peer.send(b"$3\r\none\r\n")
        await asyncio.wait_for(asyncio.shield(answered), 1)
        proto.claim_late(answered, late.append)
        assert late == [b"one"]
        # Given up on, and its reply delivered before the caller's wake-up runs.
        cancelled = proto.send(pack("ECHO", "two"))
        claimed = loop.create_future()

        def claim(_: asyncio.Future[Any]) -> None:  # where the caller's except block would run
            proto.claim_late(cancelled, late.append)
            claimed.set_result(None)

        cancelled.add_done_callback(claim)
        cancelled.cancel()  # the wake-up is queued now...
        proto.data_received(b"$3\r\ntwo\r\n")  # ...and the reply arrives in the same turn
        await claimed
        assert late == [b"one", b"two"]
        # Given up on and never claimed: the reply is dropped and the stream stays in step.
        ignored = proto.send(pack("ECHO", "three"))
        ignored.cancel()
        following = proto.send(pack("ECHO", "four"))
        peer.send(b"$5\r\nthree\r\n$4\r\nfour\r\n")
        assert await asyncio.wait_for(following, 1) == b"four"
        await asyncio.sleep(0)
        assert not proto._unclaimed and not proto._late and late == [b"one", b"two"]
        # Claimed, then the connection is lost: the claimant learns the outcome is unknown.
        lost = proto.send(pack("ECHO", "five"))
        lost.cancel()
        proto.claim_late(lost, late.append)
        peer.close()
        await asyncio.sleep(0.05)
        assert isinstance(late[-1], RedisConnectionError) and proto.closed
    finally:
        proto.abort(RedisConnectionError("test over"))
        peer.close()


async def _true(value: bool) -> bool:
    return value


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
