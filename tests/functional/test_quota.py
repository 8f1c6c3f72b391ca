"""Quotas (issue 5) through the real gateway, a quota policy and the official SDKs.

The mock upstream produces 6 output tokens per choice (``MockOptions(chunks=6)``), which the
token-budget cases below count on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import textwrap
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.quota.stage import QuotaStage
from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway
from tests.support.ratelimit_fields import parse_structured
from tests.support.redis_servers import free_port

GatewayStarter = Callable[[str], AbstractAsyncContextManager[RunningGateway]]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture
def start_quota_gateway(mock_upstream: MockServer, tmp_path: Path) -> GatewayStarter:
    """``async with start_quota_gateway(rules_yaml) as gw``: one policy file holding the rules."""

    @contextlib.asynccontextmanager
    async def start(rules: str) -> AsyncIterator[RunningGateway]:
        policies = tmp_path / "policies"
        policies.mkdir(exist_ok=True)
        (policies / "10-quota.yaml").write_text(
            "version: 1\nrules:\n" + textwrap.indent(textwrap.dedent(rules), "  ")
        )
        extra = f"policies: {{dir: {policies}, watch: false}}\n"
        text = gateway_yaml(mock_upstream.url, tmp_path, extra, audit_log=tmp_path / "audit.jsonl")
        async with run_gateway(text, tmp_path) as gw:
            yield gw

    return start


def openai_client(gw: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0)


def quota_stage(gw: RunningGateway) -> QuotaStage:
    return next(s for s in gw.runtime.features.stages if isinstance(s, QuotaStage))


async def settled(gw: RunningGateway, timeout: float = 5.0) -> None:
    """Wait until every charged request has been settled (the pipeline settles in ``finally``)."""
    stage = quota_stage(gw)
    async with asyncio.timeout(timeout):
        while stage.pending:
            await asyncio.sleep(0.005)



RPM_RULE = """\
- id: acct-rpm
  when: {field: principal.account, equals: acct-1}
  quota:
    limits:
      - {name: rpm, kind: requests, limit: 3, per: 1m, burst: 3, key: [principal.account]}
