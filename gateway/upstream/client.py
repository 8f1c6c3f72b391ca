"""The aiohttp ``ClientSession`` implementation of the upstream seam."""

from __future__ import annotations

import functools
from contextlib import AbstractAsyncContextManager

import aiohttp
from multidict import CIMultiDict

from gateway.settings import UpstreamSettings
from gateway.upstream.base import BodyErrorResponseHandler


class AiohttpUpstream:
    """One pooled session per upstream; timeouts bound connecting and silence between bytes."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.name = settings.name
        self.settings = settings
        self._base = settings.base_url
        connector = aiohttp.TCPConnector(
            limit=settings.pool_size,
            limit_per_host=settings.pool_size,
            ttl_dns_cache=300,
            enable_cleanup_closed=True,
            keepalive_timeout=30,
        )
        # aiohttp's own protocol leaves a body whose chunked framing breaks mid-stream waiting
        # forever (BodyErrorResponseHandler); the connector builds its protocols with _factory
        # (tests/unit/upstream/test_pool_faults.py checks the installed aiohttp still does).
        connector._factory = functools.partial(  # type: ignore[assignment]  # a subclass's partial
            BodyErrorResponseHandler, loop=connector._loop)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        )
        # No auto-decompress: the gateway asks for identity encoding (it must read usage), and
        # raw relay of anything else is cheaper than decode + re-encode.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self._session.request(
            method, self._base + path_qs, headers=headers, data=body, allow_redirects=False
        )

    @property
    def ready(self) -> bool:
        return not self._session.closed

    async def close(self) -> None:
        await self._session.close()
