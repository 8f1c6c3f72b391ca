"""The upstream seam: send one request to the model service, get a streaming response."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

import aiohttp
from aiohttp import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.settings import UpstreamSettings


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """The upstream could not be connected to (refused, unreachable, TLS or DNS failure)."""


class UpstreamResponse(Protocol):
    """What the forwarder reads of a response (``aiohttp.ClientResponse`` has this shape)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content(self) -> StreamReader: ...

    @property
    def content_type(self) -> str: ...

    @property
    def content_length(self) -> int | None: ...

    async def read(self) -> bytes: ...


class Upstream(Protocol):
    """A model service. ``request`` yields the response with its body still unread, so the
    caller can stream it; leaving the context closes (or cancels) the upstream request."""

    name: str

    def request(
        self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None
    ) -> AbstractAsyncContextManager[UpstreamResponse]: ...

    @property
    def ready(self) -> bool: ...

    async def close(self) -> None: ...


def create_upstream(settings: UpstreamSettings) -> Upstream:
    """The client ``settings.client`` names."""
    if settings.client == "session":
        from gateway.upstream.client import AiohttpUpstream

        return AiohttpUpstream(settings)
    from gateway.upstream.pool import PooledUpstream

    return PooledUpstream(settings)
