"""The default upstream client: aiohttp's HTTP/1.1 response protocol on a connection pool of ours.

``aiohttp.ClientSession`` spends most of a proxied request's client CPU on per-request work a
gateway does not need: URL building, cookie jars, redirect and auth handling, tracing hooks,
payload registry lookups, and a timer handle per received chunk (measured: ~260 µs of CPU per
small request against ~105 µs here; docs/performance.md). This client keeps what matters from
aiohttp - its ``ResponseHandler`` protocol, the llhttp response parser, ``StreamReader`` bodies
with flow control, and aiohttp's payload and disconnect exceptions - and replaces the rest with
a fixed request line per upstream, a LIFO keep-alive pool, and one sweeper task per upstream that
enforces read and idle timeouts for all connections at once instead of a timer per chunk.

The ``session`` client (gateway/upstream/client.py) is still available per upstream.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.settings import UpstreamSettings
from gateway.upstream.base import UpstreamConnectError

if TYPE_CHECKING:
    from aiohttp import StreamReader
    from aiohttp.http import RawResponseMessage

log = logging.getLogger(__name__)

# aiohttp's StreamReader high-water mark; one response body buffer per connection.
_READ_BUFSIZE = 2**16
_IDLE_SECONDS = 30.0  # keep-alive: idle connections older than this are closed


class _Connection(ResponseHandler):
    """One upstream connection; ``last_activity`` is what the pool's sweeper times out on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.clock = loop.time
        self.last_activity = loop.time()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.clock()
        super().data_received(data)

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's StreamReader calls this after every read; only a real pause needs the work.
        if self._reading_paused:
            # The pause was ours (a slow client), not the upstream's silence.
            self.last_activity = self.clock()
            super().resume_reading(resume_parser)


class PooledResponse:
    """The part of ``aiohttp.ClientResponse`` the forwarder reads."""

    __slots__ = ("status", "reason", "headers", "content", "content_type", "content_length")

    def __init__(self, message: RawResponseMessage, payload: StreamReader) -> None:
        self.status: int = message.code
        self.reason: str = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        ctype = message.headers.get("Content-Type")
        self.content_type = (ctype.partition(";")[0].strip().lower() if ctype
                             else "application/octet-stream")
        length = message.headers.get("Content-Length")
        self.content_length: int | None = int(length) if length is not None and length.isdigit() else None

    async def read(self) -> bytes:
        return await self.content.read()


