"""The upstream seam: send one request to the model service, get a streaming response."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

import aiohttp
from aiohttp import StreamReader
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import _EXC_SENTINEL
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.settings import UpstreamSettings

# Methods a client may repeat without changing the outcome (RFC 9110 §9.2.2), as aiohttp lists them.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class UpstreamConnectError(aiohttp.ClientConnectionError):
    """The upstream could not be connected to (refused, unreachable, TLS or DNS failure)."""


class UpstreamProtocolError(aiohttp.ClientError):
    """The upstream's response is not valid HTTP/1.1 for this request: an unparseable status line
    or header block, one over the parser's limits, framing that contradicts itself
    (``Transfer-Encoding`` with ``Content-Length``), or too many interim (1xx) responses."""


class BodyErrorResponseHandler(ResponseHandler):
    """aiohttp's response protocol, with one fix (aiohttp 3.14): when the parser fails on a
    malformed body (a bad chunk size mid-stream), aiohttp fails the connection but never tells
    the body's ``StreamReader``; its reader then waits forever, and the read timeout is dropped
    with the connection. Here the body fails too, as a ``ClientPayloadError``."""

    def set_exception(self, exc: BaseException, exc_cause: BaseException = _EXC_SENTINEL) -> None:
        payload = self._payload
        super().set_exception(exc, exc_cause)
        if (isinstance(exc, HttpProcessingError) and payload is not None and not payload.is_eof()
                and payload.exception() is None):
            error = aiohttp.ClientPayloadError(f"Response payload is malformed: {exc.message}")
            payload.set_exception(error, exc)


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
