"""Friction through the real wiring (keys, risk, policy, quota, friction stages from config):
a proof-of-work challenge raised and solved by gateway.client, degraded outputs that the official
SDKs still parse, and a tarpit."""

from __future__ import annotations

import time
from pathlib import Path

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from gateway.client import PowTransport, solve_challenge
from gateway.upstream.mock_server import MockServer
from tests.conftest import GatewayFactory
from tests.functional.test_friction_tarpit import settled
from tests.support.gateway import CLIENT_KEY

POW = """\
version: 1
rules:
  - id: pow-everyone
    description: Every chat request solves a small proof of work.
    when: {field: request.route, equals: chat.completions}
    friction: {challenge: {kind: pow, difficulty: 8}}
"""
POW_AND_CAP = """\
version: 1
rules:
  - id: pow-and-cap
    when: {field: request.route, equals: chat.completions}
    friction:
      challenge: {kind: pow, difficulty: 8}
      cap_tokens: {limit: 1500, per: 1h}
"""
DEGRADE = """\
version: 1
rules:
  - id: degrade-openai
    when: {field: request.route, equals: chat.completions}
    friction:
      degrade: {strip_logprobs: true, strip_reasoning: true, force_n1: true, cap_max_tokens: 64}
  - id: degrade-anthropic
    when: {field: request.route, equals: messages}
    friction:
      degrade: {strip_reasoning: true}
"""
TARPIT = """\
version: 1
rules:
  - id: slow-everyone
    when: {field: principal.authenticated, equals: true}
    friction: {tarpit: {first_byte_delay: 300ms}}
"""
PROMPT = "Let's think step by step: what is 2 + 2?"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
# The same message: each SDK types it as its own TypedDict, and neither accepts the other's.
ANT_MESSAGES: list[MessageParam] = [{"role": "user", "content": PROMPT}]


def policy_yaml(tmp: Path, text: str) -> str:
    directory = tmp / "pol"
    directory.mkdir(exist_ok=True)
    (directory / "rules.yaml").write_text(text)
    return f"policies: {{dir: {directory}, watch: false}}\n"


def oa(url: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, **kw)  # type: ignore[arg-type]


async def test_challenge_is_raised_then_solved_by_hand(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLLGATE_CHALLENGE_SECRET", "s" * 32)
    async with (
        start_gateway(mock_upstream.url, policy_yaml(tmp_path, POW)) as gw,
        oa(gw.url, max_retries=2) as c,
    ):
        with pytest.raises(openai.AuthenticationError) as caught:
            await c.chat.completions.create(model="m", messages=MESSAGES)
        response = caught.value.response
        assert response.headers["x-should-retry"] == "false"  # the SDK did not retry blindly
        assert response.headers["www-authenticate"].startswith("Tollgate-PoW ")
        body = response.json()
        assert body["error"]["code"] == "challenge_required"
        assert body["error"]["challenge"]["difficulty"] == 8
        solution = solve_challenge(body)
        result = await c.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-tollgate-solution": solution}
        )
        assert result.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):  # a solution is good once
            await c.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-tollgate-solution": solution}
            )
        records = await gw.access_records()
    assert len(mock_upstream.state.requests) == 1
    assert [r["status"] for r in records] == [401, 200, 401]


async def challenged(c: openai.AsyncOpenAI) -> str:
    """A solution to the challenge a request without one is answered with."""
    with pytest.raises(openai.AuthenticationError) as caught:
        await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000)
    return solve_challenge(caught.value.response.json())


async def test_a_solution_refused_by_the_token_cap_is_accepted_once_the_cap_allows(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """The solution is spent only once nothing in the friction stage refuses the request: a 429
    from cap_tokens leaves it good for the retry, and it is still accepted only once."""
    async with (
        start_gateway(mock_upstream.url, policy_yaml(tmp_path, POW_AND_CAP)) as gw,
        oa(gw.url, max_retries=0) as c,
    ):
        # A stream held open reserves 1,000 output tokens (+ its input) of the 1,500 until it ends.
        slow = {"x-mock-chunks": "500", "x-mock-chunk-delay-ms": "20"}
        held = await c.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=1000, stream=True,
            extra_headers={"x-tollgate-solution": await challenged(c), **slow})
        solution = await challenged(c)
        with_solution = {"x-tollgate-solution": solution}
        with pytest.raises(openai.RateLimitError) as caught:
            await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000,
                                            extra_headers=with_solution)
        assert int(caught.value.response.headers["retry-after"]) >= 1
        await held.close()  # the client leaves: it pays what was streamed, the rest is refunded
        await settled(gw)
        result = await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000,
                                                 extra_headers=with_solution)
        assert result.choices[0].message.content
        with pytest.raises(openai.AuthenticationError) as replayed:  # and still good only once
            await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000,
                                            extra_headers=with_solution)
        assert replayed.value.response.json()["error"]["code"] == "challenge_required"
        await settled(gw)  # the replay's cap reservation, refunded
        records = await gw.access_records()
    assert len(mock_upstream.state.requests) == 2
    assert [r["status"] for r in records] == [401, 401, 429, 499, 200, 401]


async def test_pow_transport_solves_transparently(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    async with start_gateway(mock_upstream.url, policy_yaml(tmp_path, POW)) as gw:
        http = httpx2.AsyncClient(transport=PowTransport())
        async with oa(gw.url, max_retries=0, http_client=http) as c:
            result = await c.chat.completions.create(model="m", messages=MESSAGES)
            assert result.choices[0].message.content
            stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            assert [chunk async for chunk in stream]


async def test_degrade_edits_the_request_and_strips_the_response(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    async with start_gateway(mock_upstream.url, policy_yaml(tmp_path, DEGRADE)) as gw:
        async with oa(gw.url, max_retries=0) as c:
            result = await c.chat.completions.create(
                model="m", messages=MESSAGES, logprobs=True, top_logprobs=3, n=3, max_tokens=1000
            )
        sent = mock_upstream.state.requests[-1].body
        assert "logprobs" not in sent and "top_logprobs" not in sent
        assert sent["n"] == 1 and sent["max_tokens"] == 64
        assert len(result.choices) == 1 and result.choices[0].logprobs is None
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as a:
            async with a.messages.stream(
                model="claude-mock",
                max_tokens=2000,
                thinking={"type": "enabled", "budget_tokens": 1024},
                messages=ANT_MESSAGES,
            ) as stream:
                final = await stream.get_final_message()
    # The upstream did think (a thinking block came first); the gateway dropped it and renumbered
    # the rest, and the SDK rebuilt the message from the relayed events without complaint.
    assert mock_upstream.state.requests[-1].body["thinking"]["type"] == "enabled"
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text  # type: ignore[union-attr]


async def test_tarpit_delays_the_first_byte(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    async with start_gateway(mock_upstream.url, policy_yaml(tmp_path, TARPIT)) as gw, oa(gw.url) as c:
        started = time.monotonic()
        await c.chat.completions.create(model="m", messages=MESSAGES)
        assert time.monotonic() - started >= 0.3
