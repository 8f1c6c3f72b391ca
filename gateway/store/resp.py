"""A lean pipelined RESP2 connection for the quota hot path on a single Redis.

redis-py spends most of its per-call CPU outside the wire work: pool checkout and release,
connection health checks, stream reader plumbing, a task wake-up per read. The hot path sends
only pre-packed EVALSHA commands, so this module speaks RESP directly: one ``asyncio.Protocol``
connection, hiredis parsing the replies, any number of commands in flight (Redis answers in
order, so replies resolve a FIFO of futures). One connection also means commands issued by this
process run in the order they were written, which the deferred reconcile relies on
(``RedisStore.adjust_soon``: a queued reconcile is written before the next charge).

Errors use redis-py's exception classes (``ConnectionError``, ``ResponseError``,
``NoScriptError``) so ``RedisStore`` maps them to ``StoreError`` exactly as it does redis-py's.
Deadlines are swept by one timer per connection (not an ``asyncio.timeout`` per call): a call
past its deadline fails with ``TimeoutError``; it, like a cancelled call, keeps its reply slot in
the FIFO (the reply, when it comes, is dropped, or handed to whoever claimed it with
:meth:`RespProtocol.claim_late`: a script that changes state still ran in Redis, and its caller
may have to undo it). If that reply is still missing ``stale_after`` seconds later the connection
is taken to be dead and aborted, failing every call on it, and the next call reconnects.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import hiredis
from hiredis import pack_command
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def pack(*parts: str | int | bytes) -> bytes:
    """One command in RESP (hiredis' packer)."""
    command: tuple[Any, ...] = parts  # hiredis' stub types a 1-tuple; it takes any length
    return bytes(pack_command(command))


# Takes the reply of a call its caller gave up on: the reply itself, or the exception that stands
# for it (an error reply as redis-py's exception; a lost connection as ``ConnectionError``, when
# whether the command ran cannot be known).
LateReply = Callable[[Any], None]

log = logging.getLogger(__name__)


def reply_error(error: hiredis.ReplyError) -> ResponseError:
    """redis-py's exception for an error reply (NOSCRIPT gets its own class)."""
    text = str(error)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


class Prelude(Protocol):
    """Commands that must go out ahead of whatever else is written next (queued reconciles)."""

    def take(self) -> list[tuple[bytes, asyncio.Future[Any]]]:
        """Packed commands and their reply futures, to be written first; called once per write."""
        ...

    def lost(self) -> None:
        """The connection is gone: commands not yet taken need another way to Redis."""
        ...


class RespProtocol(asyncio.Protocol):
    """One connection: write packed commands, resolve one future per reply, in order."""

    def __init__(self, deadline: float = 0.05, stale_after: float = 1.0) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()  # written or buffered, reply pending
        self.closed = False
        self.prelude: Prelude | None = None
        self.deadline = deadline  # for prelude commands
        self._stale_after = stale_after
        self._out: list[bytes] = []  # commands buffered for the next write
        self._write_scheduled = False
        # (expiry in loop time, future), in send order: one timer sweeps them all (cheaper than a
        # timer per call); answered entries are dropped lazily by the sweep.
        self._deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._stale_check: asyncio.TimerHandle | None = None
        # Calls given up on whose reply someone still wants (claim_late), and replies that came
        # for given-up calls before their caller could claim them (kept for one loop iteration).
        self._late: dict[asyncio.Future[Any], LateReply] = {}
        self._unclaimed: dict[asyncio.Future[Any], Any] = {}
        self.loop = asyncio.get_running_loop()  # (asyncio.get_running_loop makes a getpid syscall on 3.11)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def send(self, packed: bytes, timeout: float | None = None) -> asyncio.Future[Any]:
        """Buffer one packed command; the future resolves with its reply, or fails with
        ``TimeoutError`` once ``timeout`` seconds have passed. On an idle connection (no reply
        pending) the command is written at once: nothing is there to batch it with, and deferring
        costs an event-loop iteration (an ``epoll_wait``) before Redis even sees it. Otherwise what
        is buffered in one event-loop iteration goes out in one write (one syscall, one wake-up
        of Redis), in order. Either way ``_write`` puts the prelude's commands first."""
        if self.closed or self.transport is None:
            raise RedisConnectionError("connection to Redis closed")
        loop = self.loop
        fut: asyncio.Future[Any] = loop.create_future()
        idle = not self.waiting
        self._out.append(packed)
        self.waiting.append(fut)
        if not self._write_scheduled:
            if idle:
                self._write()
            else:
                self._write_scheduled = True
                loop.call_soon(self._write)
        if timeout is not None:
            self._expire_at(loop.time() + timeout, fut)
        return fut

    def _expire_at(self, at: float, fut: asyncio.Future[Any]) -> None:
        self._deadlines.append((at, fut))
        if self._sweeper is None:
            self._sweeper = self.loop.call_at(at, self._sweep)

    def _sweep(self) -> None:
        """Fail the calls whose deadline passed; their replies, if they come, are dropped."""
        self._sweeper = None
        deadlines = self._deadlines
        now = self.loop.time()
        while deadlines:
            at, fut = deadlines[0]
            if not fut.done():
                if at > now:
                    self._sweeper = self.loop.call_at(at, self._sweep)
                    return
                fut.set_exception(TimeoutError("Redis reply overdue"))
                fut.exception()  # retrieved: the caller may be gone already
                self.watch(fut)
            deadlines.popleft()

    def watch(self, fut: asyncio.Future[Any]) -> None:
        """A caller gave up on ``fut``: if its reply has not come ``stale_after`` seconds later,
        the connection is presumed dead and aborted (one check at a time is enough)."""
        if self._stale_check is None and not self.closed:
            self._stale_check = self.loop.call_later(self._stale_after, self._abort_if_pending, fut)

    def claim_late(self, fut: asyncio.Future[Any], handler: LateReply) -> None:
        """The caller of ``fut`` gave up on it (cancelled, or past its deadline), but the command
        may still run, or have run, in Redis: ``handler`` gets its reply (see :data:`LateReply`)
        when it comes, or at once if it already came. Called by that caller as it gives up, so
        the reply may have arrived in between (the caller's wake-up was queued behind it)."""
        if fut in self._unclaimed:
            self._hand_over(handler, self._unclaimed.pop(fut))
        elif not fut.done() or fut.cancelled() or isinstance(fut.exception(), TimeoutError):
            if fut in self.waiting:
                self._late[fut] = handler
                self.watch(fut)
            else:  # the connection failed in between: whether the command ran is unknown
                self._hand_over(handler, RedisConnectionError("connection to Redis lost"))
        else:  # answered, and the caller was cancelled before it could take the reply
            self._hand_over(handler, fut.exception() or fut.result())

    @staticmethod
    def _hand_over(handler: LateReply, reply: Any) -> None:
        try:
            handler(reply)
        except Exception:  # a handler's failure must not break the connection's reply stream
            log.exception("handling a late Redis reply failed")

    def _late_reply(self, fut: asyncio.Future[Any], reply: Any) -> None:
        """The reply of a call given up on: to its claimant, or kept until the caller can claim it."""
        if isinstance(reply, hiredis.ReplyError):
            reply = reply_error(reply)
        handler = self._late.pop(fut, None)
        if handler is not None:
            self._hand_over(handler, reply)
            return
        # The caller's wake-up was queued when it gave up, so before this: it claims the reply
        # first if it means to.
        self._unclaimed[fut] = reply
        self.loop.call_soon(self._unclaimed.pop, fut, None)

    def _abort_if_pending(self, fut: asyncio.Future[Any]) -> None:
        self._stale_check = None
        if not self.closed and fut in self.waiting:
            self.abort(RedisConnectionError("Redis stopped answering"))

    def schedule_write(self) -> None:
        """Make sure a write happens on the next loop iteration (the prelude has commands)."""
        if not self._write_scheduled and not self.closed:
            self._write_scheduled = True
            self.loop.call_soon(self._write)

    def _write(self) -> None:
        self._write_scheduled = False
        if self.closed or self.transport is None:
            return
        out = self._out
        if self.prelude is not None:
            first = self.prelude.take()
            if first:  # ahead of everything buffered: their futures go before the buffered ones
                waiting = self.waiting
                at = len(waiting) - len(out)
                expiry = self.loop.time() + self.deadline
                for i, (_, fut) in enumerate(first):
                    waiting.insert(at + i, fut)
                    self._expire_at(expiry, fut)
                out[:0] = [packed for packed, _ in first]
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:  # a corrupt stream cannot be resynchronised
                self.abort(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if len(waiting) <= len(self._out):  # a reply nobody asked for: the stream is out of step
                self.abort(RedisConnectionError("unexpected reply from Redis"))
                return
            fut = waiting.popleft()
            if fut.done():  # its caller gave up (deadline, cancelled): keep the order
                self._late_reply(fut, reply)
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(reply_error(reply))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection to Redis lost: {exc}" if exc
                                        else "connection to Redis closed"))

    def abort(self, error: Exception) -> None:
        """Drop the connection now and fail every call waiting on it."""
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: Exception) -> None:
        if self.closed and not self.waiting:
            return
        self.closed = True
        self._out.clear()
        for timer in (self._sweeper, self._stale_check):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._stale_check = None
        self._deadlines.clear()
        waiting, self.waiting = self.waiting, deque()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: a queued reconcile nobody awaits must not warn
        late, self._late = self._late, {}
        self._unclaimed.clear()
        for handler in late.values():  # their replies will never come
            self._hand_over(handler, error)
        if self.prelude is not None:
            self.prelude.lost()


