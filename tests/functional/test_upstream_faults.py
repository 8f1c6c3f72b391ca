"""A buggy or hostile upstream, seen through the whole gateway on both upstream clients.

Every case ends in a clean 502/504 in the API's error shape (or a correct relay), never a hang,
a 500, or a next response corrupted by what the previous one left on a reused connection: each
test sends a second request after the faulty one and checks it got its own answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from tests.conftest import GatewayFactory
from tests.support.gateway import CLIENT_KEY, RunningGateway
from tests.support.raw_upstream import Exchange, RawFactory, chunk, raw_upstreams, wait_for_eof

CHAT = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
AUTH = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}
CLIENTS = ["pool", "session"]


def answer(n: int) -> bytes:
    """A complete chat completion whose content names the request it answers."""
    body = orjson.dumps({"id": f"r{n}", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": f"answer {n}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body))


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = (b'data: {"id":"s","object":"chat.completion.chunk",'
         b'"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawFactory]:
    """``await raw_upstream(respond)`` starts a raw upstream, stopped after the test."""
    async with raw_upstreams() as start:
        yield start


def settings(client: str, **extra: str) -> str:
    lines = {"client": client, "pool_size": "1", "read_timeout": "2s", **extra}
    return "\n".join(f"{k}: {v}" for k, v in lines.items())


async def call(gw: RunningGateway, body: bytes = BODY, method: str = "POST",
               path: str = CHAT) -> tuple[int, bytes, CIMultiDictProxy[str]]:
    async with aiohttp.ClientSession() as s, s.request(method, gw.url + path, data=body if method == "POST"
                                                       else None, headers=AUTH) as r:
        return r.status, await r.read(), r.headers


async def assert_answers(gw: RunningGateway, n: int) -> None:
    """The next request gets its own, uncorrupted answer."""
    status, body, _ = await call(gw)
    assert status == 200, body
    assert orjson.loads(body)["choices"][0]["message"]["content"] == f"answer {n}"


def assert_error(status: int, body: bytes, headers: CIMultiDictProxy[str], expected: int,
                 text: str = "") -> None:
    assert status == expected, body
    error = orjson.loads(body)["error"]
    assert error["type"] and text in error["message"], error
    assert headers["x-should-retry"] == "true"


# -- 1. a connection never goes back to the pool with a response still on it ----------------

@pytest.mark.parametrize("client", CLIENTS)
async def test_client_gone_mid_stream_leaves_nothing_for_the_next_request(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            ex.writer.write(SSE_HEAD + chunk(EVENT))
            await ex.writer.drain()
            return await wait_for_eof(ex)  # the model keeps generating until the gateway hangs up
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client)) as gw:
        session = aiohttp.ClientSession()
        resp = await session.post(gw.url + CHAT, data=STREAM_BODY, headers=AUTH)
        assert await resp.content.readline() == EVENT.split(b"\n")[0] + b"\n"
        resp.close()
        await session.close()
        await assert_answers(gw, 2)
    assert upstream.connections == 2
    assert upstream.closed_by_client >= 1  # the abandoned stream's connection was closed


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_refused_too_large_response_is_not_left_on_the_connection(
        client: str, declared: bool, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:
    big = b'{"pad":"' + b"x" * 4096 + b'"}'

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            if declared:  # the length alone refuses it: the body is never read
                ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(big), big[:100]))
                return await wait_for_eof(ex)
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(big))
            return await wait_for_eof(ex)  # and more would follow
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    extra = settings(client, max_response_bytes="1KiB")
    async with start_gateway(upstream.url, upstream_extra=extra) as gw:
        status, body, headers = await call(gw)
        assert_error(status, body, headers, 502, "too large")
        await assert_answers(gw, 2)
    assert upstream.connections == 2


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_read_timeout_mid_body_is_a_504_and_the_connection_is_dropped(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 100\r\n\r\n{\"partial")
            await ex.writer.drain()
            await asyncio.sleep(0.6)  # silent past read_timeout, then the rest arrives
            ex.writer.write(b"x" * 90)
            return await wait_for_eof(ex)
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client, read_timeout="250ms")) as gw:
        status, body, headers = await call(gw)
        assert_error(status, body, headers, 504)
        await assert_answers(gw, 2)
    assert upstream.connections == 2


# -- 2. response edge cases -----------------------------------------------------------------

@dataclass
class Case:
    response: bytes
    status: int  # what the client gets
    text: str = ""  # in the error message, or the relayed body
    keep_open: bool = True  # the upstream serves the connection on after this response
    then: bytes = b""  # written after a pause (a fault after the headers)
    reused: bool = False  # the connection may serve the next request


ANSWER = b'{"ok":true}'
CASES = {
    # Connection: close announced but the upstream keeps the socket open: it must not be reused.
    "connection-close": Case(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 11\r\n\r\n" + ANSWER, 200, "true"),
    "http-1.0-until-eof": Case(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + ANSWER,
                               200, "true", keep_open=False),
    "chunked-and-content-length": Case(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n" + chunk(ANSWER) + b"0\r\n\r\n",
                                       502, "malformed"),
    "malformed-chunk-size": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 502,
                                 "malformed"),
    "malformed-chunk-mid-body": Case(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"{"),
                                     502, "failed", then=b"not-hex\r\n"),
    "header-block-too-large": Case(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\nContent-Length: 2"
                                   b"\r\n\r\n{}", 502, "malformed"),
    "too-many-headers": Case(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(300))
                             + b"Content-Length: 2\r\n\r\n{}", 502, "malformed"),
    "1xx-then-final": Case(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
                           + ANSWER, 200, "true", reused=True),
    "101-unasked": Case(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
                        502, "malformed"),
    "204": Case(b"HTTP/1.1 204 No Content\r\nContent-Type: application/json\r\n\r\n", 204, reused=True),
    "304-with-length": Case(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 999999999999\r\n\r\n", 304,
                            reused=True),
    "content-length-short-then-eof": Case(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                          b"Content-Length: 100\r\n\r\n{\"a\"", 502, "failed",
                                          keep_open=False),
    "not-http": Case(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", 502, "malformed"),
    "closed-before-any-byte": Case(b"", 502, "failed", keep_open=False),
}


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("name", list(CASES))
async def test_upstream_response_edge_case(client: str, name: str, raw_upstream: RawFactory,
                                           start_gateway: GatewayFactory) -> None:
    case = CASES[name]

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            ex.writer.write(case.response)
            if case.then:
                await ex.writer.drain()
                await asyncio.sleep(0.05)
                ex.writer.write(case.then)
            await ex.writer.drain()
            return case.keep_open
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client)) as gw:
        started = time.monotonic()
        status, body, headers = await call(gw)
        assert time.monotonic() - started < 1.5  # an answer, not the read timeout's (2 s)
        if case.status >= 500:
            assert_error(status, body, headers, case.status, case.text)
        else:
            assert status == case.status
            assert case.text.encode() in body if case.text else body == b""
        await assert_answers(gw, 2)
    assert upstream.connections == (1 if case.reused else 2)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("fault", ["malformed-chunk", "eof-mid-chunk"])
async def test_a_stream_broken_after_its_first_event_ends_with_an_error_event(
        client: str, fault: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            ex.writer.write(SSE_HEAD + chunk(EVENT))
            await ex.writer.drain()
            await asyncio.sleep(0.05)
            ex.writer.write(b"zz\r\n" if fault == "malformed-chunk" else b"400\r\ndata: {")
            await ex.writer.drain()
            return fault == "malformed-chunk"
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client)) as gw:
        started = time.monotonic()
        status, body, _ = await call(gw, STREAM_BODY)
        assert time.monotonic() - started < 1.5
        assert status == 200
        first, last = body.split(b"\n\n")[0], body.rstrip().split(b"\n\n")[-1]
        assert first + b"\n\n" == EVENT
        assert b'"type":"' in last and b"error" in last
        await assert_answers(gw, 2)
    assert upstream.connections == 2


# -- stale keep-alive connections --------------------------------------------------------------

async def _closes_second_request(ex: Exchange) -> bool:
    """Answers the first request on a connection keep-alive, then closes on the next one without
    a byte: a keep-alive timeout racing the gateway's reuse."""
    if ex.conn == 1 and ex.n > 1:
        return False
    ex.writer.write(answer(ex.n))
    return True


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_post_on_a_stale_connection_is_not_retried(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:
    """The upstream may have read the request before closing: a retried POST could generate (and
    bill) twice. The client gets a retryable 502 and its SDK decides."""
    upstream = await raw_upstream(_closes_second_request)
    async with start_gateway(upstream.url, upstream_extra=settings(client)) as gw:
        await assert_answers(gw, 1)
        status, body, headers = await call(gw)
        assert_error(status, body, headers, 502)
        assert len(upstream.requests) == 2  # sent once
        await assert_answers(gw, 3)  # on a fresh connection


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_idempotent_get_on_a_stale_connection_is_retried_on_a_fresh_one(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:
    upstream = await raw_upstream(_closes_second_request)
    async with start_gateway(upstream.url, upstream_extra=settings(client)) as gw:
        await assert_answers(gw, 1)
        status, body, _ = await call(gw, method="GET", path="/v1/models")
        assert status == 200, body
        assert orjson.loads(body)["choices"][0]["message"]["content"] == "answer 3"
    assert [(ex.conn, ex.head.split(b" ")[0]) for ex in upstream.requests] == [
        (1, b"POST"), (1, b"GET"), (2, b"GET")]


# -- 3. deadlines ------------------------------------------------------------------------------

@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("what", ["no-headers", "headers-then-stall", "stream-then-stall"])
async def test_a_stalled_upstream_does_not_hold_the_client(
        client: str, what: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            if what == "headers-then-stall":
                ex.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 50\r\n\r\n{")
            elif what == "stream-then-stall":
                ex.writer.write(SSE_HEAD + chunk(EVENT))
            await ex.writer.drain()
            return await wait_for_eof(ex)
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client, read_timeout="300ms")) as gw:
        started = time.monotonic()
        async with asyncio.timeout(5):
            status, body, headers = await call(gw, STREAM_BODY if what == "stream-then-stall" else BODY)
        assert time.monotonic() - started < 2
        if what == "stream-then-stall":
            assert status == 200 and body.startswith(EVENT)
            assert b"did not answer in time" in body.rstrip().split(b"\n\n")[-1]
        else:
            assert_error(status, body, headers, 504, "did not answer in time")
        await assert_answers(gw, 2)
    assert upstream.connections == 2


@pytest.mark.parametrize("client", CLIENTS)
async def test_waiting_for_a_free_connection_is_bounded_by_the_connect_timeout(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:
    release = asyncio.Event()

    async def respond(ex: Exchange) -> bool:
        if ex.n == 1:
            await release.wait()  # a long generation holds the only connection
        ex.writer.write(answer(ex.n))
        return True

    upstream = await raw_upstream(respond)
    extra = settings(client, connect_timeout="300ms", read_timeout="10s")
    async with start_gateway(upstream.url, upstream_extra=extra) as gw:
        first = asyncio.create_task(call(gw))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        status, body, headers = await call(gw)
        assert time.monotonic() - started < 1.5
        assert_error(status, body, headers, 504)
        release.set()
        assert (await first)[0] == 200
        await assert_answers(gw, 2)


# -- 4. pool accounting through the gateway ------------------------------------------------------

@pytest.mark.parametrize("client", CLIENTS)
async def test_two_hundred_failures_leak_no_pool_slot(
        client: str, raw_upstream: RawFactory, start_gateway: GatewayFactory) -> None:
    faults = [b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{",
              b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\nzz\r\n"]
    healthy = False

    async def respond(ex: Exchange) -> bool:
        if healthy:
            ex.writer.write(answer(ex.n))
            return True
        ex.writer.write(faults[ex.n % len(faults)])
        await ex.writer.drain()
        return False

    upstream = await raw_upstream(respond)
    async with start_gateway(upstream.url, upstream_extra=settings(client, pool_size="2")) as gw:
        async with aiohttp.ClientSession() as s:

            async def one() -> int:
                async with s.post(gw.url + CHAT, data=BODY, headers=AUTH) as r:
                    await r.read()
                    return r.status

            async with asyncio.timeout(20):
                statuses = await asyncio.gather(*(one() for _ in range(200)))
            assert set(statuses) == {502}
            healthy = True
            async with asyncio.timeout(5):
                statuses = await asyncio.gather(*(one() for _ in range(10)))
            assert statuses == [200] * 10
