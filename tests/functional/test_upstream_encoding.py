"""An upstream that compresses its answers although the gateway asks for ``identity``: the gateway
decodes them (it must read usage, and shaping must read the body) and relays them uncompressed,
since it never passes Content-Encoding on. An encoding it cannot decode is a clear 502, and a
compressed body is bounded by ``max_response_bytes`` once decoded. Driven by the official OpenAI
SDK, on both upstream clients (the gateway's pool and aiohttp's ClientSession)."""

from __future__ import annotations

import contextlib
import gzip
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory
from tests.support.gateway import CLIENT_KEY, RunningGateway, serve_app

COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-test",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from far away."},
                 "finish_reason": "stop", "logprobs": None}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12},
}


def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    body = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
            "usage": usage}
    return b"data: " + orjson.dumps(body) + b"\n\n"


STREAM = (chunk({"role": "assistant", "content": ""}) + chunk({"content": "Hello "})
          + chunk({"content": "again."}) + chunk({}, "stop")
          + chunk({}, usage={"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
          + b"data: [DONE]\n\n")


def compressing_upstream(encoding: str, payload: Callable[[bool], bytes]) -> web.Application:
    """Answers every chat completion compressed with ``encoding``, whatever Accept-Encoding says."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert request.headers["Accept-Encoding"] == "identity"
        raw = payload(bool(body.get("stream")))
        content_type = "text/event-stream" if body.get("stream") else "application/json"
        if encoding == "gzip":
            data = gzip.compress(raw)
        elif encoding == "deflate":
            data = zlib.compress(raw)
        else:
            data = raw  # the header claims an encoding the gateway does not know
        if body.get("stream"):  # chunked, as a real stream would be
            response = web.StreamResponse(headers={"Content-Type": content_type,
                                                   "Content-Encoding": encoding})
            await response.prepare(request)
            for at in range(0, len(data), 7):
                await response.write(data[at:at + 7])
            await response.write_eof()
            return response
        return web.Response(body=data, headers={"Content-Type": content_type, "Content-Encoding": encoding})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def normal(stream: bool) -> bytes:
    return STREAM if stream else orjson.dumps(COMPLETION)


@pytest.fixture(params=["pool", "session"])
def client_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def gateway_before(app: web.Application, start_gateway: GatewayFactory, client_kind: str,
                         extra: str = "") -> AsyncIterator[RunningGateway]:
    async with serve_app(app) as url, \
            start_gateway(url, upstream_extra=f"client: {client_kind}\n{extra}") as gw:
        yield gw


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_answer_is_decoded_read_and_relayed_plain(
        encoding: str, client_kind: str, start_gateway: GatewayFactory) -> None:
    async with gateway_before(compressing_upstream(encoding, normal), start_gateway, client_kind) as gw:
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}])
            stream = await client.chat.completions.create(
                model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True})
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "content-encoding" not in raw.headers
        assert raw.parse().choices[0].message.content == "Hello from far away."
        assert "".join(parts) == "Hello again."
        records = await gw.access_records()
        # usage was read from the decoded bodies (it would be 0 from compressed bytes)
        assert [(r["input_tokens"], r["output_tokens"]) for r in records] == [(7, 5), (7, 2)]


async def test_an_encoding_the_gateway_cannot_decode_is_a_clear_502(
        client_kind: str, start_gateway: GatewayFactory) -> None:
    async with gateway_before(compressing_upstream("compress", normal), start_gateway, client_kind) as gw:
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as failed:
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert failed.value.status_code == 502
    assert "Content-Encoding 'compress'" in failed.value.message


async def test_a_compressed_body_is_bounded_once_decoded(
        client_kind: str, start_gateway: GatewayFactory) -> None:
    def bomb(stream: bool) -> bytes:  # ~2 MiB of JSON in a few kilobytes of gzip
        return orjson.dumps({**COMPLETION, "pad": " " * (2 << 20)})

    async with gateway_before(compressing_upstream("gzip", bomb), start_gateway, client_kind,
                                "max_response_bytes: 1MiB") as gw:
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
            with pytest.raises(openai.APIStatusError) as failed:
                await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert failed.value.status_code == 502 and "too large" in failed.value.message
