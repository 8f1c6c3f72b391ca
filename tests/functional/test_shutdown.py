"""Stopping a running gateway as a rolling deploy does (``shutdown.drain_delay`` and ``grace``):
readiness red while it keeps serving with ``Connection: close``, then the listener closes, streams
in flight finish (or are cut at the end of the grace, with an error event the SDKs raise),
requests still waiting on their upstream at the cut are answered a retryable 503, and the process
exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from openai.types.responses import ResponseErrorEvent

from gateway.server import CUT_NOTICE, SAME_SIGNAL_WINDOW, StopSignals
from gateway.stages.draining import SHUTTING_DOWN
from gateway.upstream.mock.options import HEADER_FIRST_BYTE_DELAY_MS
from gateway.upstream.mock_server import MockServer
from tests.support import processes
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway, write_keys_file
from tests.support.redis_servers import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
ALLOW = "version: 1\nrules:\n  - id: big-n\n    when: {field: request.n, gt: 8}\n    deny: true\n"
DENY = ("version: 1\nrules:\n  - id: closed\n    when: {field: request.route, equals: chat.completions}\n"
        "    deny: true\n")
# Process start-up and teardown (interpreter, imports, components) on a loaded CI machine.
SLACK = 2.0


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin_port: int, tmp: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.admin_port = admin_port
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.tmp = tmp

    def admin_url_of(self, worker: int) -> str:
        return f"http://127.0.0.1:{self.admin_port + worker}"

    def access_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.tmp / "access.jsonl").read_text().splitlines() if line]

    def stderr(self) -> str:
        return (self.tmp / "gw.log").read_text()


@asynccontextmanager
async def running(tmp: Path, shutdown: str, extra: str = "", workers: int = 1,
                  upstream: str | None = None) -> AsyncIterator[Gateway]:
    """A gateway process; its upstream is the mock it starts itself, or the one at ``upstream``
    (a mock in the test's process, whose state the test reads)."""
    (tmp / "pol").mkdir(exist_ok=True)
    (tmp / "pol" / "rules.yaml").write_text(ALLOW)
    port, admin_port = free_port(), free_port(following=workers - 1)  # an admin port per worker
    path = tmp / "gateway.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{enabled: true, port: {admin_port}}}\n"
        + (f"upstreams: [{{name: mock, base_url: '{upstream}'}}]\n" if upstream else
           "mock_upstream: {enabled: true, port: 0, chunks: 4}\n") +
        f"identity: {{keys_file: {write_keys_file(tmp)}}}\n"
        "policies: {dir: pol, watch: false}\n"
        "logging: {access_log: access.jsonl, audit_log: null}\n"
        f"shutdown: {shutdown}\n" + extra
    )
    with (tmp / "gw.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(path),
                                 "--workers", str(workers)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    gw = Gateway(proc, port, admin_port, tmp)
    try:
        await wait_ready(gw)
        yield gw
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def wait_ready(gw: Gateway, timeout: float = 30.0, url: str | None = None) -> None:
    await processes.wait_ready(url or gw.url, gw.proc, timeout, gw.stderr)


def chat_body(stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def chat(url: str) -> tuple[int, str | None]:
    """A request on a new connection: its status and its Connection header."""
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=chat_body(), headers=AUTH) as r:
        await r.read()
        return r.status, r.headers.get("Connection")


async def get(url: str) -> tuple[int, dict[str, Any], str | None]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json(), r.headers.get("Connection")


@asynccontextmanager
async def stream(url: str, chunks: int, delay_ms: int) -> AsyncIterator[aiohttp.ClientResponse]:
    """A streamed chat completion whose first event has arrived."""
    headers = {**AUTH, "x-mock-chunks": str(chunks), "x-mock-chunk-delay-ms": str(delay_ms)}
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=chat_body(stream=True),
                                                    headers=headers) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
        yield r


def sse_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


def sse_json(event: bytes) -> dict[str, Any]:
    """The data of an event (one ``data:`` line, as the gateway writes them)."""
    data = next(line for line in event.split(b"\n") if line.startswith(b"data: "))
    value = json.loads(data[6:])
    assert isinstance(value, dict)
    return value


async def error_ending(stream: AsyncIterable[Any]) -> Exception:
    """What an SDK stream raises once it has been read to its end; it must raise."""
    try:
        async for _ in stream:
            pass
    except Exception as exc:
        return exc
    raise AssertionError("the stream ended without an error")


