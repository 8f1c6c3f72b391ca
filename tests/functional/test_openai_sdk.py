"""The official openai SDK through the gateway to the mock upstream."""

from __future__ import annotations

import re
from typing import Any, cast

import openai
import pytest

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_KEY, RunningGateway


def client(gw: RunningGateway, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0, **kw)  # type: ignore[arg-type]


async def test_chat_completion_content_and_usage(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        result = await c.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    assert result.choices[0].message.content
    assert result.usage is not None and result.usage.completion_tokens == 6
    record = (await gateway.access_records())[-1]
    assert record["route"] == "chat.completions" and record["status"] == 200
    assert record["output_tokens"] == 6 and record["input_tokens"] == result.usage.prompt_tokens


async def test_stream_hides_usage_chunk_the_client_did_not_ask_for(
    gateway: RunningGateway, mock_upstream: MockServer
) -> None:
    async with client(gateway) as c:
        stream = await c.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "count to three"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert chunks, "no chunks relayed"
    assert all(chunk.choices for chunk in chunks), "the injected usage chunk reached the client"
    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert len(text.split()) == 6
    # The gateway asked upstream for usage and accounted it.
    sent = mock_upstream.state.requests[-1].body
    assert sent["stream_options"] == {"include_usage": True}
    record = (await gateway.access_records())[-1]
    assert record["output_tokens"] == 6 and record["stream"] is True


async def test_stream_keeps_usage_chunk_when_asked(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        stream = await c.chat.completions.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


async def test_logprobs_and_n_pass_through(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        result = await c.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=2, n=2
        )
    assert len(result.choices) == 2
    assert result.choices[0].logprobs is not None and result.choices[0].logprobs.content


async def test_responses_api_stream_and_not(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        whole = await c.responses.create(model="gpt-test", input="hello there")
        assert whole.output_text and whole.usage is not None
        events = [e async for e in await c.responses.create(model="gpt-test", input="hello", stream=True)]
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert any(t == "response.output_text.delta" for t in types)
    record = (await gateway.access_records())[-1]
    assert record["route"] == "responses" and record["output_tokens"] == 6


async def test_embeddings_and_models(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        emb = await c.embeddings.create(model="emb-test", input=["a b c", "d"])
        models = await c.models.list()
    assert len(emb.data) == 2 and emb.usage.prompt_tokens > 0
    assert [m async for m in models]
    record = (await gateway.access_records())[-1]
    assert record["route"] == "models"


async def test_the_request_id_is_the_gateways_and_the_clients_is_recorded(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-request-id": "req-abc.123"},
        )
    rid = raw.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{24}", rid) and raw.request_id == rid
    record = (await gateway.access_records())[-1]
    assert record["request_id"] == rid and record["client_request_id"] == "req-abc.123"


async def test_malformed_json_is_a_bad_request(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.post(
                "/chat/completions",
                cast_to=object,
                content=b'{"model": "x", "messages": [',
                options={"headers": {"Content-Type": "application/json"}},
            )
    assert "not valid JSON" in info.value.message


async def test_wrong_field_type_is_refused_not_coerced(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        with pytest.raises(openai.BadRequestError) as info:
            await c.chat.completions.create(
                model="gpt-test",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=cast(Any, "100000"),  # a string on purpose: the gateway must not coerce it
            )
    assert "'max_tokens' must be an integer" in info.value.message


async def test_unknown_route_is_not_found(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        with pytest.raises(openai.NotFoundError):
            await c.get("/nothing/here", cast_to=object)


async def test_upstream_down_is_502(start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway("http://127.0.0.1:9") as gw, client(gw) as c:
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502


async def test_upstream_slow_is_504(mock_upstream: MockServer, start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(mock_upstream.url, upstream_extra="read_timeout: 200ms") as gw, client(gw) as c:
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-fault": "hang"}
            )
    assert info.value.status_code == 504


async def test_upstream_reset_mid_stream_ends_with_an_error_event(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        stream = await c.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_headers={"x-mock-fault": "reset-mid-stream"},
        )
        seen = 0
        with pytest.raises(openai.APIError):
            async for _ in stream:
                seen += 1
    assert seen > 0  # some content arrived before the failure
    record = (await gateway.access_records())[-1]
    output_tokens = record["output_tokens"]
    assert isinstance(output_tokens, int) and output_tokens >= 1  # the part that was produced is accounted


async def test_upstream_reset_mid_responses_stream_ends_with_its_error_event(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        stream = await c.responses.create(
            model="m", input="x", stream=True, extra_headers={"x-mock-fault": "reset-mid-stream"})
        seen = 0
        with pytest.raises(openai.APIError) as info:
            async for _ in stream:
                seen += 1
    assert seen > 0
    # The Responses ``error`` event's nested error (not a broken stream: APIConnectionError).
    assert type(info.value) is openai.APIError
    assert info.value.body == {"message": "The upstream model service failed.", "type": "server_error",
                               "param": None, "code": "upstream_unavailable"}


async def test_large_responses_are_relayed_whole(gateway: RunningGateway) -> None:
    # About 2 MB of JSON: many TCP reads between the upstream and the gateway.
    inputs = [f"text number {i}" for i in range(400)]
    async with client(gateway) as c:
        emb = await c.embeddings.create(model="emb-test", input=inputs, dimensions=512)
    assert len(emb.data) == 400 and all(len(d.embedding) == 512 for d in emb.data)
    record = (await gateway.access_records())[-1]
    assert record["status"] == 200 and record["input_tokens"] == emb.usage.prompt_tokens
