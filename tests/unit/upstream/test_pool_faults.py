"""The pooled client against a buggy or hostile upstream: what it raises, what it never reuses,
when it retries, which deadlines hold, and that no failure leaks a pool slot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.settings import UpstreamSettings
from gateway.upstream.base import UpstreamConnectError, UpstreamProtocolError, idle_limit
from gateway.upstream.client import AiohttpUpstream
from gateway.upstream.pool import PooledUpstream

HEADERS = CIMultiDict({"Content-Type": "application/json"})


def ok(n: int) -> bytes:
    body = b'{"n": %d}' % n
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


Respond = Callable[["Upstream", int, int, asyncio.StreamWriter], Awaitable[bool]]


class Upstream:
    """A raw HTTP/1.1 server: ``respond(upstream, n, conn, writer)`` answers request ``n`` (1-based,
    overall) on connection ``conn`` and returns whether to keep the connection."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.seen: list[tuple[int, bytes]] = []  # (connection, method) per request
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        conn = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.seen.append((conn, head.split(b" ", 1)[0]))
                if not await self.respond(self, len(self.seen), conn, writer):
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled: the test is over
        finally:
            self.open_now -= 1
            self.handlers.discard(task)
            writer.close()


Start = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    upstreams: list[Upstream] = []

    async def run(respond: Respond) -> Upstream:
        upstream = Upstream(respond)
        upstream.server = await asyncio.start_server(upstream._handle, "127.0.0.1", 0)
        upstreams.append(upstream)
        return upstream

    yield run
    for upstream in upstreams:
        assert upstream.server is not None
        upstream.server.close()
        handlers = list(upstream.handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


def pool(port: int, **kw: Any) -> PooledUpstream:
    return PooledUpstream(UpstreamSettings(name="t", base_url=f"http://127.0.0.1:{port}", **kw))


async def fetch(client: Any, method: str = "POST") -> bytes:
    async with client.request(method, "/v1/x", HEADERS, b"{}" if method == "POST" else None) as response:
        data: bytes = await response.read()
        return data


def assert_pool_empty(client: PooledUpstream) -> None:
    """Every slot was given back: nothing open but idle connections, no one waiting."""
    assert client._open == len(client._idle) and not client._busy and not client._waiters


# -- errors the caller can map to a 502 ----------------------------------------------------------

@pytest.mark.parametrize("make", [pool, lambda port: AiohttpUpstream(UpstreamSettings(
    name="t", base_url=f"http://127.0.0.1:{port}", client="session"))], ids=["pool", "session"])
async def test_a_malformed_chunk_mid_body_fails_the_read_at_once(start: Start, make: Any) -> None:
    """aiohttp fails the connection but not the body: its reader waited forever (and the read
    timeout went with the connection). Both clients install the fix."""

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"not-a-size\r\n")
        await asyncio.sleep(10)
        return False

    upstream = await start(respond)
    client = make(upstream.port)
    try:
        async with client.request("POST", "/v1/x", HEADERS, b"{}") as response:
            assert await response.content.readany() == b"abc"
            with pytest.raises(aiohttp.ClientPayloadError, match="malformed"):
                async with asyncio.timeout(2):
                    await response.content.readany()
    finally:
        await client.close()


def test_the_session_connector_still_builds_protocols_from_its_factory() -> None:
    """The session client swaps the connector's ``_factory``; an aiohttp that renamed it would
    silently drop the fix above."""
    import inspect

    source = inspect.getsource(aiohttp.connector.TCPConnector)
    assert "self._factory" in source


@pytest.mark.parametrize("head", [
    b"NOT HTTP\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 10000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
], ids=["not-http", "te-and-cl", "header-too-large", "two-lengths"])
async def test_a_malformed_head_raises_a_protocol_error(start: Start, head: bytes) -> None:
    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(head if n == 1 else ok(n))
        return n > 1

    upstream = await start(respond)
    client = pool(upstream.port, pool_size=1)
    try:
        with pytest.raises(UpstreamProtocolError, match="malformed response head"):
            await fetch(client)
        assert await fetch(client) == b'{"n": 2}'
        assert upstream.connections == 2
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_endless_interim_responses_are_refused(start: Start) -> None:
    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        for _ in range(1000):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0)
        return False

    upstream = await start(respond)
    client = pool(upstream.port)
    try:
        with pytest.raises(UpstreamProtocolError, match="interim"):
            await fetch(client)
    finally:
        await client.close()


