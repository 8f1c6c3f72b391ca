"""The pooled client's deadlines against a slow upstream: connecting, waiting for a free
connection, and a read timeout of zero."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.upstream.pool import PooledUpstream
from tests.support.raw_upstream import Exchange, RawFactory
from tests.support.upstream_clients import fetch, ok, pool


async def test_connecting_is_bounded_by_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def never(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(3600)  # a SYN into a black hole

    monkeypatch.setattr(loop, "create_connection", never)
    client = pool(9, connect_timeout=0.2, pool_size=1)
    try:
        for _ in range(2):  # and the slot comes back each time
            started = time.monotonic()
            with pytest.raises(aiohttp.ConnectionTimeoutError, match="timed out"):
                await fetch(client)
            assert time.monotonic() - started < 1
        assert client._open == 0
    finally:
        await client.close()


async def test_waiting_for_a_free_connection_is_bounded_by_connect_timeout(raw_upstream: RawFactory) -> None:
    release = asyncio.Event()

    async def respond(ex: Exchange) -> bool:
        await release.wait()
        ex.writer.write(ok(ex.n))
        return True

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, pool_size=1, connect_timeout=0.2)
    try:
        holder = asyncio.create_task(fetch(client))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(aiohttp.ConnectionTimeoutError, match="no free connection"):
            await fetch(client)
        assert 0.15 < time.monotonic() - started < 1
        assert not client._waiters  # the timed-out waiter left the queue
        release.set()
        assert await holder == b'{"n": 1}'
        assert await fetch(client) == b'{"n": 2}'
    finally:
        await client.close()


async def test_a_read_timeout_of_zero_means_none(
        raw_upstream: RawFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in aiohttp's ClientTimeout (the session client); the sweeper must not spin on it."""
    sweeps = 0
    expire = PooledUpstream._expire

    def counting(self: PooledUpstream, now: float, read_timeout: float) -> None:
        nonlocal sweeps
        sweeps += 1
        expire(self, now, read_timeout)

    monkeypatch.setattr(PooledUpstream, "_expire", counting)

    async def respond(ex: Exchange) -> bool:
        await asyncio.sleep(0.3)
        ex.writer.write(ok(ex.n))
        return True

    upstream = await raw_upstream(respond)
    client = pool(upstream.port, read_timeout=0.0)
    try:
        assert await fetch(client) == b'{"n": 1}'
        assert sweeps <= 1
    finally:
        await client.close()