class PooledUpstream:
    """An upstream reached through a bounded pool of keep-alive HTTP/1.1 connections."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.name = settings.name
        self.settings = settings
        url = URL(settings.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"upstream {settings.name}: base_url must be an http(s) URL")
        self._host = url.host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._tls = url.scheme == "https"
        self._ssl: ssl.SSLContext | None = None  # made on first use: loading CA files is blocking I/O
        self._prefix = url.raw_path.rstrip("/")
        host = f"[{url.host}]" if ":" in url.host else url.host
        self._host_line = f"Host: {host}{'' if url.is_default_port() else f':{url.port}'}\r\n"
        self._limit = settings.pool_size
        self._open = 0  # connections open or being opened, idle included
        self._idle: list[_Connection] = []
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._busy: set[_Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False

    # -- requests -------------------------------------------------------------------------
    @asynccontextmanager
    async def request(self, method: str, path_qs: str, headers: CIMultiDict[str],
                      body: bytes | None) -> AsyncIterator[PooledResponse]:
        head = self._head(method, path_qs, headers, body)
        conn = await self._acquire()
        reusable = False
        try:
            conn.last_activity = conn.clock()
            transport = conn.transport
            if transport is None:
                raise aiohttp.ServerDisconnectedError()
            if body:
                transport.writelines((head, body))
            else:
                transport.write(head)
            while True:
                message, payload = await conn.read()
                if not 100 <= message.code < 200 or message.code == 101:
                    break  # interim (1xx) responses are skipped, as aiohttp does
            response = PooledResponse(message, payload)
            yield response
            reusable = payload.is_eof() and not message.should_close and not conn.should_close
        finally:
            self._release(conn, reusable)

    def _head(self, method: str, path_qs: str, headers: CIMultiDict[str], body: bytes | None) -> bytes:
        parts = [f"{method} {self._prefix}{path_qs} HTTP/1.1\r\n", self._host_line]
        for name, value in headers.items():
            if "\n" in value or "\r" in value:  # never let a value start a header of its own
                raise ValueError(f"header {name!r} holds a line break")
            parts.append(f"{name}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            parts.append(f"Content-Length: {len(body) if body else 0}\r\n")
        parts.append("\r\n")
        # aiohttp decodes header bytes with surrogateescape; this restores the client's bytes.
        return "".join(parts).encode("utf-8", "surrogateescape")

    # -- the pool -------------------------------------------------------------------------
    async def _acquire(self) -> _Connection:
        if self._closed:
            raise aiohttp.ClientConnectionError("upstream client is closed")
        conn = self._take_idle()
        if conn is not None:
            return conn
        while self._open >= self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass the slot we were given on to the next waiter
                raise
            conn = self._take_idle()
            if conn is not None:
                return conn
        self._open += 1
        try:
            conn = await self._connect()
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        self._busy.add(conn)
        return conn

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection still open (LIFO keeps the pool warm)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.is_connected() and not conn.should_close:
                self._busy.add(conn)
                return conn
            self._discard(conn)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep(), name=f"upstream-{self.name}-sweeper")
        if self._tls and self._ssl is None:
            # The system trust store (SSL_CERT_FILE / SSL_CERT_DIR are honoured), hostname checked.
            self._ssl = await asyncio.to_thread(ssl.create_default_context)
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None)
        except TimeoutError as exc:
            where = f"{self._host}:{self._port}"
            raise aiohttp.ConnectionTimeoutError(f"connecting to {where} timed out") from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror) and TLS (SSLError) failures
            raise UpstreamConnectError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        conn.set_response_params(read_until_eof=True, auto_decompress=False, read_bufsize=_READ_BUFSIZE)
        return conn

    def _release(self, conn: _Connection, reusable: bool) -> None:
        self._busy.discard(conn)
        if reusable and not self._closed and conn.is_connected():
            conn.last_activity = conn.clock()
            self._idle.append(conn)
            self._wake()
        else:
            self._discard(conn)  # an unread body or a broken connection: never reused

    def _discard(self, conn: _Connection) -> None:
        conn.abort()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- timeouts ---------------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Read timeout for busy connections, idle timeout for pooled ones: one task, not a timer
        per chunk. Precision is a quarter of the read timeout, at most one second."""
        read_timeout = self.settings.read_timeout
        tick = min(1.0, read_timeout / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            try:
                self._expire(loop.time(), read_timeout)
            except Exception:  # a bug here must not end timeouts for the process's lifetime
                log.exception("upstream %s: timeout sweep failed", self.name)

    def _expire(self, now: float, read_timeout: float) -> None:
        """Fail busy connections silent for ``read_timeout``; close long-idle pooled ones."""
        for conn in [c for c in self._busy if now - c.last_activity > read_timeout]:
            # aiohttp's ResponseHandler internals (tests/unit/upstream/test_pool.py checks that
            # the installed aiohttp still has them); read defensively so that an aiohttp which
            # renamed them still gets read timeouts, only without the two exceptions below.
            payload = getattr(conn, "_payload", None)
            # Silence only counts while more is expected and the pause is not ours (a slow client).
            if (conn.is_connected() and not getattr(conn, "_reading_paused", False)
                    and not (payload is not None and payload.is_eof())):
                exc = aiohttp.SocketTimeoutError("Timeout on reading data from socket")
                conn.set_exception(exc)
                if payload is not None:
                    payload.set_exception(exc)
        # The idle list is LIFO, so the longest-idle connections sit at its start.
        expired = 0
        for conn in self._idle:
            if now - conn.last_activity <= _IDLE_SECONDS:
                break
            expired += 1
        if expired:
            stale, self._idle[:expired] = self._idle[:expired], []
            for conn in stale:
                self._discard(conn)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for conn in self._idle:
            conn.abort()
        for conn in list(self._busy):
            conn.abort()
        self._idle.clear()
        self._busy.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(aiohttp.ClientConnectionError("upstream client is closed"))