# -- never reused with a response on it ----------------------------------------------------------

async def test_a_caller_failing_mid_read_does_not_hand_its_response_on(start: Start) -> None:
    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        if n == 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"67890")
            return True
        writer.write(ok(n))
        return True

    upstream = await start(respond)
    client = pool(upstream.port, pool_size=1)
    try:
        with pytest.raises(RuntimeError):
            async with client.request("POST", "/v1/x", HEADERS, b"{}") as response:
                await response.content.readany()
                raise RuntimeError("the relay failed")
        assert await fetch(client) == b'{"n": 2}'
        assert upstream.connections == 2
    finally:
        await client.close()


async def test_a_response_announcing_close_is_not_reused_even_if_the_socket_stays_open(start: Start) -> None:
    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        writer.write(close if n == 1 else ok(n))
        return True  # and keeps serving: a client trusting the socket would reuse it

    upstream = await start(respond)
    client = pool(upstream.port, pool_size=1)
    try:
        assert await fetch(client) == b"ok"
        assert await fetch(client) == b'{"n": 2}'
        assert upstream.connections == 2
    finally:
        await client.close()


# -- stale keep-alive connections ------------------------------------------------------------------

async def stale_second(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
    """Answers keep-alive, then closes on the connection's second request without a byte."""
    if conn == 1 and n > 1:
        return False
    writer.write(ok(n))
    return True


async def test_a_get_on_a_stale_connection_is_sent_again_on_a_new_one(start: Start) -> None:
    upstream = await start(stale_second)
    client = pool(upstream.port)
    try:
        assert await fetch(client) == b'{"n": 1}'
        assert await fetch(client, "GET") == b'{"n": 3}'
        assert upstream.seen == [(1, b"POST"), (1, b"GET"), (2, b"GET")]
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_a_post_on_a_stale_connection_is_not_sent_again(start: Start) -> None:
    upstream = await start(stale_second)
    client = pool(upstream.port)
    try:
        await fetch(client)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(client)
        assert upstream.seen == [(1, b"POST"), (1, b"POST")]
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_a_get_is_not_sent_again_after_response_bytes_or_on_a_new_connection(start: Start) -> None:
    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        if n == 2:
            writer.write(b"HTTP/1.1 200")  # part of a head, then the connection drops
            await writer.drain()
            return False
        if n == 3:
            return False  # a new connection closed at once: not a stale keep-alive race
        writer.write(ok(n))
        return True

    upstream = await start(respond)
    client = pool(upstream.port)
    try:
        await fetch(client)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(client, "GET")
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await fetch(client, "GET")
        assert len(upstream.seen) == 3
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_a_failed_reconnect_gives_the_slot_back(start: Start) -> None:
    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        if n == 1:
            writer.write(ok(n))
            assert up.server is not None
            up.server.close()  # no new connections from now on
            return True
        return False

    upstream = await start(respond)
    client = pool(upstream.port, pool_size=1)
    try:
        await fetch(client)
        with pytest.raises(UpstreamConnectError):
            await fetch(client, "GET")
        assert client._open == 0 and not client._busy
    finally:
        await client.close()


# -- deadlines ----------------------------------------------------------------------------------------

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


async def test_waiting_for_a_free_connection_is_bounded_by_connect_timeout(start: Start) -> None:
    release = asyncio.Event()

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        await release.wait()
        writer.write(ok(n))
        return True

    upstream = await start(respond)
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


async def test_a_read_timeout_of_zero_means_none(start: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in aiohttp's ClientTimeout (the session client); the sweeper must not spin on it."""
    sweeps = 0
    expire = PooledUpstream._expire

    def counting(self: PooledUpstream, now: float, read_timeout: float) -> None:
        nonlocal sweeps
        sweeps += 1
        expire(self, now, read_timeout)

    monkeypatch.setattr(PooledUpstream, "_expire", counting)

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.3)
        writer.write(ok(n))
        return True

    upstream = await start(respond)
    client = pool(upstream.port, read_timeout=0.0)
    try:
        assert await fetch(client) == b'{"n": 1}'
        assert sweeps <= 1
    finally:
        await client.close()


# -- pool accounting --------------------------------------------------------------------------------

async def test_two_hundred_failures_of_every_kind_leak_no_slot(start: Start) -> None:
    healthy = False
    most_open = 0  # the pool's own count, sampled as each request arrives

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        nonlocal most_open
        most_open = max(most_open, client._open, len(client._busy))
        if healthy:
            writer.write(ok(n))
            return True
        kind = n % 6
        if kind == 0:
            return False  # closed before a byte
        if kind == 1:
            writer.write(b"garbage\r\n\r\n")
        elif kind == 2:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{")  # then EOF
            return False
        elif kind == 3:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"zz\r\n")
        elif kind == 4:
            await asyncio.sleep(0.3)  # silent past the read timeout
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")  # the caller gives up
        await writer.drain()
        await asyncio.sleep(0.5)
        return False

    upstream = await start(respond)
    client = pool(upstream.port, pool_size=2, read_timeout=0.1)

    async def one(i: int) -> str:
        try:
            async with client.request("POST", "/v1/x", HEADERS, b"{}") as response:
                if i % 7 == 0:
                    raise asyncio.CancelledError  # the client went away mid-response
                await response.read()
        except asyncio.CancelledError:
            return "cancelled"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__
        return "ok"

    try:
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(*(one(i) for i in range(200)))
        assert "ok" not in outcomes and len(set(outcomes)) >= 4, set(outcomes)
        assert most_open == 2
        assert_pool_empty(client)
        healthy = True
        async with asyncio.timeout(5):
            assert len(await asyncio.gather(*(fetch(client) for _ in range(10)))) == 10
        assert most_open == 2
        assert_pool_empty(client)
    finally:
        await client.close()


async def test_a_waiter_is_woken_when_a_failed_connection_is_discarded(start: Start) -> None:
    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        if n == 1:
            await asyncio.sleep(0.1)
            writer.write(b"garbage\r\n\r\n")
            return True
        writer.write(ok(n))
        return True

    upstream = await start(respond)
    client = pool(upstream.port, pool_size=1, connect_timeout=5)
    try:
        first = asyncio.create_task(fetch(client))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        assert await fetch(client) == b'{"n": 2}'  # served when the first one's slot came back
        assert time.monotonic() - started < 1
        with pytest.raises(UpstreamProtocolError):
            await first
        assert_pool_empty(client)
    finally:
        await client.close()


# -- keep-alive limits ------------------------------------------------------------------------------

@pytest.mark.parametrize(("header", "limit"), [
    (None, 15.0),
    ("timeout=5, max=100", 4.0),  # Apache's form: a second less, for the race of its close
    ("max=100, TIMEOUT = 30", 15.0),  # ours is shorter
    ('timeout="3"', 2.0),
    ("timeout=1", 0.0),  # no safe window: not reused
    ("timeout=0", 0.0),
    ("timeout=-4", 0.0),
    ("timeout=soon", 15.0),  # unreadable: ignored
    ("timeout=nan", 15.0),
    ("max=5", 15.0),
    ("", 15.0),
])
def test_idle_limit_from_a_keep_alive_header(header: str | None, limit: float) -> None:
    assert idle_limit(header, 15.0) == limit


def keep_alive(n: int, seconds: int | None) -> bytes:
    head, _, body = ok(n).partition(b"\r\n\r\n")
    extra = b"" if seconds is None else b"\r\nKeep-Alive: timeout=%d" % seconds
    return head + extra + b"\r\n\r\n" + body


def session(port: int, **kw: Any) -> AiohttpUpstream:
    return AiohttpUpstream(UpstreamSettings(name="t", base_url=f"http://127.0.0.1:{port}", client="session",
                                            **kw))


CLIENTS = pytest.mark.parametrize("make", [pool, session], ids=["pool", "session"])


@contextlib.contextmanager
def idle_for(client: PooledUpstream | AiohttpUpstream, seconds: float) -> Iterator[None]:
    """The client's idle connections look ``seconds`` older, rather than the test sleeping: the
    pool's are backdated, the session's connector and protocols read the loop's clock."""
    if isinstance(client, PooledUpstream):
        for conn in client._idle:
            conn.last_activity -= seconds
        yield
        return
    loop = asyncio.get_running_loop()
    real = loop.time
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "time", lambda: real() + seconds)
        patch.setattr(aiohttp.connector, "monotonic", lambda: real() + seconds)
        yield


