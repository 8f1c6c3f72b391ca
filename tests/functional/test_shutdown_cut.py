"""The end of a stopping gateway's grace: streams still running end with an error event the SDKs
raise as retryable, a client that reads nothing does not hold up the stop, and requests still
waiting on their upstream are answered a retryable 503, refunded and audited as shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from openai.types.responses import ResponseErrorEvent

from gateway.server import CUT_NOTICE
from gateway.stages.draining import SHUTTING_DOWN
from gateway.upstream.mock.options import HEADER_FIRST_BYTE_DELAY_MS
from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway
from tests.support.stopping import (
    AUTH,
    CHAT,
    SLACK,
    chat_body,
    error_ending,
    exit_code_within,
    running,
    sse_events,
    sse_json,
    stream,
    until,
)


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


