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

# Taken off an upstream's announced keep-alive timeout: its close and our reuse must not race.
KEEPALIVE_SAFETY_S = 1.0


def idle_limit(keep_alive: str | None, idle_timeout: float) -> float:
    """How long a connection may stay idle in the pool after a response whose ``Keep-Alive``
    header is ``keep_alive``: ``idle_timeout``, or the upstream's ``timeout=N`` less a second if
    that is shorter. 0: do not reuse it (``N`` of 1 s or less leaves no safe window). A header
    without a readable timeout changes nothing."""
    if keep_alive is None:
        return idle_timeout
    for param in keep_alive.split(","):
        name, _, value = param.partition("=")
        if name.strip().lower() != "timeout":
            continue
        try:
            announced = float(value.strip().strip('"'))
        except ValueError:
            return idle_timeout
        if announced != announced:  # NaN
            return idle_timeout
        return max(0.0, min(announced - KEEPALIVE_SAFETY_S, idle_timeout))
    return idle_timeout


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
    settings: UpstreamSettings  # what it was built from; the forwarder reads its client-side deadlines

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