async def events_of(url: str, chunks: int) -> int:
    """How many events a whole stream of ``chunks`` deltas has."""
    async with stream(url, chunks, 0) as r:
        return 1 + (await r.read()).count(b"\n\n")


class RawConnection:
    """One keep-alive HTTP/1.1 connection, to see what happens to it exactly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, path: str) -> dict[str, str]:
        """The response's status line and headers (lower-cased names); the body is read."""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode()
        status, *lines = head.strip().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        await self.reader.readexactly(int(headers["content-length"]))
        return {"status": status, **headers}

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 5) == b""

    def close(self) -> None:
        self.writer.close()


async def connect(gw: Gateway) -> RawConnection:
    return RawConnection(*await asyncio.open_connection("127.0.0.1", gw.port))


async def refused(gw: Gateway) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def exit_code_within(gw: Gateway, seconds: float) -> int:
    try:
        return gw.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {seconds:g}s:\n{gw.stderr()}") from None


async def test_sigterm_drains_with_connection_close_then_finishes_streams_and_exits_0(tmp_path: Path) -> None:
    drain, grace = 1.0, 2.0
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}") as gw:
        whole = await events_of(gw.url, 20)
        kept = await connect(gw)
        before = await kept.get("/healthz")
        assert before["status"] == "HTTP/1.1 200 OK" and "connection" not in before  # keep-alive
        async with stream(gw.url, 20, 100) as slow:  # 2 s: past the drain, within the grace
            gw.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            # Draining: readiness red at once, on both listeners, with the reason.
            await asyncio.sleep(0.2)
            status, body, connection = await get(gw.url + "/readyz")
            assert (status, body["ready"], body["not_ready"]) == (503, False, {"shutdown": "draining"})
            assert connection == "close"
            status, body, _ = await get(gw.admin_url + "/readyz")
            assert (status, body["not_ready"]) == (503, {"shutdown": "draining"})
            # New connections are still served, and told to go elsewhere afterwards.
            assert await chat(gw.url) == (200, "close")
            # So is a keep-alive connection opened before the signal: answered, then closed.
            after = await kept.get("/healthz")
            assert after["status"] == "HTTP/1.1 200 OK" and after["connection"] == "close"
            assert await kept.closed_by_server()
            kept.close()
            assert time.monotonic() - sent < drain, "the checks above must run within the drain"
            # After the drain the listener is closed: new connections are refused.
            while not await refused(gw):
                assert time.monotonic() - sent < drain + 0.5, "still accepting after the drain delay"
                await asyncio.sleep(0.05)
            assert time.monotonic() - sent >= drain - 0.1
            status, body, _ = await get(gw.admin_url + "/readyz")
            assert (status, body["not_ready"]) == (503, {"shutdown": "finishing"})
            # The stream that was running goes on to its end, intact.
            rest = await slow.read()
            assert rest.endswith(b"data: [DONE]\n\n")
            assert 1 + rest.count(b"\n\n") == whole
        assert exit_code_within(gw, sent + drain + grace + SLACK - time.monotonic()) == 0
    assert "cut" not in gw.stderr()
    records = gw.access_records()
    assert [r["status"] for r in records] == [200, 200, 200]  # the two streams and the drain's request
    assert not any(r.get("client_disconnected") for r in records)


async def test_a_stream_longer_than_the_grace_ends_with_a_shutdown_error_and_is_settled_as_cut(
        tmp_path: Path) -> None:
    drain, grace = 0.5, 1.0
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}") as gw:
        async with stream(gw.url, 200, 100) as endless:  # 20 s
            gw.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            # The response ends properly (its chunked body terminated), on a whole event: the
            # error in the chat completions grammar, and no [DONE].
            rest = await endless.read()
            cut_after = time.monotonic() - sent
        assert drain + grace - 0.1 <= cut_after < drain + grace + 1.0  # the event is sent at once
        events = sse_events(rest)
        assert all(e.startswith(b"data: {") for e in events)
        assert [e for e in events if b'"error"' in e] == [events[-1]]
        assert sse_json(events[-1]) == {"error": {
            "message": "The gateway is shutting down; retry the request.", "type": "server_error",
            "param": None, "code": "service_unavailable"}}
        assert exit_code_within(gw, sent + drain + grace + CUT_NOTICE + SLACK - time.monotonic()) == 0
    assert "cut 1 requests still running (1 streams ended with a shutdown error event" in gw.stderr()
    cut = gw.access_records()[-1]
    # Settled as an abandoned stream: what was relayed, and the prompt it consumed.
    assert cut["status"] == 499 and cut["client_disconnected"] is True
    assert cut["input_tokens"] > 0 and cut["output_tokens"] > 0


