"""The mock upstream, driven by the official SDK clients: everything it sends must parse."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from gateway.upstream.mock.text import mock_text
from gateway.upstream.mock_server import MOCK_STATE, MockOptions, serve_mock

PROMPT = "say hello to the gateway"  # 5 input tokens
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
# The same message: each SDK types it as its own TypedDict, and neither accepts the other's.
ANT_USER: list[MessageParam] = [{"role": "user", "content": PROMPT}]


# -- OpenAI chat completions ------------------------------------------------------------------
async def test_chat_non_stream(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert r.object == "chat.completion"
    assert r.choices[0].message.content == mock_text(8)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (5, 8, 13)


async def test_chat_stream_usage_and_logprobs(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=3,
    )
    text, logprobs, chunks = "", [], []
    async for chunk in stream:
        chunks.append(chunk)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs and choice.logprobs.content:
                logprobs.extend(choice.logprobs.content)
    assert text == mock_text(8)
    assert len(logprobs) == 8 and all(len(lp.top_logprobs) == 3 for lp in logprobs)
    assert "".join(lp.token for lp in logprobs) == text
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 8)
    assert chunks[-2].choices[0].finish_reason == "stop"


async def test_chat_stream_without_include_usage_has_no_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(model="m", messages=USER, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None and c.choices for c in chunks)


async def test_chat_reasoning_stream(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="o4-mini",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        reasoning_effort="low",
        extra_headers={"x-mock-chunks": "4"},
    )
    order: list[str] = []
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            if extra.get("reasoning_content"):
                order.append("r")
            if choice.delta.content:
                order.append("c")
    assert order == ["r"] * 4 + ["c"] * 4
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 4
    assert usage.completion_tokens == 8


async def test_chat_n_choices_and_length_limit(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(
        model="m",
        messages=USER,
        n=3,
        max_completion_tokens=5,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.choices[0].message.content == mock_text(5)
    assert r.usage is not None and r.usage.completion_tokens == 15

    stream = await oai.chat.completions.create(
        model="m",
        messages=USER,
        n=2,
        stream=True,
        max_tokens=3,
    )
    texts = ["", ""]
    finishes: dict[int, str | None] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == [mock_text(3, 0), mock_text(3, 1)]
    assert finishes == {0: "length", 1: "length"}


async def test_legacy_completions(oai: openai.AsyncOpenAI) -> None:
    r = await oai.completions.create(model="m", prompt="one two three", logprobs=2)
    assert r.choices[0].text == mock_text(8)
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.tokens is not None
    assert len(r.choices[0].logprobs.tokens) == 8
    assert r.usage is not None and r.usage.prompt_tokens == 3
    stream = await oai.completions.create(
        model="m", prompt="x", stream=True, stream_options={"include_usage": True}, max_tokens=4
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == mock_text(4)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


# -- OpenAI responses, embeddings, models -----------------------------------------------------
async def test_responses_non_stream(oai: openai.AsyncOpenAI) -> None:
    r = await oai.responses.create(model="gpt-4.1", input="write one short line", instructions="be brief")
    assert r.status == "completed"
    assert r.output_text == mock_text(8)
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (6, 8, 14)


async def test_responses_stream_events(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.responses.create(
        model="gpt-4.1", input=[{"role": "user", "content": "hi there"}], stream=True, top_logprobs=2
    )
    types: list[str] = []
    deltas = ""
    final = None
    async for event in stream:
        types.append(event.type)
        if event.type == "response.output_text.delta":
            deltas += event.delta
            assert len(event.logprobs) == 1
        if event.type == "response.completed":
            final = event.response
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types.count("response.output_text.delta") == 8
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert deltas == mock_text(8)
    assert final is not None and final.output_text == deltas
    assert final.usage is not None and final.usage.output_tokens == 8


async def test_responses_reasoning_and_incomplete(oai: openai.AsyncOpenAI) -> None:
    # The SDK's responses.stream() helper only finishes on response.completed, so read raw events:
    # 8 reasoning tokens leave 2 for text, and the real API ends such a stream with response.incomplete.
    stream = await oai.responses.create(
        model="o4-mini", input="think", reasoning={"effort": "low"}, max_output_tokens=10, stream=True
    )
    events = [event async for event in stream]
    last = events[-1]
    assert last.type == "response.incomplete"
    final = last.response
    assert final.status == "incomplete"
    assert final.incomplete_details is not None and final.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in final.output] == ["reasoning", "message"]
    assert final.output_text == mock_text(2)
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 8


async def test_embeddings(oai: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 by default and decodes it; both forms must agree.
    b64 = await oai.embeddings.create(model="text-embedding-3-small", input=["alpha beta", "gamma"])
    floats = await oai.embeddings.create(
        model="text-embedding-3-small", input=["alpha beta", "gamma"], encoding_format="float"
    )
    assert [d.index for d in b64.data] == [0, 1]
    assert len(b64.data[0].embedding) == 64
    assert b64.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-6)
    assert b64.data[0].embedding != b64.data[1].embedding
    assert b64.usage.prompt_tokens == 3
    sized = await oai.embeddings.create(model="e", input="x", dimensions=8, encoding_format="float")
    assert len(sized.data[0].embedding) == 8


async def test_models(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    ids = [m.id async for m in oai.models.list()]
    assert "gpt-4o-mini" in ids
    ant_ids = [m.id async for m in ant.models.list()]
    assert ant_ids and all(i.startswith("claude") for i in ant_ids)


# -- Anthropic --------------------------------------------------------------------------------
async def test_messages_non_stream(ant: anthropic.AsyncAnthropic) -> None:
    m = await ant.messages.create(model="claude-mock", max_tokens=100, messages=ANT_USER, system="sys")
    assert m.type == "message" and m.stop_reason == "end_turn"
    assert m.content[0].type == "text" and m.content[0].text == mock_text(8)
    assert (m.usage.input_tokens, m.usage.output_tokens) == (6, 8)
    count = await ant.messages.count_tokens(model="claude-mock", messages=ANT_USER, system="sys")
    assert count.input_tokens == 6


async def test_messages_stream_with_thinking(ant: anthropic.AsyncAnthropic) -> None:
    async with ant.messages.stream(
        model="claude-mock",
        max_tokens=2048,
        messages=ANT_USER,
        thinking={"type": "enabled", "budget_tokens": 1024},
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    starts = [e for e in events if e.type == "content_block_start"]
    assert [(s.index, s.content_block.type) for s in starts] == [(0, "thinking"), (1, "text")]
    assert [b.type for b in final.content] == ["thinking", "text"]
    thinking = final.content[0]
    assert thinking.type == "thinking" and thinking.signature and thinking.thinking
    assert final.content[1].type == "text" and final.content[1].text == mock_text(8)
    assert final.usage.output_tokens == 16 and final.usage.input_tokens == 5
    assert final.stop_reason == "end_turn"


async def test_messages_raw_stream_max_tokens(ant: anthropic.AsyncAnthropic) -> None:
    stream = await ant.messages.create(model="c", max_tokens=3, messages=ANT_USER, stream=True)
    text, output_tokens, stop = "", 0, None
    async for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
        if event.type == "message_delta":
            output_tokens, stop = event.usage.output_tokens, event.delta.stop_reason
    assert (text, output_tokens, stop) == (mock_text(3), 3, "max_tokens")


async def test_messages_validation_errors(ant: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError):
        await ant.messages.create(
            model="c",
            max_tokens=100,
            messages=ANT_USER,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )


# -- recording, auth, serving -----------------------------------------------------------------
async def test_recording_endpoints(oai: openai.AsyncOpenAI, server: TestServer) -> None:
    await oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        stream=True,
        extra_headers={"x-custom": "1"},
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/_mock/requests")) as resp:
            items = (await resp.json())["requests"]
        assert len(items) == 1
        req = items[0]
        assert (req["method"], req["path"]) == ("POST", "/v1/chat/completions")
        assert req["headers"]["authorization"] == "Bearer sk-test"
        assert req["headers"]["x-custom"] == "1"
        assert req["body"]["model"] == "gpt-4o-mini" and req["body"]["stream"] is True
        # the SDK closes the stream before our bookkeeping may run: wait for the stats to settle
        await server.app[MOCK_STATE].wait_for(lambda s: s.streams_completed == 1)
        async with session.get(server.make_url("/_mock/stats")) as resp:
            stats = await resp.json()
        assert stats["streams_started"] == stats["streams_completed"] == 1
        assert stats["requests_total"] == 1
        async with session.post(server.make_url("/_mock/reset")) as resp:
            assert resp.status == 200
        async with session.get(server.make_url("/_mock/stats")) as resp:
            assert (await resp.json())["requests_total"] == 0
        async with session.post(server.make_url("/v1/nowhere"), data=b"{}") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_url"
        async with session.post(server.make_url("/v1/messages"), data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_api_key_and_serve_mock() -> None:
    async with serve_mock(MockOptions(api_key="sk-right", chunks=2)) as mock:
        async with openai.AsyncOpenAI(base_url=f"{mock.url}/v1", api_key="sk-wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
        async with anthropic.AsyncAnthropic(base_url=mock.url, api_key="sk-right", max_retries=0) as good:
            m = await good.messages.create(model="c", max_tokens=10, messages=ANT_USER)
            assert m.content[0].type == "text" and m.content[0].text == mock_text(2)
        assert mock.state.requests_total == 2
        assert mock.state.last_request is not None
        # anthropic SDK 2.x authenticates with a bearer token, not x-api-key
        assert mock.state.last_request.headers["authorization"] == "Bearer sk-right"
