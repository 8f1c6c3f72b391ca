"""A degraded response through the whole gateway: nothing it promises to strip reaches the client
(raw bytes checked), the official SDKs still parse it (their stream accumulators included) and the
access log still counts the real output tokens.

Two upstreams: the project's mock (what it emits for reasoning requests) and a canned upstream
replaying realistic provider payloads (tests/unit/apis/test_shaping_payloads.py) with awkward
framing and small chunks."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from gateway.upstream.mock.text import signature, words
from gateway.upstream.mock_server import MockServer
from tests.conftest import GatewayFactory
from tests.support.gateway import CLIENT_KEY, RunningGateway
from tests.unit.apis import test_shaping_payloads as p

DEGRADE = """\
version: 1
rules:
  - id: degrade-everyone
    when: {field: principal.authenticated, equals: true}
    friction:
      degrade: {strip_logprobs: true, strip_reasoning: true}
"""
PROMPT = "what is 2 + 2?"


def policy_yaml(tmp: Path) -> str:
    directory = tmp / "pol"
    directory.mkdir(exist_ok=True)
    (directory / "rules.yaml").write_text(DEGRADE)
    return f"policies: {{dir: {directory}, watch: false}}\n"


def oa(gw: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0)


def an(gw: RunningGateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0)


async def raw_post(gw: RunningGateway, path: str, body: dict[str, Any], **headers: str) -> bytes:
    """The exact bytes a client receives (what a harvester would store)."""
    async with aiohttp.ClientSession() as session, session.post(
        gw.url + path, json=body,
        headers={"authorization": f"Bearer {CLIENT_KEY}", "x-api-key": CLIENT_KEY, **headers},
    ) as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def last_output_tokens(gw: RunningGateway) -> int:
    record = (await gw.access_records())[-1]
    assert record["status"] == 200
    output = record["output_tokens"]
    assert isinstance(output, int)
    return output


# -- against the project's mock upstream ------------------------------------------------------
MOCK_REASONING = "".join(words(6, reasoning=True))  # what the mock thinks for chunks=6


def assert_mock_clean(blob: bytes) -> None:
    text = blob.decode()
    for marker in ("Considering", "answering", "briefly", "reasoning_content", signature(MOCK_REASONING)):
        assert marker not in text, (marker, text[:1500])


@pytest.fixture
async def degraded(mock_upstream: MockServer, start_gateway: GatewayFactory,
                   tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with start_gateway(mock_upstream.url, policy_yaml(tmp_path)) as gw:
        yield gw


async def test_mock_chat_reasoning_is_stripped(degraded: RunningGateway) -> None:
    body = {"model": "o4-mini", "reasoning_effort": "high", "messages": [{"role": "user", "content": PROMPT}]}
    assert_mock_clean(await raw_post(degraded, "/v1/chat/completions", body))
    assert await last_output_tokens(degraded) == 12  # 6 reasoning + 6 content tokens, still billed
    assert_mock_clean(await raw_post(degraded, "/v1/chat/completions", {**body, "stream": True}))
    assert await last_output_tokens(degraded) == 12
    async with oa(degraded) as c:
        async with c.chat.completions.stream(model="o4-mini", reasoning_effort="high",
                                             messages=[{"role": "user", "content": PROMPT}]) as stream:
            final = await stream.get_final_completion()
    assert final.choices[0].message.content and len(final.choices[0].message.content.split()) == 6


async def test_mock_responses_reasoning_items_are_stripped(degraded: RunningGateway) -> None:
    body = {"model": "o4-mini", "input": PROMPT, "reasoning": {"effort": "high"}}
    for stream in (False, True):
        blob = await raw_post(degraded, "/v1/responses", {**body, "stream": stream})
        assert b'"type":"reasoning"' not in blob and b"rs_mock" not in blob  # the mock's reasoning item
        assert await last_output_tokens(degraded) == 12
    async with oa(degraded) as c:
        async with c.responses.stream(model="o4-mini", input=PROMPT, reasoning={"effort": "high"}) as s:
            final = await s.get_final_response()
        created = await c.responses.create(model="o4-mini", input=PROMPT, reasoning={"effort": "high"})
    for response in (final, created):
        assert [item.type for item in response.output] == ["message"]
        assert len(response.output_text.split()) == 6


async def test_mock_anthropic_thinking_is_stripped(degraded: RunningGateway) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 2000,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": PROMPT}]}
    for stream in (False, True):
        assert_mock_clean(await raw_post(degraded, "/v1/messages", {**body, "stream": stream}))
        assert await last_output_tokens(degraded) == 12
    async with an(degraded) as c:
        async with c.messages.stream(**body) as s:  # type: ignore[arg-type]
            final = await s.get_final_message()
    assert [b.type for b in final.content] == ["text"] and final.usage.output_tokens == 12


# -- against a canned upstream with realistic provider payloads --------------------------------
@dataclass
class Canned:
    """Replays ``bodies[x-canned]`` in ``x-canned-chunk``-byte writes, in ``x-canned-framing``."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)


