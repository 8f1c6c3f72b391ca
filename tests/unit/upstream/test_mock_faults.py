"""The mock upstream's faults (status codes, resets, errors mid-stream, bad JSON, hangs, delays,
disconnects), seen through the official SDK clients and a raw client."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from gateway.upstream.mock.text import mock_text
from gateway.upstream.mock_server import MockState

PROMPT = "say hello to the gateway"  # 5 input tokens
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
# The same message: each SDK types it as its own TypedDict, and neither accepts the other's.
ANT_USER: list[MessageParam] = [{"role": "user", "content": PROMPT}]


# -- faults -----------------------------------------------------------------------------------
async def test_status_faults_raise_the_sdk_exceptions(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.InternalServerError):
        await oai.chat.completions.create(
            model="m", messages=USER, extra_headers={"x-mock-fault": "status-500"}
        )
    with pytest.raises(openai.RateLimitError) as rl:
        await oai.chat.completions.create(
            model="m", messages=USER, extra_headers={"x-mock-fault": "status-429"}
        )
    assert rl.value.response.headers["retry-after"] == "1"
    assert rl.value.code == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as arl:
        await ant.messages.create(
            model="c",
            max_tokens=10,
            messages=ANT_USER,
            extra_headers={"x-mock-fault": "status-429"},
        )
    assert arl.value.response.headers["request-id"].startswith("req_mock_")
    with pytest.raises(anthropic.InternalServerError):
        await ant.messages.create(
            model="c",
            max_tokens=10,
            messages=ANT_USER,
            extra_headers={"x-mock-fault": "status-500"},
        )
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-fault": "nope"})


async def test_reset_mid_stream(oai: openai.AsyncOpenAI, state: MockState) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        extra_headers={"x-mock-fault": "reset-mid-stream"},
    )
    text = ""
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
    assert text == mock_text(4)
    assert state.streams_failed == 1 and state.streams_completed == 0
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(
            model="m",
            messages=USER,
            extra_headers={"x-mock-fault": "reset-mid-stream"},
        )


async def test_error_mid_stream(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        extra_headers={"x-mock-fault": "error-mid-stream"},
    )
    with pytest.raises(openai.APIError, match="injected stream error"):
        async for _ in stream:
            pass
    astream = await ant.messages.create(
        model="c",
        max_tokens=10,
        messages=ANT_USER,
        stream=True,
        extra_headers={"x-mock-fault": "error-mid-stream"},
    )
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        async for _ in astream:
            pass


async def test_bad_json(oai: openai.AsyncOpenAI, server: TestServer) -> None:
    stream = await oai.chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        extra_headers={"x-mock-fault": "bad-json"},
    )
    with pytest.raises(ValueError):  # json.JSONDecodeError from the SDK's SSE decoder
        async for _ in stream:
            pass
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json={"model": "m", "messages": USER},
            headers={"x-mock-fault": "bad-json"},
        ) as resp:
            assert resp.status == 200
            with pytest.raises(ValueError):
                await resp.json()


async def test_hang_times_out_and_is_seen_as_cancelled(oai: openai.AsyncOpenAI, state: MockState) -> None:
    with pytest.raises(openai.APITimeoutError):
        await oai.chat.completions.create(
            model="m",
            messages=USER,
            timeout=0.3,
            extra_headers={"x-mock-fault": "hang"},
        )
    await state.wait_for(lambda s: s.requests_cancelled == 1, timeout=2)


async def test_first_byte_delay_and_slow_headers(server: TestServer) -> None:
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(
            server.make_url("/v1/chat/completions"),
            json={"model": "m", "messages": USER},
            headers={"x-mock-first-byte-delay-ms": "150"},
        ) as resp:
            assert resp.status == 200
        assert time.monotonic() - started >= 0.15
        with pytest.raises(asyncio.TimeoutError):
            await session.post(
                server.make_url("/v1/chat/completions"),
                json={"model": "m", "messages": USER},
                headers={"x-mock-fault": "slow-headers"},
                timeout=aiohttp.ClientTimeout(total=0.2),
            )


async def test_chunk_delay_paces_the_stream(server: TestServer) -> None:
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(
            server.make_url("/v1/messages"),
            json={"model": "c", "max_tokens": 50, "messages": USER, "stream": True},
            headers={"x-mock-chunks": "4", "x-mock-chunk-delay-ms": "50"},
        ) as resp:
            body = await resp.read()
        assert time.monotonic() - started >= 0.2
        assert body.count(b"event: content_block_delta") == 4


async def test_client_disconnect_is_recorded_as_cancelled(server: TestServer, state: MockState) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            server.make_url("/v1/chat/completions"),
            json={"model": "m", "messages": USER, "stream": True},
            headers={"x-mock-chunks": "50", "x-mock-chunk-delay-ms": "200"},
        )
        await resp.content.readuntil(b"\n\n")  # the role chunk: the stream is live
        assert state.active_streams == 1
        resp.close()  # drop the connection mid-stream
        dropped = time.monotonic()
    await state.wait_for(lambda s: s.streams_cancelled == 1, timeout=2)
    # Handler cancellation reports it at once, not at the next 200 ms write.
    assert state.cancel_times[0] - dropped < 0.1
    assert state.active_streams == 0 and state.streams_completed == 0
    assert state.streams[-1].outcome == "cancelled"
