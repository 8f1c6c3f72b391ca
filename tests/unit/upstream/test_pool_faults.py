"""The pooled client against a buggy or hostile upstream: what it raises, what it never reuses,
and that no failure leaks a pool slot. Stale and idle keep-alive connections are in
test_pool_keep_alive.py, the deadlines in test_pool_deadlines.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.upstream.base import UpstreamProtocolError
from tests.support.raw_upstream import Exchange, RawFactory
from tests.support.upstream_clients import CLIENTS, HEADERS, assert_pool_empty, fetch, ok, pool

# -- errors the caller can map to a 502 ----------------------------------------------------------

@CLIENTS
async def test_a_malformed_chunk_mid_body_fails_the_read_at_once(raw_upstream: RawFactory, make: Any) -> None:
    """aiohttp fails the connection but not the body: its reader waited forever (and the read
    timeout went with the connection). Both clients install the fix."""

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await ex.writer.drain()
        await asyncio.sleep(0.05)
        ex.writer.write(b"not-a-size\r\n")
        await asyncio.sleep(10)
        return False

    upstream = await raw_upstream(respond)
    client = make(upstream.port)
    try:
        async with client.request("POST", "/v1/x", HEADERS, b"{}") as response:
            assert await response.content.readany() == b"abc"
            with pytest.raises(aiohttp.ClientPayloadError, match="malformed"):
                async with asyncio.timeout(2):
                    await response.content.readany()
    finally:
        await client.close()


def test_the_session_connector_still_builds_protocols_from_its_factory() -> None:
    """The session client swaps the connector's ``_factory``; an aiohttp that renamed it would
    silently drop the fix above."""
    import inspect

    source = inspect.getsource(aiohttp.connector.TCPConnector)
    assert "self._factory" in source


@pytest.mark.parametrize("head", [
    b"NOT HTTP\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
], ids=["not-http", "te-and-cl", "header-too-large", "two-lengths"])
async def test_a_malformed_head_raises_a_protocol_error(raw_upstream: RawFactory, head: bytes) -> None:
    async def respond(ex: Exchange) -> bool:
        ex.writer.write(head if ex.n == 1 else ok(ex.n))
        return ex.n > 1

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, pool_size=1)
    try:
        with pytest.raises(UpstreamProtocolError, match="malformed response head"):
            await fetch(client)
        assert await fetch(client) == b'{"n": 2}'
        assert upstream.connections == 2
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_endless_interim_responses_are_refused(raw_upstream: RawFactory) -> None:
    async def respond(ex: Exchange) -> bool:
        for _ in range(1000):
            ex.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await ex.writer.drain()
            await asyncio.sleep(0)
        return False

    upstream = await raw_upstream(respond)
    client = pool(upstream.port)
    try:
        with pytest.raises(UpstreamProtocolError, match="interim"):
            await fetch(client)
    finally:
        await client.close()


# -- never reused with a response on it ----------------------------------------------------------

async def test_a_caller_failing_mid_read_does_not_hand_its_response_on(raw_upstream: RawFactory) -> None:
    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
            await ex.writer.drain()
            await asyncio.sleep(0.05)
            ex.writer.write(b"67890")
            return True
        ex.writer.write(ok(ex.n))
        return True

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, pool_size=1)
    try:
        with pytest.raises(RuntimeError):
            async with client.request("POST", "/v1/x", HEADERS, b"{}") as response:
                await response.content.readany()
                raise RuntimeError("the relay failed")
        assert await fetch(client) == b'{"n": 2}'
        assert upstream.connections == 2
    finally:
        await client.close()


async def test_a_response_announcing_close_is_not_reused_even_if_the_socket_stays_open(
        raw_upstream: RawFactory) -> None:
    async def respond(ex: Exchange) -> bool:
        close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        ex.writer.write(close if ex.n == 1 else ok(ex.n))
        return True  # and keeps serving: a client trusting the socket would reuse it

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, pool_size=1)
    try:
        assert await fetch(client) == b"ok"
        assert await fetch(client) == b'{"n": 2}'
        assert upstream.connections == 2
    finally:
        await client.close()


# -- pool accounting --------------------------------------------------------------------------------

async def test_two_hundred_failures_of_every_kind_leak_no_slot(raw_upstream: RawFactory) -> None:
    healthy = False
    most_open = 0  # the pool's own count, sampled as each request arrives

    async def respond(ex: Exchange) -> bool:
        nonlocal most_open
        most_open = max(most_open, client._open, len(client._busy))
        if healthy:
            ex.writer.write(ok(ex.n))
            return True
        kind = ex.n % 6
        if kind == 0:
            return False  # closed before a byte
        if kind == 1:
            ex.writer.write(b"garbage\r\n\r\n")
        elif kind == 2:
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{")  # then EOF
            return False
        elif kind == 3:
            ex.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
            await ex.writer.drain()
            await asyncio.sleep(0.01)
            ex.writer.write(b"zz\r\n")
        elif kind == 4:
            await asyncio.sleep(0.3)  # silent past the read timeout
        else:
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")  # the caller gives up
        await ex.writer.drain()
        await asyncio.sleep(0.5)
        return False

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, pool_size=2, read_timeout=0.1)

    async def one(i: int) -> str:
        try:
            async with client.request("POST", "/v1/x", HEADERS, b"{}") as response:
                if i % 7 == 0:
                    raise asyncio.CancelledError  # the client went away mid-response
                await response.read()
        except asyncio.CancelledError:
            return "cancelled"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__
        return "ok"

    try:
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(*(one(i) for i in range(200)))
        assert "ok" not in outcomes and len(set(outcomes)) >= 4, set(outcomes)
        assert most_open == 2
        assert_pool_empty(client)
        healthy = True
        async with asyncio.timeout(5):
            assert len(await asyncio.gather(*(fetch(client) for _ in range(10)))) == 10
        assert most_open == 2
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_a_waiter_is_woken_when_a_failed_connection_is_discarded(raw_upstream: RawFactory) -> None:
    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            await asyncio.sleep(0.1)
            ex.writer.write(b"garbage\r\n\r\n")
            return True
        ex.writer.write(ok(ex.n))
        return True

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, pool_size=1, connect_timeout=5)
    try:
        first = asyncio.create_task(fetch(client))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        assert await fetch(client) == b'{"n": 2}'  # served when the first one's slot came back
        assert time.monotonic() - started < 1
        with pytest.raises(UpstreamProtocolError):
            await first
        assert_pool_empty(client)
    finally:
        await client.close()
