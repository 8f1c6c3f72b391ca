"""The quota stage's 429 as the official SDKs' own retry code reads it: how long they wait, and
when they do not retry at all."""

from __future__ import annotations

from collections.abc import Mapping

import anthropic
import httpx2
import openai
from openai._models import FinalRequestOptions

from gateway.context import ApiFamily
from gateway.quota.limits import LimitKind
from gateway.quota.stage import QuotaStage
from tests.support.quota_ctx import limit, make_ctx, quota


async def _denial(stage: QuotaStage, per: float, api: ApiFamily) -> Mapping[str, str]:
    action = quota(f"r-{per:g}", limit("rps", LimitKind.REQUESTS, 10, per))
    assert await stage(make_ctx(action, api=api)) is None
    decision = await stage(make_ctx(action, api=api))
    assert decision is not None and decision.status == 429
    return decision.headers


async def test_openai_sdk_waits_exactly_what_the_429_says(stage: QuotaStage) -> None:
    headers = httpx2.Headers(await _denial(stage, 1.0, ApiFamily.OPENAI))  # 10/s: the next in 100 ms
    assert headers["Retry-After"] == "1" and headers["retry-after-ms"] == "100"
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9", max_retries=1)
    options = FinalRequestOptions(method="post", url="/chat/completions")
    assert client._parse_retry_after_header(headers) == 0.1
    assert client._calculate_retry_timeout(1, options, headers) == 0.1
    assert client._should_retry(httpx2.Response(429, headers=headers))
    # a wait beyond the SDK's cap (2 min): no retry, rather than a shorter one
    long = httpx2.Headers(await _denial(stage, 3600.0, ApiFamily.OPENAI))  # 10/h: 6 min
    assert long["Retry-After"] == "360" and not client._should_retry(httpx2.Response(429, headers=long))
    client.close()


async def test_retry_after_ms_is_the_stores_milliseconds_exactly(stage: QuotaStage) -> None:
    # 1000 per 2007 s: the next request fits 2007 ms later, which is 2.007 s as a float
    action = quota("r1", limit("r", LimitKind.REQUESTS, 1000, 2007))
    assert await stage(make_ctx(action)) is None
    decision = await stage(make_ctx(action))
    assert decision is not None
    assert decision.headers["retry-after-ms"] == "2007" and decision.headers["Retry-After"] == "3"
    assert decision.headers["x-ratelimit-reset-requests"] == "2.007s"


async def test_anthropic_sdk_waits_exactly_what_the_429_says(stage: QuotaStage) -> None:
    headers = httpx2.Headers(await _denial(stage, 1.0, ApiFamily.ANTHROPIC))
    client = anthropic.Anthropic(api_key="k", base_url="http://127.0.0.1:9", max_retries=1)
    options = anthropic._models.FinalRequestOptions(method="post", url="/v1/messages")
    assert client._parse_retry_after_header(headers) == 0.1
    assert client._calculate_retry_timeout(1, options, headers) == 0.1
    assert client._should_retry(httpx2.Response(429, headers=headers))
    client.close()


async def test_a_request_that_can_never_fit_is_not_retried_by_either_sdk(stage: QuotaStage) -> None:
    action = quota("r1", limit("otpm", LimitKind.OUTPUT_TOKENS, 100, 60))
    decision = await stage(make_ctx(action, max_tokens=500))
    assert decision is not None and decision.status == 429
    headers = httpx2.Headers(decision.headers)
    assert "Retry-After" not in headers and "retry-after-ms" not in headers
    for client in (openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9"),
                   anthropic.Anthropic(api_key="k", base_url="http://127.0.0.1:9")):
        assert not client._should_retry(httpx2.Response(429, headers=headers))
        client.close()