async def test_the_sdks_raise_a_retryable_shutdown_error_on_streams_the_grace_cut(tmp_path: Path) -> None:
    """Chat completions and Responses through the openai SDK, messages through the anthropic SDK,
    and a Responses stream read raw, all cut at once: each SDK raises its API error class with the
    gateway's message, not a connection or parse error."""
    drain, grace = 0.5, 1.0
    slow = {"x-mock-chunks": "200", "x-mock-chunk-delay-ms": "100"}  # 20 s each
    message = SHUTTING_DOWN.message
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}") as gw, \
            openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0) as oai, \
            anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as claude, \
            aiohttp.ClientSession() as raw:
        chat = await oai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True, extra_headers=slow)
        responses = await oai.responses.create(model="m", input="hi", stream=True, extra_headers=slow)
        messages = await claude.messages.create(
            model="claude-test", max_tokens=1000, messages=[{"role": "user", "content": "hi"}],
            stream=True, extra_headers=slow)
        chats, responses_events = chat.__aiter__(), responses.__aiter__()
        message_events = messages.__aiter__()
        async with raw.post(gw.url + "/v1/responses", json={"model": "m", "input": "hi", "stream": True},
                            headers={**AUTH, **slow}) as raw_responses:
            await raw_responses.content.readuntil(b"\n\n")
            # Each stream is running: a first event has arrived.
            await chats.__anext__()
            await responses_events.__anext__()
            await message_events.__anext__()
            gw.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            chat_error, responses_error, messages_error, raw_body = await asyncio.gather(
                error_ending(chats), error_ending(responses_events), error_ending(message_events),
                raw_responses.read())
        assert time.monotonic() - sent < drain + grace + CUT_NOTICE + SLACK
        assert exit_code_within(gw, sent + drain + grace + CUT_NOTICE + SLACK - time.monotonic()) == 0

    # openai: an event with an "error" key raises APIError itself (its subclass
    # APIConnectionError is what a cut connection gives).
    for error in (chat_error, responses_error):
        assert type(error) is openai.APIError, repr(error)
        assert error.message == message
        assert isinstance(error.body, dict) and error.body["type"] == "server_error"
    # anthropic: an ``error`` event raises the class of its status (200: APIStatusError), with the
    # Anthropic error type of an overload, which its clients retry.
    assert type(messages_error) is anthropic.APIStatusError, repr(messages_error)
    assert message in messages_error.message
    assert messages_error.body == {"type": "error", "error": {"type": "overloaded_error", "message": message}}
    # The Responses ``error`` event: the documented fields, numbered after the last event relayed.
    *before, last = sse_events(raw_body)
    assert last.startswith(b"event: error\n")
    event = ResponseErrorEvent.model_validate(sse_json(last))
    assert (event.message, event.code) == (message, "service_unavailable")
    assert event.sequence_number == sse_json(before[-1])["sequence_number"] + 1

    assert "cut 4 requests still running (4 streams ended with a shutdown error event" in gw.stderr()
    records = gw.access_records()  # in the order they ended
    assert sorted(r["route"] for r in records) == ["chat.completions", "messages", "responses", "responses"]
    assert all(r["status"] == 499 and r["client_disconnected"] and r["output_tokens"] > 0 for r in records)