"""


async def test_fourth_request_in_a_minute_is_rate_limited(start_quota_gateway: GatewayStarter) -> None:
    async with start_quota_gateway(RPM_RULE) as gw, openai_client(gw) as c:
        seen: list[Mapping[str, str]] = []
        for _ in range(3):
            raw = await c.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
            assert raw.http_response.status_code == 200
            seen.append(raw.headers)
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="gpt-test", messages=MESSAGES)
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as ac:
            with pytest.raises(anthropic.RateLimitError) as ainfo:
                await ac.messages.create(
                    model="claude-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
                )
        records = await gw.audit_records()

    # Consistent headers on the admitted responses: remaining counts down 2, 1, 0.
    for remaining, headers in zip((2, 1, 0), seen, strict=True):
        policy = parse_structured(headers["RateLimit-Policy"])
        state = parse_structured(headers["RateLimit"])
        assert policy == {"rpm": {"q": "3", "w": "60", "qu": '"requests"'}}
        assert state["rpm"]["r"] == str(remaining)
        assert 0 <= int(state["rpm"]["t"]) <= 60
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert re.fullmatch(r"(\d+m)?[\d.]+m?s", headers["x-ratelimit-reset-requests"])
        assert "x-ratelimit-limit-tokens" not in headers  # no token limit is enforced
        # provider aliases follow the route's API family: no Anthropic fields on an OpenAI route
        assert not [name for name in headers if name.lower().startswith("anthropic-ratelimit-")]

    err = info.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded"
    assert isinstance(err.body, dict) and err.body["type"] == "requests"  # OpenAI's own 429 shape
    retry_after = int(err.response.headers["Retry-After"])
    assert 1 <= retry_after <= 20  # GCRA at 3/min: one slot frees every 20 s
    assert err.response.headers.get("x-should-retry") != "false"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"

    aerr = ainfo.value
    assert aerr.status_code == 429
    assert isinstance(aerr.body, dict) and aerr.body["error"]["type"] == "rate_limit_error"
    assert "Retry-After" in aerr.response.headers
    aheaders = aerr.response.headers
    assert aheaders["anthropic-ratelimit-requests-limit"] == "3"
    assert aheaders["anthropic-ratelimit-requests-remaining"] == "0"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", aheaders["anthropic-ratelimit-requests-reset"])
    assert parse_structured(aheaders["RateLimit"])["rpm"]["r"] == "0"  # IETF fields on every route
    assert "x-ratelimit-remaining-requests" not in aheaders  # OpenAI aliases on OpenAI routes only

    assert [r["status"] for r in records] == [200, 200, 200, 429, 429]
    assert records[3]["rule_id"] == "acct-rpm" and records[3]["error_type"] == "rate_limit"
    extra = records[3]["extra"]
    assert isinstance(extra, dict) and extra["quota"]["denied"] == ["acct-rpm/rpm"]


async def test_models_listing_gets_each_sdks_429_and_rate_limit_fields(
    start_quota_gateway: GatewayStarter,
) -> None:
    # /v1/models is both APIs' path: the client's family (anthropic-version) picks the 429 body
    # and the provider aliases, on admitted responses and denials alike.
    rule = RPM_RULE.replace("limit: 3, per: 1m, burst: 3", "limit: 2, per: 1m, burst: 2")
    async with (
        start_quota_gateway(rule) as gw,
        anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as ac,
        openai_client(gw) as oc,
    ):
        listed = await ac.models.with_raw_response.list()
        openai_listed = await oc.models.with_raw_response.list()
        with pytest.raises(anthropic.RateLimitError) as ainfo:
            await ac.models.list()
        with pytest.raises(openai.RateLimitError) as oinfo:
            await oc.models.list()

    assert listed.headers["anthropic-ratelimit-requests-remaining"] == "1"
    assert not [name for name in listed.headers if name.lower().startswith("x-ratelimit-")]
    assert openai_listed.headers["x-ratelimit-remaining-requests"] == "0"
    assert not [name for name in openai_listed.headers if name.lower().startswith("anthropic-ratelimit-")]

    aerr = ainfo.value
    assert isinstance(aerr.body, dict) and aerr.body["type"] == "error"
    assert aerr.body["error"]["type"] == "rate_limit_error"
    assert aerr.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "x-ratelimit-remaining-requests" not in aerr.response.headers
    assert int(aerr.response.headers["Retry-After"]) >= 1

    oerr = oinfo.value
    assert oerr.code == "rate_limit_exceeded"
    assert isinstance(oerr.body, dict) and oerr.body["type"] == "requests"
    assert oerr.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert not [name for name in oerr.response.headers if name.lower().startswith("anthropic-ratelimit-")]


OUTPUT_BUDGET_RULE = """\
- id: acct-output
  quota:
    limits:
      - {name: out, kind: output_tokens, limit: 100, per: 1h, key: [principal.account]}
"""


async def test_output_budget_is_reconciled_after_a_stream(start_quota_gateway: GatewayStarter) -> None:
    async with start_quota_gateway(OUTPUT_BUDGET_RULE) as gw, openai_client(gw) as c:
        streamed = await c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, max_tokens=90, stream=True
        )
        assert streamed.headers["x-ratelimit-remaining-tokens"] == "10"  # 90 reserved up front
        assert parse_structured(streamed.headers["RateLimit"])["out"]["r"] == "10"
        chunks = [chunk async for chunk in streamed.parse()]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        await settled(gw)
        # 6 were produced, so 94 fit now; without the reconcile only 10 would.
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, max_tokens=94
        )
        assert raw.headers["x-ratelimit-remaining-tokens"] == "0"
        await settled(gw)
        # Used: 6 + 6 = 12, so 89 would exceed 100 by one token and 88 fits exactly.
        with pytest.raises(openai.RateLimitError) as info:
            await c.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=89)
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, max_tokens=88
        )
        assert raw.headers["x-ratelimit-remaining-tokens"] == "0"
    assert info.value.response.headers["x-ratelimit-remaining-tokens"] == "88"
    # OpenAI's 429 names the limit's unit: a token budget says "tokens", a request rate "requests"
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "tokens"
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.response.headers.get("x-should-retry") != "false"
    assert "Retry-After" in info.value.response.headers


async def test_abandoned_stream_is_charged_what_was_produced(
    start_quota_gateway: GatewayStarter, mock_upstream: MockServer
) -> None:
    rule = OUTPUT_BUDGET_RULE.replace("limit: 100", "limit: 1000")
    async with start_quota_gateway(rule) as gw, openai_client(gw) as c:
        stream = await c.chat.completions.create(
            model="gpt-test",
            messages=MESSAGES,
            max_tokens=500,
            stream=True,
            extra_headers={"x-mock-chunks": "200", "x-mock-chunk-delay-ms": "10"},
        )
        received = 0
        async for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 5:
                break
        await stream.close()  # the client walks away mid-stream
        await settled(gw)
        abandoned = (await gw.access_records())[-1]
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=MESSAGES, max_tokens=100
        )
    produced = abandoned["output_tokens"]
    assert isinstance(produced, int) and 5 <= produced < 200, abandoned  # neither free nor the reservation
    assert abandoned["status"] == 499 and abandoned["client_disconnected"] is True, abandoned
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - produced - 100)


async def test_shadow_quota_never_denies(start_quota_gateway: GatewayStarter) -> None:
    rule = """\
    - id: acct-rpm-shadow
      mode: shadow
      quota:
        limits:
          - {name: rpm, kind: requests, limit: 1, per: 1m, key: [principal.account]}
    """
    async with start_quota_gateway(rule) as gw, openai_client(gw) as c:
        for _ in range(4):
            raw = await c.chat.completions.with_raw_response.create(model="gpt-test", messages=MESSAGES)
            assert raw.http_response.status_code == 200
            assert "RateLimit" not in raw.headers  # shadow limits are not advertised
        records = await gw.audit_records()
    assert [r["status"] for r in records] == [200] * 4
    would = [r["extra"]["quota"].get("would_deny") for r in records]  # type: ignore[index]
    assert would == [None] + [["acct-rpm-shadow/rpm"]] * 3
    assert all(r["shadow"] == [{"rule": "acct-rpm-shadow", "would": None}] for r in records)


TOKEN_BUDGET_RULE = """\
- id: acct-tokens
  quota:
    limits:
      - {name: tokens, kind: total_tokens, limit: 300, per: 1h, key: [principal.account]}
