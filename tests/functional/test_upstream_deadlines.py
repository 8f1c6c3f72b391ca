"""The deadlines around an upstream exchange, through the whole gateway on both upstream clients:
a client that stops reading a stream (``client_write_timeout``), an upstream that closes idle
connections sooner than the gateway would (``idle_timeout`` and ``Keep-Alive: timeout=N``), and
a response that trickles (``total_timeout``)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest

from gateway.stages.forward import _WriteDeadlines
from gateway.upstream.mock.options import HEADER_CHUNKS
from gateway.upstream.mock_server import MockServer
from tests.conftest import GatewayFactory
from tests.functional.test_upstream_faults import (
    BODY,
    CHAT,
    CLIENTS,
    EVENT,
    SSE_HEAD,
    STREAM_BODY,
    answer,
    assert_answers,
    assert_error,
    call,
    settings,
)
from tests.support.gateway import CLIENT_KEY, RunningGateway
from tests.support.raw_upstream import Exchange, RawFactory, chunk, raw_upstreams, wait_for_eof


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawFactory]:
    """``await raw_upstream(respond)`` starts a raw upstream, stopped after the test."""
    async with raw_upstreams() as start:
        yield start


# -- a client that stops reading a stream --------------------------------------------------------


async def open_stream(gw: RunningGateway, chunks: int) -> socket.socket:
    """A streaming request from a raw socket with a small receive buffer, nothing read yet."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: sets the window
    sock.setblocking(False)
    host, port = gw.url.removeprefix("http://").split(":")
    await loop.sock_connect(sock, (host, int(port)))
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {CLIENT_KEY}\r\n{HEADER_CHUNKS}: {chunks}\r\n"
            f"Content-Length: {len(STREAM_BODY)}\r\n\r\n").encode()
    await loop.sock_sendall(sock, head + STREAM_BODY)
    return sock


async def until(check: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not check():
            await asyncio.sleep(0.01)


def sample(gw: RunningGateway, name: str, **labels: str) -> float:
    return gw.runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def write_timeouts(gw: RunningGateway) -> float:
    return sample(gw, "tollgate_client_write_timeouts_total", upstream="mock")


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_client_that_stops_reading_frees_the_upstream_connection(
        client: str, mock_upstream: MockServer, start_gateway: GatewayFactory) -> None:
    extra = settings(client, client_write_timeout="500ms", read_timeout="10s", connect_timeout="10s")
    async with start_gateway(mock_upstream.url, upstream_extra=extra) as gw:
        metrics = gw.runtime.metrics
        sock = await open_stream(gw, 100_000)  # ~15 MB of events: far more than any buffer holds
        try:
            await until(lambda: metrics.active_streams.value == 1)
            started = time.monotonic()
            # The only connection (pool_size 1) is the stream's: this waits for it to be freed.
            status, body, _ = await call(gw)
            waited = time.monotonic() - started
            assert status == 200, body
            assert 0.5 <= waited < 3.0, waited  # the deadline, plus filling the buffers and a tick
            assert write_timeouts(gw) == 1
            assert sample(gw, "tollgate_client_disconnects_total") == 1
            assert metrics.active_streams.value == 0
            await until(lambda: [s.outcome for s in mock_upstream.state.streams] == ["cancelled"])
            records = await gw.access_records()
            assert records[0]["client_disconnected"] is True and records[0]["status"] == 499
        finally:
            sock.close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_client_that_pauses_shorter_than_the_deadline_gets_the_whole_stream(
        client: str, mock_upstream: MockServer, start_gateway: GatewayFactory) -> None:
    extra = settings(client, client_write_timeout="1s")
    async with start_gateway(mock_upstream.url, upstream_extra=extra) as gw:
        sock = await open_stream(gw, 20_000)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0.4)  # writes wait on the client meanwhile
            received = bytearray()
            async with asyncio.timeout(10):
                while not received.endswith(b"0\r\n\r\n"):  # the chunked body's end
                    part = await loop.sock_recv(sock, 65536)
                    assert part, bytes(received[-300:])
                    received += part
            assert b"data: [DONE]" in received
            assert write_timeouts(gw) == 0
        finally:
            sock.close()


# -- idle keep-alive connections -----------------------------------------------------------------

def keep_alive_answer(n: int, timeout: int) -> bytes:
    head, _, body = answer(n).partition(b"\r\n\r\n")
    return head + b"\r\nKeep-Alive: timeout=%d\r\n\r\n" % timeout + body


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_upstream_keep_alive_timeout_is_honoured(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:
    """The upstream announces 2 s and closes idle connections then. Its close racing a reuse is
    made deterministic: a request on a connection idle for more than 1.5 s gets no answer (it
    crossed the upstream's FIN). The gateway keeps a connection idle for 2 - 1 s at most, so
    requests 1.6 s apart each go on a new connection and all succeed."""
    last_answer: dict[int, float] = {}

    async def respond(ex: Exchange) -> bool:
        idle_since = last_answer.get(ex.conn)
        if idle_since is not None and time.monotonic() - idle_since > 1.5:
            return False  # closed without a byte: a POST here would be a 502
        ex.writer.write(keep_alive_answer(ex.n, 2))
        await ex.writer.drain()
        last_answer[ex.conn] = time.monotonic()
        return True

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client)) as gw:
        await assert_answers(gw, 1)
        await assert_answers(gw, 2)  # at once: the same connection
        await asyncio.sleep(1.6)
        await assert_answers(gw, 3)
    assert [ex.conn for ex in upstream.requests] == [1, 1, 2]


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_keep_alive_timeout_of_one_second_means_no_reuse(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(keep_alive_answer(ex.n, 1))
        return True

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client)) as gw:
        for n in (1, 2, 3):
            await assert_answers(gw, n)
    assert [ex.conn for ex in upstream.requests] == [1, 2, 3]