FRAMINGS: dict[str, Callable[[bytes], bytes]] = {
    "lf": lambda b: b,
    "crlf": lambda b: b.replace(b"\n", b"\r\n"),
    "no-space": lambda b: b.replace(b"data: ", b"data:").replace(b"event: ", b"event:"),
    "multi-line": lambda b: b.replace(b",", b",\ndata: "),
}
BODIES: dict[str, Callable[[], bytes]] = {
    "chat": lambda: p.sse([(None, c) for c in p.chat_chunks(n=2)], dumps=p.spaced, done=True),
    "chat-json": lambda: json.dumps(p.chat_body(n=2)).encode(),
    "responses": lambda: p.sse(list(p.responses_events(with_text=True))),
    "responses-json": lambda: json.dumps(p.responses_body()).encode(),
    "messages": lambda: p.sse(list(p.messages_events()), dumps=p.spaced),
    "messages-json": lambda: json.dumps(p.messages_body()).encode(),
    # Cut inside a thinking block: its last event is a signature_delta.
    "messages-cut": lambda: p.sse(list(p.messages_events()[:6])),
}


@contextlib.asynccontextmanager
async def serve_canned() -> AsyncIterator[Canned]:
    canned = Canned()

    async def handle(request: web.Request) -> web.StreamResponse:
        canned.requests.append(await request.json())
        name = request.headers["x-canned"]
        body = BODIES[name]()
        if name.endswith("-json"):
            return web.Response(body=body, content_type="application/json")
        body = FRAMINGS[request.headers.get("x-canned-framing", "lf")](body)
        if request.headers.get("x-canned-unterminated"):
            body = body.rstrip(b"\r\n")
        size = int(request.headers.get("x-canned-chunk", "0")) or len(body)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(0, len(body), size):
            await response.write(body[i:i + size])
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    app = web.Application()
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        app.router.add_post(path, handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        canned.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        yield canned
    finally:
        await runner.cleanup()


@pytest.fixture
async def canned(
    start_gateway: GatewayFactory, tmp_path: Path
) -> AsyncIterator[tuple[RunningGateway, Canned]]:
    async with serve_canned() as upstream, start_gateway(upstream.url, policy_yaml(tmp_path)) as gw:
        yield gw, upstream


def canned_headers(name: str, framing: str = "lf", chunk: int = 0) -> dict[str, str]:
    return {"x-canned": name, "x-canned-framing": framing, "x-canned-chunk": str(chunk)}


CASES = [(f, c) for f in FRAMINGS for c in (0, 7)]


@pytest.mark.parametrize(("framing", "chunk"), CASES)
async def test_canned_chat(canned: tuple[RunningGateway, Canned], framing: str, chunk: int) -> None:
    gw, _ = canned
    headers = canned_headers("chat", framing, chunk)
    body = {"model": "deepseek-reasoner", "n": 2, "logprobs": True, "top_logprobs": 2, "stream": True,
            "messages": [{"role": "user", "content": PROMPT}]}
    p.assert_clean(await raw_post(gw, "/v1/chat/completions", body, **headers))
    assert await last_output_tokens(gw) == p.OUTPUT_TOKENS
    async with oa(gw) as c:
        async with c.chat.completions.stream(
            model="deepseek-reasoner", n=2, logprobs=True, messages=[{"role": "user", "content": PROMPT}],
            extra_headers=headers,
        ) as stream:
            final = await stream.get_final_completion()
        whole = await c.chat.completions.create(
            model="deepseek-reasoner", n=2, logprobs=True, messages=[{"role": "user", "content": PROMPT}],
            extra_headers=canned_headers("chat-json"),
        )
    for completion in (final, whole):
        assert [ch.message.content for ch in completion.choices] == [p.VISIBLE, p.VISIBLE]
        assert all(ch.logprobs is None or not ch.logprobs.content for ch in completion.choices)
        p.assert_clean(completion.model_dump_json())
    assert await last_output_tokens(gw) == p.OUTPUT_TOKENS


@pytest.mark.parametrize(("framing", "chunk"), CASES)
async def test_canned_responses(canned: tuple[RunningGateway, Canned], framing: str, chunk: int) -> None:
    gw, upstream = canned
    headers = canned_headers("responses", framing, chunk)
    body = {"model": "o4-mini", "input": PROMPT, "stream": True,
            "reasoning": {"effort": "high", "summary": "auto"},
            "include": ["reasoning.encrypted_content", "message.output_text.logprobs"]}
    p.assert_clean(await raw_post(gw, "/v1/responses", body, **headers))
    assert await last_output_tokens(gw) == p.OUTPUT_TOKENS
    sent = upstream.requests[-1]  # nothing asked for that would be stripped anyway
    assert sent["include"] == [] and sent["reasoning"] == {"effort": "high"}
    async with oa(gw) as c:
        async with c.responses.stream(model="o4-mini", input=PROMPT, extra_headers=headers) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        whole = await c.responses.create(
            model="o4-mini", input=PROMPT, extra_headers=canned_headers("responses-json")
        )
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == p.VISIBLE
    for response in (final, whole):
        assert [item.type for item in response.output] == ["message"] and response.output_text == p.VISIBLE
        p.assert_clean(response.model_dump_json())
    assert await last_output_tokens(gw) == p.OUTPUT_TOKENS


@pytest.mark.parametrize(("framing", "chunk"), CASES)
async def test_canned_messages(canned: tuple[RunningGateway, Canned], framing: str, chunk: int) -> None:
    gw, _ = canned
    headers = canned_headers("messages", framing, chunk)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 4000, "stream": True,
            "thinking": {"type": "enabled", "budget_tokens": 2000},
            "messages": [{"role": "user", "content": PROMPT}]}
    p.assert_clean(await raw_post(gw, "/v1/messages", body, **headers))
    assert await last_output_tokens(gw) == p.OUTPUT_TOKENS
    async with an(gw) as c:
        async with c.messages.stream(
            model="claude-sonnet-4-5", max_tokens=4000, messages=[{"role": "user", "content": PROMPT}],
            extra_headers=headers,
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        whole = await c.messages.create(
            model="claude-sonnet-4-5", max_tokens=4000, messages=[{"role": "user", "content": PROMPT}],
            extra_headers=canned_headers("messages-json"),
        )
    assert text == p.VISIBLE
    for message in (final, whole):
        assert [b.type for b in message.content] == ["text", "tool_use"]
        assert message.content[0].text == p.VISIBLE  # type: ignore[union-attr]
        assert message.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]
        p.assert_clean(message.model_dump_json())
        assert message.usage.output_tokens == p.OUTPUT_TOKENS
    assert await last_output_tokens(gw) == p.OUTPUT_TOKENS


@pytest.mark.parametrize("name", ["responses", "messages"])
async def test_canned_unterminated_last_event(canned: tuple[RunningGateway, Canned], name: str) -> None:
    # The stream ends without the blank line after its last event: response.completed (which
    # repeats every reasoning item), or a signature_delta of a stream cut inside a thinking block.
    gw, _ = canned
    path = "/v1/responses" if name == "responses" else "/v1/messages"
    headers = canned_headers(name if name == "responses" else "messages-cut")
    body = {"model": "m", "input": PROMPT, "stream": True, "max_tokens": 10,
            "messages": [{"role": "user", "content": PROMPT}]}
    p.assert_clean(await raw_post(gw, path, body, **headers, **{"x-canned-unterminated": "1"}))