"""


async def test_routes_without_generation_reserve_only_what_they_consume(
    start_quota_gateway: GatewayStarter,
) -> None:
    # The budget is far below default_output_tokens (4096): a route that produces no output must
    # not reserve it, and counting tokens (no model runs) must cost no tokens at all.
    async with start_quota_gateway(TOKEN_BUDGET_RULE) as gw, openai_client(gw) as c:
        embedded = await c.embeddings.with_raw_response.create(model="text-embedding-test", input="hello")
        assert embedded.http_response.status_code == 200
        reserved = 300 - int(embedded.headers["x-ratelimit-remaining-tokens"])
        assert 0 < reserved < 100  # the prompt's estimate only
        models = await c.models.with_raw_response.list()
        assert models.http_response.status_code == 200
        # the embedding was reconciled to its reported usage; listing models reserved nothing
        assert int(models.headers["x-ratelimit-remaining-tokens"]) > 300 - reserved
        await settled(gw)
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as ac:
            counts = []
            for _ in range(3):
                counted = await ac.messages.with_raw_response.count_tokens(
                    model="claude-test", messages=[{"role": "user", "content": "hello " * 200}])
                assert counted.http_response.status_code == 200
                counts.append(counted.headers["anthropic-ratelimit-tokens-remaining"])
                await settled(gw)
        records = await gw.audit_records()
    assert len(set(counts)) == 1 and int(counts[0]) >= 300 - reserved  # nothing charged, nothing kept
    counted_records = [r for r in records if r["route"] == "messages.count_tokens"]
    assert len(counted_records) == 3
    assert all(r["extra"]["quota"]["settled"] == {"input_tokens": 0, "output_tokens": 0}  # type: ignore[index]
               for r in counted_records)


async def test_a_request_the_upstream_never_received_pays_nothing(tmp_path: Path) -> None:
    """A connection refused (or a connect timeout) means the model never read the prompt: the
    reservation is refunded in full, where a reset after sending keeps the input estimate."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-quota.yaml").write_text(
        "version: 1\nrules:\n" + textwrap.indent(textwrap.dedent(TOKEN_BUDGET_RULE), "  "))
    closed = free_port()  # nothing listens there
    text = gateway_yaml(f"http://127.0.0.1:{closed}", tmp_path,
                        f"policies: {{dir: {policies}, watch: false}}\n", audit_log=tmp_path / "audit.jsonl")
    async with run_gateway(text, tmp_path) as gw, openai_client(gw) as c:
        with pytest.raises(openai.APIStatusError) as failed:
            await c.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=50)
        await settled(gw)
        records = await gw.audit_records()
    assert failed.value.status_code == 502
    assert records[-1]["extra"]["quota"]["settled"] == {"input_tokens": 0, "output_tokens": 0}  # type: ignore[index]