@pytest.mark.parametrize("client", CLIENTS)
async def test_idle_timeout_closes_connections_idle_longer(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client, idle_timeout="300ms")) as gw:
        await assert_answers(gw, 1)
        await assert_answers(gw, 2)
        await asyncio.sleep(0.5)
        await assert_answers(gw, 3)
    assert [ex.conn for ex in upstream.requests] == [1, 1, 2]


# -- a total deadline for responses that are not streams --------------------------------------------

async def trickle(ex: Exchange, head: bytes, pieces: list[bytes], every: float) -> bool:
    ex.writer.write(head)
    for piece in pieces:
        await ex.writer.drain()
        await asyncio.sleep(every)
        ex.writer.write(piece)
    await ex.writer.drain()
    return True


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_trickling_response_hits_the_total_timeout(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:
    """One byte every 200 ms: never silent for read_timeout (1 s), never done either."""
    body = orjson.dumps({"pad": "x" * 40})

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                    % len(body))
            await trickle(ex, head, [bytes([b]) for b in body], 0.2)
            return await wait_for_eof(ex)
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    extra = settings(client, read_timeout="1s", total_timeout="800ms")
    async with start_gateway(upstream.url, upstream_extra=extra) as gw:
        started = time.monotonic()
        status, body_out, headers = await call(gw)
        assert 0.75 < time.monotonic() - started < 1.5
        assert_error(status, body_out, headers, 504, "did not answer in time")
        await assert_answers(gw, 2)  # the trickling connection was closed, not reused
        assert sample(gw, "tollgate_upstream_errors_total", kind="timeout") == 1
    assert upstream.connections == 2


@pytest.mark.parametrize("client", CLIENTS)
async def test_the_total_timeout_bounds_the_wait_for_headers(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            # Interim responses keep the connection busy without ever answering.
            for _ in range(10):
                ex.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await ex.writer.drain()
                await asyncio.sleep(0.2)
            return await wait_for_eof(ex)
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    extra = settings(client, read_timeout="1s", total_timeout="500ms")
    async with start_gateway(upstream.url, upstream_extra=extra) as gw:
        started = time.monotonic()
        status, body, headers = await call(gw)
        assert time.monotonic() - started < 1.2
        assert_error(status, body, headers, 504)
        await assert_answers(gw, 2)


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_stream_may_outlast_the_total_timeout(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:
    """Streams of reasoning models run for minutes: the total deadline is lifted once the
    response is a stream; read_timeout still bounds its silences."""

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            await trickle(ex, SSE_HEAD + chunk(EVENT), [chunk(EVENT)] * 5 + [b"0\r\n\r\n"], 0.2)
            return True
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    extra = settings(client, read_timeout="1s", total_timeout="300ms")
    async with start_gateway(upstream.url, upstream_extra=extra) as gw:
        started = time.monotonic()
        status, body, _ = await call(gw, STREAM_BODY)
        assert time.monotonic() - started > 1.0
        assert status == 200
        assert body == EVENT * 6
        await assert_answers(gw, 2)
    assert upstream.connections == 1


@pytest.mark.parametrize("client", CLIENTS)
async def test_no_total_timeout_by_default(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        head, _, body = answer(ex.n).partition(b"\r\n\r\n")
        return await trickle(ex, head + b"\r\n\r\n", [body[i:i + 20] for i in range(0, len(body), 20)], 0.1)

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client, read_timeout="1s")) as gw:
        started = time.monotonic()
        async with aiohttp.ClientSession() as s, s.post(gw.url + CHAT, data=BODY, headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}) as r:
            assert r.status == 200
            assert orjson.loads(await r.read())["choices"][0]["message"]["content"] == "answer 1"
        assert time.monotonic() - started > 0.5


class _Transport(asyncio.Transport):
    aborted = False

    def abort(self) -> None:
        self.aborted = True


async def test_the_write_deadline_check_runs_only_while_streams_are_open() -> None:
    """One check for all streams, and none left scheduled when the last stream ends."""
    deadlines = _WriteDeadlines(0.1)
    loop = asyncio.get_running_loop()
    stuck, reading, idle = _Transport(), _Transport(), _Transport()
    blocked, flowing, between = deadlines.watch(stuck), deadlines.watch(reading), deadlines.watch(idle)
    blocked.since = loop.time()  # a write waiting on its client
    flowing.since = loop.time()
    await asyncio.sleep(0.06)
    flowing.since = 0.0  # that write completed in time
    await until(lambda: blocked.timed_out)
    assert stuck.aborted and not reading.aborted and not idle.aborted
    assert not flowing.timed_out and not between.timed_out
    deadlines.forget(flowing)
    deadlines.forget(between)
    await asyncio.sleep(0.1)
    assert deadlines._handle is None
    again = deadlines.watch(None)  # a new stream restarts the check
    assert deadlines._handle is not None
    deadlines.forget(again)
