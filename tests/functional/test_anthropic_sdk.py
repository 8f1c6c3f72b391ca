"""The official anthropic SDK through the gateway to the mock upstream."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.conftest import GatewayFactory
from tests.support.gateway import CLIENT_KEY, RunningGateway


def client(gw: RunningGateway) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0)


async def test_message_content_and_usage(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        message = await c.messages.create(
            model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "hello"}]
        )
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.output_tokens == 6
    record = (await gateway.access_records())[-1]
    assert record["route"] == "messages" and record["output_tokens"] == 6
    assert record["input_tokens"] == message.usage.input_tokens


async def test_stream_events_and_usage(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        async with c.messages.stream(
            model="claude-test", max_tokens=100, messages=[{"role": "user", "content": "hello"}]
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert len(text.split()) == 6
    assert final.usage.output_tokens == 6 and final.stop_reason == "end_turn"
    record = (await gateway.access_records())[-1]
    assert record["stream"] is True and record["output_tokens"] == 6


async def test_thinking_blocks_pass_through(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        async with c.messages.stream(
            model="claude-test",
            max_tokens=2000,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": "think"}],
        ) as stream:
            final = await stream.get_final_message()
    kinds = [block.type for block in final.content]
    assert kinds[0] == "thinking" and "text" in kinds
    assert final.content[0].signature  # type: ignore[union-attr]


async def test_count_tokens(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        counted = await c.messages.count_tokens(
            model="claude-test", messages=[{"role": "user", "content": "one two three"}]
        )
    assert counted.input_tokens > 0


async def test_errors_use_the_anthropic_shape(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        with pytest.raises(anthropic.BadRequestError) as info:
            await c.messages.create(
                model="claude-test",
                max_tokens=0,  # below the minimum of 1
                messages=[{"role": "user", "content": "x"}],
            )
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert info.value.response.headers["request-id"]


async def test_oversized_body_is_request_too_large(mock_upstream, start_gateway) -> None:  # type: ignore[no-untyped-def]
    async with start_gateway(mock_upstream.url, "max_body_bytes: 2048\n") as gw, client(gw) as c:
        with pytest.raises(anthropic.APIStatusError) as info:
            await c.messages.create(
                model="claude-test", max_tokens=10, messages=[{"role": "user", "content": "x" * 5000}]
            )
    assert info.value.status_code == 413
    assert info.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]


async def test_upstream_failure_mid_stream_raises_in_the_sdk(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        with pytest.raises(anthropic.APIStatusError):
            async with c.messages.stream(
                model="claude-test",
                max_tokens=100,
                messages=[{"role": "user", "content": "x"}],
                extra_headers={"x-mock-fault": "reset-mid-stream"},
            ) as stream:
                async for _ in stream:
                    pass


async def test_models_list(gateway: RunningGateway) -> None:
    async with client(gateway) as c:
        page = await c.models.list()
        ids = [model.id async for model in page]
    assert ids
    record = (await gateway.access_records())[-1]
    assert record["route"] == "models" and record["status"] == 200


async def test_models_errors_use_the_shape_of_the_clients_sdk(gateway: RunningGateway) -> None:
    # GET /v1/models is both APIs' path: an Anthropic client (anthropic-version) gets Anthropic's
    # error grammar, an OpenAI client OpenAI's, from the same route.
    async with anthropic.AsyncAnthropic(base_url=gateway.url, api_key="tg_wrong", max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await c.models.list()
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert info.value.response.headers["request-id"]
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="tg_wrong", max_retries=0) as o:
        with pytest.raises(openai.AuthenticationError) as oinfo:
            await o.models.list()
    assert oinfo.value.code == "invalid_api_key"
    assert isinstance(oinfo.value.body, dict) and oinfo.value.body["type"] == "authentication_error"
    records = (await gateway.access_records())[-2:]
    assert [r["status"] for r in records] == [401, 401]


async def test_models_upstream_down_is_an_anthropic_api_error(start_gateway: GatewayFactory) -> None:
    async with start_gateway("http://127.0.0.1:9") as gw, client(gw) as c:
        with pytest.raises(anthropic.InternalServerError) as info:
            await c.models.list()
    assert info.value.status_code == 502
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "api_error"
