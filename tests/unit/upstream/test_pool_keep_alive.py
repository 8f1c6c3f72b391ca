"""The pooled client's keep-alive connections: a request on one the upstream closed meanwhile (sent
again only when that is safe), and how long an idle one may be reused (idle_timeout, the upstream's
``Keep-Alive: timeout=N``), on both upstream clients where both have the limit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.upstream.base import UpstreamConnectError, idle_limit
from gateway.upstream.client import AiohttpUpstream
from gateway.upstream.pool import PooledUpstream
from tests.support.raw_upstream import Exchange, RawFactory
from tests.support.upstream_clients import CLIENTS, assert_pool_empty, fetch, ok, pool

# -- stale keep-alive connections ------------------------------------------------------------------

async def stale_second(ex: Exchange) -> bool:
    """Answers keep-alive, then closes on the connection's second request without a byte."""
    if ex.conn == 1 and ex.n > 1:
        return False
    ex.writer.write(ok(ex.n))
    return True


async def test_a_get_on_a_stale_connection_is_sent_again_on_a_new_one(raw_upstream: RawFactory) -> None:
    upstream = await raw_upstream(stale_second)
    client = pool(upstream.port)
    try:
        assert await fetch(client) == b'{"n": 1}'
        assert await fetch(client, "GET") == b'{"n": 3}'
        assert [(ex.conn, ex.method) for ex in upstream.requests] == [(1, b"POST"), (1, b"GET"), (2, b"GET")]
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_a_post_on_a_stale_connection_is_not_sent_again(raw_upstream: RawFactory) -> None:
    upstream = await raw_upstream(stale_second)
    client = pool(upstream.port)
    try:
        await fetch(client)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(client)
        assert [(ex.conn, ex.method) for ex in upstream.requests] == [(1, b"POST"), (1, b"POST")]
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_a_get_is_not_sent_again_after_response_bytes_or_on_a_new_connection(
        raw_upstream: RawFactory) -> None:
    async def respond(ex: Exchange) -> bool:
        if ex.n == 2:
            ex.writer.write(b"HTTP/1.1 200")  # part of a head, then the connection drops
            await ex.writer.drain()
            return False
        if ex.n == 3:
            return False  # a new connection closed at once: not a stale keep-alive race
        ex.writer.write(ok(ex.n))
        return True

    upstream = await raw_upstream(respond)
    client = pool(upstream.port)
    try:
        await fetch(client)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(client, "GET")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(client, "GET")
        assert len(upstream.requests) == 3
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_a_failed_reconnect_gives_the_slot_back(raw_upstream: RawFactory) -> None:
    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            ex.writer.write(ok(ex.n))
            upstream.stop_accepting()  # no new connections from now on
            return True
        return False

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, pool_size=1)
    try:
        await fetch(client)
        with pytest.raises(UpstreamConnectError):
            await fetch(client, "GET")
        assert client._open == 0 and not client._busy
    finally:
        await client.close()


# -- keep-alive limits ------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "limit"), [
    (None, 15.0),
    ("timeout=5, max=100", 4.0),  # Apache's form: a second less, for the race of its close
    ("max=100, TIMEOUT = 30", 15.0),  # ours is shorter
    ('timeout="3"', 2.0),
    ("timeout=1", 0.0),  # no safe window: not reused
    ("timeout=0", 0.0),
    ("timeout=-4", 0.0),
    ("timeout=soon", 15.0),  # unreadable: ignored
    ("timeout=nan", 15.0),
    ("max=5", 15.0),
    ("", 15.0),
])
def test_idle_limit_from_a_keep_alive_header(header: str | None, limit: float) -> None:
    assert idle_limit(header, 15.0) == limit


def keep_alive(n: int, seconds: int | None) -> bytes:
    head, _, body = ok(n).partition(b"\r\n\r\n")
    extra = b"" if seconds is None else b"\r\nKeep-Alive: timeout=%d" % seconds
    return head + extra + b"\r\n\r\n" + body


@contextlib.contextmanager
def idle_for(client: PooledUpstream | AiohttpUpstream, seconds: float) -> Iterator[None]:
    """The client's idle connections look ``seconds`` older, rather than the test sleeping: the
    pool's are backdated, the session's connector and protocols read the loop's clock."""
    if isinstance(client, PooledUpstream):
        for conn in client._idle:
            conn.last_activity -= seconds
        yield
        return
    loop = asyncio.get_running_loop()
    real = loop.time
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "time", lambda: real() + seconds)
        patch.setattr(aiohttp.connector, "monotonic", lambda: real() + seconds)
        yield


@CLIENTS
async def test_idle_timeout_is_exact_at_reuse_not_at_the_next_sweep(
        raw_upstream: RawFactory, make: Any) -> None:
    """The pool's sweeper ticks every second here (read_timeout 300 s); a connection idle past
    idle_timeout must still not be handed out between two ticks."""

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(ok(ex.n))
        return True

    upstream = await raw_upstream(respond)
    client = make(upstream.port, idle_timeout=0.15)
    try:
        await fetch(client)
        await fetch(client)
        await asyncio.sleep(0.25)
        await fetch(client)
        assert [ex.conn for ex in upstream.requests] == [1, 1, 2]
    finally:
        await client.close()


@CLIENTS
async def test_an_upstream_keep_alive_timeout_shortens_the_idle_limit(
        raw_upstream: RawFactory, make: Any) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(keep_alive(ex.n, 2))  # 2 s announced: kept idle for 1 s at most
        return True

    upstream = await raw_upstream(respond)
    client = make(upstream.port)
    try:
        await fetch(client)
        await fetch(client)  # within the limit: reused
        with idle_for(client, 1.1):
            await fetch(client)
        assert [ex.conn for ex in upstream.requests] == [1, 1, 2]
    finally:
        await client.close()


@CLIENTS
async def test_a_keep_alive_timeout_of_one_second_is_never_reused(
        raw_upstream: RawFactory, make: Any) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(keep_alive(ex.n, 1))
        return True

    upstream = await raw_upstream(respond)
    client = make(upstream.port)
    try:
        for n in (1, 2, 3):
            assert await fetch(client) == b'{"n": %d}' % n
        assert [ex.conn for ex in upstream.requests] == [1, 2, 3]
        if isinstance(client, PooledUpstream):
            assert client._open == 0 and not client._idle
    finally:
        await client.close()


@CLIENTS
async def test_an_idle_timeout_of_zero_means_a_connection_per_request(
        raw_upstream: RawFactory, make: Any) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(ok(ex.n))
        return True

    upstream = await raw_upstream(respond)
    client = make(upstream.port, idle_timeout=0.0)
    try:
        for _ in range(3):
            await fetch(client)
        assert [ex.conn for ex in upstream.requests] == [1, 2, 3]
    finally:
        await client.close()


async def test_the_sweeper_closes_connections_past_their_own_limits(raw_upstream: RawFactory) -> None:
    """Limits differ per connection: the idle list's order is not the order of expiry."""

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(keep_alive(ex.n, 3 if ex.conn == 1 else None))  # conn 1: 2 s; conn 2: idle_timeout
        return True

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, idle_timeout=10.0, pool_size=2)
    try:
        await asyncio.gather(fetch(client), fetch(client))
        assert len(client._idle) == 2
        now = asyncio.get_running_loop().time()
        client._expire(now + 5, 300.0)
        assert len(client._idle) == 1 and client._idle[0].idle_limit == 10.0
        assert_pool_empty(client)
        client._expire(now + 11, 300.0)
        assert not client._idle and client._open == 0
    finally:
        await client.close()