@CLIENTS
async def test_idle_timeout_is_exact_at_reuse_not_at_the_next_sweep(start: Start, make: Any) -> None:
    """The pool's sweeper ticks every second here (read_timeout 300 s); a connection idle past
    idle_timeout must still not be handed out between two ticks."""

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(n))
        return True

    upstream = await start(respond)
    client = make(upstream.port, idle_timeout=0.15)
    try:
        await fetch(client)
        await fetch(client)
        await asyncio.sleep(0.25)
        await fetch(client)
        assert [conn for conn, _ in upstream.seen] == [1, 1, 2]
    finally:
        await client.close()


@CLIENTS
async def test_an_upstream_keep_alive_timeout_shortens_the_idle_limit(start: Start, make: Any) -> None:

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(keep_alive(n, 2))  # 2 s announced: kept idle for 1 s at most
        return True

    upstream = await start(respond)
    client = make(upstream.port)
    try:
        await fetch(client)
        await fetch(client)  # within the limit: reused
        with idle_for(client, 1.1):
            await fetch(client)
        assert [conn for conn, _ in upstream.seen] == [1, 1, 2]
    finally:
        await client.close()


@CLIENTS
async def test_a_keep_alive_timeout_of_one_second_is_never_reused(start: Start, make: Any) -> None:

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(keep_alive(n, 1))
        return True

    upstream = await start(respond)
    client = make(upstream.port)
    try:
        for n in (1, 2, 3):
            assert await fetch(client) == b'{"n": %d}' % n
        assert [conn for conn, _ in upstream.seen] == [1, 2, 3]
        if isinstance(client, PooledUpstream):
            assert client._open == 0 and not client._idle
    finally:
        await client.close()


@CLIENTS
async def test_an_idle_timeout_of_zero_means_a_connection_per_request(start: Start, make: Any) -> None:

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(ok(n))
        return True

    upstream = await start(respond)
    client = make(upstream.port, idle_timeout=0.0)
    try:
        for _ in range(3):
            await fetch(client)
        assert [conn for conn, _ in upstream.seen] == [1, 2, 3]
    finally:
        await client.close()


async def test_the_sweeper_closes_connections_past_their_own_limits(start: Start) -> None:
    """Limits differ per connection: the idle list's order is not the order of expiry."""

    async def respond(up: Upstream, n: int, conn: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(keep_alive(n, 3 if conn == 1 else None))  # conn 1: 2 s; conn 2: idle_timeout
        return True

    upstream = await start(respond)
    client = pool(upstream.port, idle_timeout=10.0, pool_size=2)
    try:
        await asyncio.gather(fetch(client), fetch(client))
        assert len(client._idle) == 2
        now = asyncio.get_running_loop().time()
        client._expire(now + 5, 300.0)
        assert len(client._idle) == 1 and client._idle[0].idle_limit == 10.0
        assert_pool_empty(client)
        client._expire(now + 11, 300.0)
        assert not client._idle and client._open == 0
    finally:
        await client.close()