class RespConnection:
    """A single pipelined connection to one Redis, reconnected on demand.

    ``call`` may be used by any number of tasks at once. Connecting (TCP, then ``AUTH`` and
    ``SELECT`` when configured, then the ``on_connect`` commands) happens on first use and after
    the connection was lost; callers arriving meanwhile share that attempt.
    """

    def __init__(self, host: str, port: int, *, db: int = 0, username: str | None = None,
                 password: str | None = None, deadline: float = 0.05, connect_timeout: float = 0.5,
                 stale_after: float = 1.0, on_connect: Sequence[bytes] = (),
                 tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self._tls = tls  # rediss://: the context redis-py would use (certificates, hostname check)
        setup: list[tuple[str, ...] | tuple[str, int]] = []
        if password:
            setup.append(("AUTH", username, password) if username else ("AUTH", password))
        if db:
            setup.append(("SELECT", db))
        # after AUTH/SELECT, e.g. SCRIPT LOAD: a fresh connection (restart, failover) never
        # starts with NOSCRIPT
        self._setup = [pack(*command) for command in setup] + list(on_connect)
        self.deadline = deadline  # default for call(); prelude commands get it too
        self._connect_timeout = connect_timeout
        self._stale_after = stale_after
        # The current connection, possibly closed (``ready`` checks); hot paths read it directly.
        self.proto: RespProtocol | None = None
        self._connecting: asyncio.Task[RespProtocol] | None = None
        self._closed = False
        self.prelude: Prelude | None = None  # written ahead of each write (see RespProtocol)
        self.connects = 0  # successful (re)connections, for tests and stats

    @property
    def ready(self) -> RespProtocol | None:
        """The live connection, or None if a call would have to connect first."""
        proto = self.proto
        return proto if proto is not None and not proto.closed else None

    async def call(self, packed: bytes, timeout: float | None = None, late: LateReply | None = None) -> Any:
        """Send one packed command and return its reply. Error replies raise redis-py's
        exceptions; no reply within ``timeout`` (default: the connection's deadline, connecting
        included) raises ``TimeoutError``. ``late`` gets the reply of a command sent and then
        given up on (deadline, cancellation): see :meth:`RespProtocol.claim_late`."""
        timeout = self.deadline if timeout is None else timeout
        proto = self.proto
        if proto is None or proto.closed:
            started = asyncio.get_running_loop().time()
            async with asyncio.timeout(timeout):
                proto = await self.connect()
            timeout -= asyncio.get_running_loop().time() - started
        fut = proto.send(packed, timeout)
        try:
            return await fut
        except (asyncio.CancelledError, TimeoutError):
            if late is None:
                proto.watch(fut)
            else:
                proto.claim_late(fut, late)
            raise

    async def connect(self) -> RespProtocol:
        """The live connection, connecting first if needed (one attempt shared by all callers)."""
        if self._closed:
            raise RedisConnectionError("Redis connection closed")
        proto = self.ready
        if proto is not None:
            return proto
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.ensure_future(self._open())
            task.add_done_callback(_retrieve)  # every waiter may have given up by the time it fails
        # shield: one caller's deadline must not cancel the attempt the others share
        return await asyncio.shield(task)

    async def _open(self) -> RespProtocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, proto = await loop.create_connection(
                lambda: RespProtocol(self.deadline, self._stale_after), self.host, self.port,
                ssl=self._tls, server_hostname=self.host if self._tls is not None else None)
            try:
                for reply in [proto.send(command) for command in self._setup]:  # pipelined
                    await reply
            except BaseException:
                proto.abort(RedisConnectionError("Redis connection set-up failed"))
                raise
        if self._closed:
            proto.abort(RedisConnectionError("Redis connection closed"))
            raise RedisConnectionError("Redis connection closed")
        proto.prelude = self.prelude  # only now: nothing may go out ahead of AUTH and SELECT
        self.proto = proto
        self.connects += 1
        return proto

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with ``ConnectionError``."""
        self._closed = True
        task, self._connecting = self._connecting, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])  # cancelled or failed: either way the attempt is over
        proto, self.proto = self.proto, None
        if proto is not None:
            proto.abort(RedisConnectionError("Redis connection closed"))


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def lean_connection(client: Redis | RedisCluster, deadline: float,
                     on_connect: Sequence[bytes]) -> RespConnection | None:
    """A lean connection for a single Redis over TCP (plain or TLS) with RESP2, None otherwise
    (Unix sockets, credential providers, RESP3 and Cluster stay on redis-py; a Cluster has
    :mod:`gateway.store.cluster`). Shared by the quota store and the risk signal store."""
    if not isinstance(client, Redis) or client.connection is not None or client.single_connection_client:
        return None
    pool = client.connection_pool
    return lean_for(pool.connection_class, pool.connection_kwargs, deadline, on_connect)


def lean_for(connection_class: type[Any], kw: dict[str, Any], deadline: float,
             on_connect: Sequence[bytes]) -> RespConnection | None:
    """A lean connection to the server redis-py would reach with ``connection_class(**kw)``,
    or None where only redis-py will do."""
    if connection_class not in (Connection, SSLConnection) or kw.get("credential_provider") is not None \
            or kw.get("protocol") not in (None, 2, "2"):
        return None
    # TLS exactly as redis-py sets it up (certificates, verification, hostname check): its own
    # SSLConnection builds the context and is never connected
    tls = SSLConnection(**kw).ssl_context.get() if connection_class is SSLConnection else None
    return RespConnection(str(kw.get("host", "localhost")), int(kw.get("port", 6379)),
                          db=int(kw.get("db", 0) or 0), username=kw.get("username"),
                          password=kw.get("password"), deadline=deadline,
                          connect_timeout=max(deadline, float(kw.get("socket_connect_timeout") or 0.5)),
                          stale_after=max(1.0, 4 * deadline), on_connect=on_connect, tls=tls)


def host_port(url: str) -> tuple[str, int]:
    """``redis://host:port`` or ``host:port`` → (host, port)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = rest.rpartition(":")
    return (host or "localhost").strip("[]"), int(port or 6379)