async def test_a_stream_whose_client_reads_nothing_is_cut_without_waiting_on_it(tmp_path: Path) -> None:
    """The shutdown error event is not worth a stop that hangs: a client that stopped reading
    (its receive window full, the gateway's write waiting) is cut when the notice ends."""
    drain, grace = 0.2, 0.5
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}") as gw:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills fast; no autotuning
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            body = json.dumps(chat_body(stream=True)).encode()
            # Some 24 MB of events, more than the socket buffers between the gateway and this
            # client hold: the gateway's writes block long before the grace ends.
            await loop.sock_sendall(sock, (
                f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: {AUTH['Authorization']}\r\n"
                "Content-Type: application/json\r\nx-mock-chunks: 100000\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
            await asyncio.sleep(0.5)  # the gateway's buffers fill
            gw.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            assert exit_code_within(gw, drain + grace + CUT_NOTICE + SLACK) == 0
            assert time.monotonic() - sent < drain + grace + CUT_NOTICE + SLACK
        finally:
            sock.close()
    assert "cut 1 requests still running" in gw.stderr()
    cut = gw.access_records()[-1]
    assert cut["status"] == 499 and cut["client_disconnected"] is True


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# The model takes its time to answer: no response head before the grace runs out.
SLOW_MODEL = {HEADER_FIRST_BYTE_DELAY_MS: "60000"}


async def test_requests_waiting_on_their_upstream_at_the_cut_get_a_retryable_503(
        tmp_path: Path, mock_upstream: MockServer) -> None:
    """Requests whose upstream has not answered when the grace runs out (a slow model, a long
    prompt), streamed or not, through the openai and anthropic SDKs: each gets a 503 in its API's
    shape that the SDK raises as a status error with the gateway's message (a retry, with
    ``max_retries`` above 0), not a connection reset; and the model is told to stop."""
    drain, grace = 0.2, 0.5
    message = SHUTTING_DOWN.message
    chat_args: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                 "extra_headers": SLOW_MODEL}
    messages_args: dict[str, Any] = {"model": "claude-test", "max_tokens": 1000, "extra_headers": SLOW_MODEL,
                                     "messages": [{"role": "user", "content": "hi"}]}
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}",
                       upstream=mock_upstream.url) as gw, \
            openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0) as oai, \
            anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as claude:
        calls = [asyncio.ensure_future(call) for call in (
            oai.chat.completions.create(**chat_args),
            oai.chat.completions.create(**chat_args, stream=True),
            claude.messages.create(**messages_args),
            claude.messages.create(**messages_args, stream=True))]
        state = mock_upstream.state
        await until(lambda: state.requests_total == len(calls))  # all four wait on the model
        gw.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        answered_after = time.monotonic() - sent
        assert exit_code_within(gw, sent + drain + grace + CUT_NOTICE + SLACK - time.monotonic()) == 0
        # The gateway closed each upstream request: the model stopped waiting to answer.
        await until(lambda: state.requests_cancelled == len(calls))
    assert drain + grace - 0.1 <= answered_after < drain + grace + CUT_NOTICE + 1.0

    chat_error, chat_stream_error, messages_error, messages_stream_error = outcomes
    for error in (chat_error, chat_stream_error):
        assert type(error) is openai.InternalServerError, repr(error)
        assert error.status_code == 503 and error.message.endswith(message)
        assert error.body == {"message": message, "type": "server_error", "param": None,
                              "code": "service_unavailable"}
    for error in (messages_error, messages_stream_error):
        assert isinstance(error, anthropic.APIStatusError), repr(error)
        assert error.status_code == 503 and message in error.message
        assert error.body == {"type": "error", "error": {"type": "overloaded_error", "message": message}}
    for error in outcomes:
        assert isinstance(error, openai.APIStatusError | anthropic.APIStatusError)
        # What makes an SDK retry it, elsewhere and soon, when retries are on.
        headers = error.response.headers
        hints = (headers["connection"], headers["retry-after"], headers["x-should-retry"])
        assert hints == ("close", "1", "true")

    assert ("cut 4 requests still running (0 streams ended with a shutdown error event, where their "
            "client was reading; 4 requests waiting on their upstream answered 503)") in gw.stderr()
    records = gw.access_records()
    assert sorted(r["route"] for r in records) == ["chat.completions"] * 2 + ["messages"] * 2
    for record in records:
        # Answered, not cut: and nothing of the model's to count.
        assert record["status"] == 503 and "client_disconnected" not in record, record
        assert "upstream_status" not in record and record["output_tokens"] == 0


QUOTA = """version: 1
rules:
  - id: per-account
    quota:
      limits:
        - {name: tpd, kind: total_tokens, limit: 100000, per: 1d, key: [principal.account]}
        - {name: conc, kind: concurrency, limit: 4, key: [principal.account]}
"""


