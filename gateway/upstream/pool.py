"""The default upstream client: aiohttp's HTTP/1.1 response protocol on a connection pool of ours.

``aiohttp.ClientSession`` spends most of a proxied request's client CPU on per-request work a
gateway does not need: URL building, cookie jars, redirect and auth handling, tracing hooks,
payload registry lookups, and a timer handle per received chunk (measured: ~260 µs of CPU per
small request against ~105 µs here; docs/performance.md). This client keeps what matters from
aiohttp - its ``ResponseHandler`` protocol, the llhttp response parser, ``StreamReader`` bodies
with flow control, and aiohttp's payload and disconnect exceptions - and replaces the rest with
a fixed request line per upstream, a LIFO keep-alive pool, and one sweeper task per upstream that
enforces read and idle timeouts for all connections at once instead of a timer per chunk. A
connection idles at most ``idle_timeout``, or less when the upstream's ``Keep-Alive: timeout=N``
says it closes sooner (``base.idle_limit``); that limit is checked exactly when a connection is
taken from the pool, so a sweeper tick late never hands out one the upstream is closing.

The ``session`` client (gateway/upstream/client.py) is still available per upstream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.settings import UpstreamSettings
from gateway.upstream.base import (
    IDEMPOTENT_METHODS,
    BodyErrorResponseHandler,
    UpstreamConnectError,
    UpstreamProtocolError,
    idle_limit,
)

if TYPE_CHECKING:
    from aiohttp import StreamReader
    from aiohttp.http import RawResponseMessage

log = logging.getLogger(__name__)

# aiohttp's StreamReader high-water mark; one response body buffer per connection.
_READ_BUFSIZE = 2**16
_MAX_INTERIM = 16  # interim (1xx) responses skipped before the final one; more is a broken upstream


class _Connection(BodyErrorResponseHandler):
    """One upstream connection; ``last_activity`` is what the pool's sweeper times out on (and,
    while the connection idles in the pool, when it went back there)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.clock = loop.time
        self.last_activity = loop.time()
        self.received = False  # a byte arrived since the current request was written
        self.reused = False  # it served a request before this one (kept alive in the pool)
        self.idle_limit = 0.0  # how long it may idle in the pool (set as it goes back there)

    def idle_expired(self, now: float) -> bool:
        return now - self.last_activity > self.idle_limit

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.clock()
        self.received = True
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
        held = True  # the pool slot is ours to give back (not while a replacement connects)
        reusable = False
        try:
            while True:
                conn.received = False
                conn.last_activity = conn.clock()
                transport = conn.transport
                if transport is None:
                    raise aiohttp.ServerDisconnectedError()
                if body:
                    transport.writelines((head, body))
                else:
                    transport.write(head)
                try:
                    message, payload = await conn.read()
                    interim = 0
                    while 100 <= message.code < 200 and message.code != 101:
                        interim += 1  # interim responses are skipped, as aiohttp does; 101 is the
                        if interim > _MAX_INTERIM:  # forwarder's to refuse (nothing asked to switch)
                            raise UpstreamProtocolError(f"more than {_MAX_INTERIM} interim responses")
                        message, payload = await conn.read()
                except HttpProcessingError as exc:  # the status line or headers (aiohttp's own class)
                    raise UpstreamProtocolError(f"malformed response head: {exc.message}") from exc
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    # A kept-alive connection the upstream closed as it was reused (its idle timeout
                    # raced ours) before a byte of the response: an idempotent request is sent again,
                    # once, on a new connection. A POST is not: the upstream may have read it and
                    # begun generating, and a second generation would be billed twice.
                    if (conn.received or not conn.reused or method not in IDEMPOTENT_METHODS
                            or self._closed):
                        raise
                    held = False
                    conn = await self._replace(conn)
                    held = True
                    continue
                break
            yield PooledResponse(message, payload)
            if payload.is_eof() and not message.should_close and not conn.should_close:
                conn.idle_limit = idle_limit(message.headers.get("Keep-Alive"), self.settings.idle_timeout)
                reusable = conn.idle_limit > 0
        finally:
            if held:
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
        deadline: float | None = None
        while self._open >= self._limit:
            # Waiting for a free connection counts against connect_timeout, as in aiohttp's
            # connector: a pool held by long streams answers 504, it does not hold the client.
            loop = asyncio.get_running_loop()
            if deadline is None and self.settings.connect_timeout > 0:
                deadline = loop.time() + self.settings.connect_timeout
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException as exc:  # cancelled, or the deadline passed
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # pass the slot we were given on to the next waiter
                else:
                    with contextlib.suppress(ValueError):  # no dead waiters piling up in a stall
                        self._waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise aiohttp.ConnectionTimeoutError(
                        f"no free connection to {self._host}:{self._port} within "
                        f"{self.settings.connect_timeout:g}s (pool_size {self._limit})") from exc
                raise
            conn = self._take_idle()
            if conn is not None:
                return conn
        self._open += 1
        return await self._connect_in_slot()

    async def _connect_in_slot(self) -> _Connection:
        """Connect in a slot already counted in ``_open``; on failure the slot is given back."""
        try:
            conn = await self._connect()
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        self._busy.add(conn)
        return conn

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection still open and within its idle limit (LIFO keeps
        the pool warm)."""
        idle = self._idle
        if not idle:
            return None
        now = idle[-1].clock()
        while idle:
            conn = idle.pop()
            if conn.is_connected() and not conn.should_close and not conn.idle_expired(now):
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
            async with asyncio.timeout(self.settings.connect_timeout or None):  # 0: no limit
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self._host, self._port, ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None)
        except TimeoutError as exc:
            where = f"{self._host}:{self._port}"
            raise aiohttp.ConnectionTimeoutError(f"connecting to {where} timed out") from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror) and TLS (SSLError) failures
            raise UpstreamConnectError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        # Decoded when an upstream compresses although asked for identity (the forwarder must
        # read usage and shape the body, and relays it without Content-Encoding); no cost otherwise.
        conn.set_response_params(read_until_eof=True, auto_decompress=True, read_bufsize=_READ_BUFSIZE)
        return conn

    async def _replace(self, stale: _Connection) -> _Connection:
        """A new connection in the pool slot of ``stale``, which is closed."""
        self._busy.discard(stale)
        stale.abort()
        return await self._connect_in_slot()

    def _release(self, conn: _Connection, reusable: bool) -> None:
        self._busy.discard(conn)
        if reusable and not self._closed and conn.is_connected():
            conn.last_activity = conn.clock()
            conn.reused = True
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
        per chunk. Precision is a quarter of the read timeout, at most one second. A read timeout
        of 0 means none (as in aiohttp's ``ClientTimeout``)."""
        read_timeout = self.settings.read_timeout
        tick = max(0.01, min(1.0, read_timeout / 4)) if read_timeout > 0 else 1.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            try:
                self._expire(loop.time(), read_timeout)
            except Exception:  # a bug here must not end timeouts for the process's lifetime
                log.exception("upstream %s: timeout sweep failed", self.name)

    def _expire(self, now: float, read_timeout: float) -> None:
        """Fail busy connections silent for ``read_timeout``; close long-idle pooled ones."""
        silent = [c for c in self._busy if now - c.last_activity > read_timeout] if read_timeout > 0 else []
        for conn in silent:
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
        # Limits differ per connection (an upstream's Keep-Alive header), so the LIFO order of
        # the idle list is not the order of expiry: the whole list is checked (at most pool_size).
        idle = self._idle
        if any(conn.idle_expired(now) for conn in idle):
            stale = [conn for conn in idle if conn.idle_expired(now)]
            idle[:] = [conn for conn in idle if not conn.idle_expired(now)]
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
