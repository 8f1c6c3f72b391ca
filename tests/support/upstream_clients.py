"""Both upstream clients (gateway/upstream/pool.py and aiohttp's session) pointed at a raw
upstream, and the few lines the pool's fault tests write about them."""

from __future__ import annotations

from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.settings import UpstreamSettings
from gateway.upstream.client import AiohttpUpstream
from gateway.upstream.pool import PooledUpstream

HEADERS = CIMultiDict({"Content-Type": "application/json"})


def ok(n: int) -> bytes:
    """A complete response whose body names the request it answers."""
    body = b'{"n": %d}' % n
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def pool(port: int, **kw: Any) -> PooledUpstream:
    return PooledUpstream(UpstreamSettings(name="t", base_url=f"http://127.0.0.1:{port}", **kw))


def session(port: int, **kw: Any) -> AiohttpUpstream:
    return AiohttpUpstream(UpstreamSettings(name="t", base_url=f"http://127.0.0.1:{port}", client="session",
                                            **kw))


CLIENTS = pytest.mark.parametrize("make", [pool, session], ids=["pool", "session"])


async def fetch(client: Any, method: str = "POST") -> bytes:
    async with client.request(method, "/v1/x", HEADERS, b"{}" if method == "POST" else None) as response:
        data: bytes = await response.read()
        return data


def assert_pool_empty(client: PooledUpstream) -> None:
    """Every slot was given back: nothing open but idle connections, no one waiting."""
    assert client._open == len(client._idle) and not client._busy and not client._waiters