@pytest.fixture(params=["pool", "session"])
async def quota_gateway(request: pytest.FixtureRequest, mock_upstream: MockServer,
                        tmp_path: Path) -> AsyncIterator[RunningGateway]:
    """A gateway in this process, with a token quota and an audit log, on each upstream client
    (both must close the upstream request they are cancelled in)."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "quota.yaml").write_text(QUOTA)
    policies = f"policies: {{dir: {tmp_path / 'policies'}, watch: false}}\n"
    config = gateway_yaml(mock_upstream.url, tmp_path, policies, f"client: {request.param}",
                          audit_log=tmp_path / "audit.jsonl")
    async with run_gateway(config, tmp_path) as gw:
        yield gw


async def test_a_request_answered_503_at_the_cut_is_refunded_and_audited_as_shutdown(
        quota_gateway: RunningGateway, mock_upstream: MockServer) -> None:
    """The 503 of a request whose upstream had not answered: its quota reservation is given back
    whole (the client got nothing and is told to retry, and its retry pays), the audit record
    says why, and a request reaching the forwarder after the cut is answered at once, its
    upstream never asked."""
    gw = quota_gateway
    body = {"model": "m", "max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}
    state = mock_upstream.state
    async with aiohttp.ClientSession() as s:
        async def post() -> tuple[int, dict[str, Any], str | None]:
            async with s.post(gw.url + CHAT, json=body, headers={**AUTH, **SLOW_MODEL}) as r:
                return r.status, await r.json(), r.headers.get("Retry-After")

        waiting = asyncio.ensure_future(post())
        await until(lambda: state.requests_total == 1)
        assert gw.runtime.waiting.end_all() == 1  # what the server does when its grace runs out
        assert await asyncio.wait_for(waiting, 5) == (503, {"error": {
            "message": SHUTTING_DOWN.message, "type": "server_error", "param": None,
            "code": "service_unavailable"}}, "1")
        await until(lambda: state.requests_cancelled == 1)
        # During the notice: no upstream request, the same answer.
        status, _, _ = await post()
        assert status == 503 and state.requests_total == 1
    cancelled, refused = await gw.audit_records()
    for record, how in ((cancelled, "upstream_cancelled"), (refused, "not_forwarded")):
        assert (record["status"], record["error_type"]) == (503, "unavailable")
        extra = record["extra"]
        assert isinstance(extra, dict) and extra["shutdown"] == how
        # Reserved when admitted (the prompt and max_tokens), all of it given back.
        quota = extra["quota"]
        assert quota["limits"] and quota["settled"] == {"input_tokens": 0, "output_tokens": 0}
    assert cancelled["upstream_status"] is None and not cancelled["client_disconnected"]


async def test_a_second_sigterm_ends_the_drain_and_sighup_reloads_during_it(tmp_path: Path) -> None:
    async with running(tmp_path, "{drain_delay: 20s, grace: 5s}") as gw:
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        (tmp_path / "pol" / "rules.yaml").write_text(DENY)
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while (answer := await chat(gw.url)) != (403, "close"):
            assert answer == (200, "close") and time.monotonic() < deadline, "SIGHUP did not reload"
            await asyncio.sleep(0.05)
        await asyncio.sleep(SAME_SIGNAL_WINDOW)
        idle = await connect(gw)  # a balancer's pooled connection: open, sending nothing
        assert gw.proc.poll() is None
        gw.proc.send_signal(signal.SIGTERM)
        hurried = time.monotonic()
        # Closed when the listener closes: an idle connection does not hold the grace.
        assert await idle.closed_by_server()
        idle.close()
        assert exit_code_within(gw, SLACK) == 0
        assert time.monotonic() - hurried < SLACK
    assert "a second signal ended the drain early" in gw.stderr()


def test_a_signal_delivered_twice_at_once_is_one_stop_request() -> None:
    """Ctrl-C reaches the workers from the terminal and through the supervisor: not a hurry."""
    now = [100.0]
    stop = StopSignals(lambda: now[0])
    stop.received()
    now[0] += SAME_SIGNAL_WINDOW / 10
    stop.received()
    assert stop.requested.is_set() and not stop.hurry.is_set()
    now[0] += SAME_SIGNAL_WINDOW
    stop.received()
    assert stop.hurry.is_set()


@pytest.mark.redis
async def test_workers_drain_and_finish_streams_before_the_supervisor_exits_0(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_CHALLENGE_SECRET", "shared-secret-for-the-test")
    extra = (f"store: {{backend: redis, redis: {{url: '{redis_server.url}'}}}}\n"
             f"risk: {{store: {{backend: redis, url: '{redis_server.url}'}}}}\n")
    drain, grace = 1.0, 3.0
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}", extra, workers=2) as gw:
        await wait_ready(gw, url=gw.admin_url_of(1))  # both workers serve (admin port + worker index)
        async with stream(gw.url, 20, 100) as slow:  # 2 s
            gw.proc.send_signal(signal.SIGTERM)  # to the supervisor, which forwards it
            sent = time.monotonic()
            await asyncio.sleep(0.2)
            assert await chat(gw.url) == (200, "close")
            assert (await slow.read()).endswith(b"data: [DONE]\n\n")
        assert await refused(gw)
        assert exit_code_within(gw, sent + drain + grace + SLACK - time.monotonic()) == 0
