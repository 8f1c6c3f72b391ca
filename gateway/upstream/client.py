"""The aiohttp ``ClientSession`` implementation of the upstream seam."""

from __future__ import annotations

import asyncio
import functools
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import aiohttp
from multidict import CIMultiDict

from gateway.settings import UpstreamSettings
from gateway.upstream.base import BodyErrorResponseHandler, idle_limit

if TYPE_CHECKING:
    from aiohttp import StreamReader
    from aiohttp.http import RawResponseMessage


class _SessionProtocol(BodyErrorResponseHandler):
    """The session's response protocol, honouring an upstream's ``Keep-Alive: timeout=N``, which
    aiohttp's connector ignores (it knows only its own ``keepalive_timeout``). The shorter limit
    starts when the response's body has arrived, which is when aiohttp puts the connection back
    in its pool; past it the connection reports itself disconnected, which is what the connector
    checks before reusing one and in its cleanup. ``N`` of 1 s or less: never reused."""

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float) -> None:
        super().__init__(loop=loop)
        self._idle_timeout = idle_timeout
        self._idle_limit = idle_timeout
        self._reuse_by: float | None = None  # set while idle under an upstream's shorter limit

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        message, payload = data
        self._idle_limit = idle_limit(message.headers.get("Keep-Alive"), self._idle_timeout)
        if 0 < self._idle_limit < self._idle_timeout:
            payload.on_eof(self._body_done)
        super().feed_data(data, size)

    def _body_done(self) -> None:
        self._reuse_by = self._loop.time() + self._idle_limit

    def set_response_params(self, **kwargs: Any) -> None:
        self._reuse_by = None  # a request starts on this connection: it is not idle any more
        super().set_response_params(**kwargs)

    @property
    def should_close(self) -> bool:
        return super().should_close or self._idle_limit <= 0

    def is_connected(self) -> bool:
        reuse_by = self._reuse_by
        return super().is_connected() and (reuse_by is None or self._loop.time() <= reuse_by)


class AiohttpUpstream:
    """One pooled session per upstream; timeouts bound connecting and silence between bytes."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.name = settings.name
        self.settings = settings
        self._base = settings.base_url
        keepalive: dict[str, Any] = ({"keepalive_timeout": settings.idle_timeout} if settings.idle_timeout > 0
                                     else {"force_close": True})
        connector = aiohttp.TCPConnector(
            limit=settings.pool_size,
            limit_per_host=settings.pool_size,
            ttl_dns_cache=300,
            enable_cleanup_closed=True,
            **keepalive,
        )
        # aiohttp's own protocol leaves a body whose chunked framing breaks mid-stream waiting
        # forever (BodyErrorResponseHandler), and ignores Keep-Alive timeouts (_SessionProtocol);
        # the connector builds its protocols with _factory (tests/unit/upstream/test_pool_faults.py
        # checks the installed aiohttp still does).
        connector._factory = functools.partial(  # type: ignore[assignment]  # a subclass's partial
            _SessionProtocol, loop=connector._loop, idle_timeout=settings.idle_timeout)
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_read=settings.read_timeout
        )
        # The gateway asks for identity encoding (it must read usage and shape bodies); an upstream
        # that compresses anyway is decoded, and relayed without Content-Encoding.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=True,
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
