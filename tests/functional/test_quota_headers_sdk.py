"""Tollgate's 429s and rate-limit headers as the official SDKs meet them, through the real gateway.

A limit of 4 requests per second (GCRA, no burst) makes the second request of a pair wait up to
250 ms: short enough to let each SDK's own retry run (``max_retries=1``) and measure it, long
enough that a slow test machine still sends the second request inside it.
"""

from __future__ import annotations

import contextlib
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway, serve_app
from tests.support.ratelimit_conformance import ietf

GatewayStarter = Callable[..., AbstractAsyncContextManager[RunningGateway]]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]

RPS_RULE = """\
- id: acct-rps
  quota:
    limits:
      - {name: rps, kind: requests, limit: 4, per: 1s, key: [principal.account]}
"""
NEVER_FITS_RULE = """\
- id: acct-out
  quota:
    limits:
      - {name: out, kind: output_tokens, limit: 100, per: 1h, key: [principal.account]}
"""


@pytest.fixture
def start_quota_gateway(mock_upstream: MockServer, tmp_path: Path) -> GatewayStarter:
    """``async with start_quota_gateway(rules_yaml[, upstream_url]) as gw``."""

    @contextlib.asynccontextmanager
    async def start(rules: str, upstream_url: str | None = None) -> AsyncIterator[RunningGateway]:
        policies = tmp_path / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "10-quota.yaml").write_text(
            "version: 1\nrules:\n" + textwrap.indent(textwrap.dedent(rules), "  "))
        extra = f"policies: {{dir: {policies}, watch: false}}\n"
        text = gateway_yaml(upstream_url or mock_upstream.url, tmp_path, extra,
                            audit_log=tmp_path / "audit.jsonl")
        async with run_gateway(text, tmp_path) as gw:
            yield gw

    return start


class RetrySpy:
    """Wraps an SDK client's ``_calculate_retry_timeout``: what it was shown and what it chose."""

    def __init__(self, client: Any) -> None:
        self.seen: list[tuple[httpx2.Headers, float]] = []
        original = client._calculate_retry_timeout

        def spy(remaining: int, options: Any, headers: httpx2.Headers | None = None) -> float:
            timeout: float = original(remaining, options, headers)
            assert headers is not None
            self.seen.append((headers, timeout))
            return timeout

        client._calculate_retry_timeout = spy


def assert_waited_as_told(spy: RetrySpy, elapsed: float) -> None:
    [(headers, timeout)] = spy.seen
    assert headers["Retry-After"] == "1"  # whole seconds, at least 1
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 250  # one slot of 4/s
    assert timeout == wait_ms / 1000  # the SDK prefers the precise value
    assert elapsed >= timeout  # and slept it before retrying
    policy, state = ietf(headers)  # the 429 carries the fields too, in the draft's syntax
    assert policy == {"rps": {"q": 4, "w": 1, "qu": "requests"}} and state["rps"]["r"] == 0


async def test_openai_sdk_retries_after_what_the_429_says(start_quota_gateway: GatewayStarter) -> None:
    async with start_quota_gateway(RPS_RULE) as gw, openai.AsyncOpenAI(
            base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=1) as client:
        spy = RetrySpy(client)
        await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
        started = time.monotonic()
        raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
        elapsed = time.monotonic() - started
        records = await gw.audit_records()
    assert raw.http_response.status_code == 200
    assert raw.headers["x-ratelimit-limit-requests"] == "4"
    assert_waited_as_told(spy, elapsed)
    assert [r["status"] for r in records] == [200, 429, 200]


async def test_anthropic_sdk_retries_after_what_the_429_says(start_quota_gateway: GatewayStarter) -> None:
    async with start_quota_gateway(RPS_RULE) as gw, anthropic.AsyncAnthropic(
            base_url=gw.url, api_key=CLIENT_KEY, max_retries=1) as client:
        spy = RetrySpy(client)
        await client.messages.create(model="claude-test", max_tokens=20,
                                     messages=[{"role": "user", "content": "hi"}])
        started = time.monotonic()
        raw = await client.messages.with_raw_response.create(
            model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
        elapsed = time.monotonic() - started
        records = await gw.audit_records()
    assert raw.http_response.status_code == 200
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "4"
    assert_waited_as_told(spy, elapsed)
    assert [r["status"] for r in records] == [200, 429, 200]


async def test_neither_sdk_retries_a_request_that_can_never_fit(start_quota_gateway: GatewayStarter) -> None:
    async with start_quota_gateway(NEVER_FITS_RULE) as gw:
        async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=1) as oc:
            with pytest.raises(openai.RateLimitError) as oerr:
                await oc.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=500)
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=1) as ac:
            with pytest.raises(anthropic.RateLimitError) as aerr:
                await ac.messages.create(model="claude-test", max_tokens=500,
                                         messages=[{"role": "user", "content": "hi"}])
        records = await gw.audit_records()
    assert [r["status"] for r in records] == [429, 429]  # one attempt each
    assert oerr.value.code == "rate_limit_exceeded"
    assert isinstance(aerr.value.body, dict) and aerr.value.body["error"]["type"] == "rate_limit_error"
    for err in (oerr.value, aerr.value):
        assert err.response.headers["x-should-retry"] == "false" and "Retry-After" not in err.response.headers


async def test_an_upstream_error_after_admission_still_carries_the_fields(
        start_quota_gateway: GatewayStarter) -> None:
    async with start_quota_gateway(RPS_RULE.replace("limit: 4, per: 1s", "limit: 10, per: 1m, burst: 10")
                                   ) as gw, openai.AsyncOpenAI(
            base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as err:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGES,
                                                 extra_headers={"x-mock-fault": "status-500"})
    headers = err.value.response.headers
    _, state = ietf(headers)
    assert state["rps"]["r"] == 9 and headers["x-ratelimit-remaining-requests"] == "9"


@pytest.fixture
async def provider_with_own_limits() -> AsyncIterator[str]:
    """An OpenAI-shaped upstream that, like the real one, sends the rate limits of the gateway's
    own provider account (shared by every client of the gateway)."""

    async def chat(request: web.Request) -> web.Response:
        body = {"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-test",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
        return web.json_response(body, headers={
            "x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-reset-requests": "6ms", "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-tokens": "29999000", "x-ratelimit-reset-tokens": "2ms"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_app(app) as url:
        yield url


async def test_the_provider_accounts_own_limits_do_not_reach_the_client(
        start_quota_gateway: GatewayStarter, provider_with_own_limits: str) -> None:
    rule = RPS_RULE.replace("limit: 4, per: 1s", "limit: 100, per: 1m, burst: 100")
    async with start_quota_gateway(rule, provider_with_own_limits) as gw, openai.AsyncOpenAI(
            base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
    assert raw.headers["x-ratelimit-limit-requests"] == "100"  # Tollgate's, replacing the provider's
    # no token limit is enforced, so no token fields: these would be the provider account's
    assert "x-ratelimit-limit-tokens" not in raw.headers
