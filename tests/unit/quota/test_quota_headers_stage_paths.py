"""The rate-limit headers on every path of the quota stage (admitted, denied, shadow, store failed
open, local fallback, routes that charge no tokens), checked as test_quota_headers_conformance.py
checks the builder's."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.context import ApiFamily, RequestContext
from gateway.quota.headers import HeaderItem
from gateway.quota.limits import CompiledLimit, LimitKind
from gateway.quota.settings import QuotaSettings
from gateway.quota.stage import QuotaStage
from gateway.store.base import LimitState
from gateway.store.breaker import FailureMode
from tests.support.clock import FakeClock
from tests.support.quota_ctx import limit, make_ctx, quota
from tests.support.quota_stage import DownStore
from tests.support.ratelimit_conformance import check_aliases, ietf


def items_of(ctx: RequestContext, stage: QuotaStage, names: dict[str, CompiledLimit]) -> list[HeaderItem]:
    """The items the response's IETF fields describe, rebuilt from them (to check the aliases)."""
    _, state = ietf(ctx.response_headers)
    return [HeaderItem(name, names[name], LimitState(True, names[name].limit, params["r"],
                                                     float(params.get("t", 0)), 0.0))
            for name, params in state.items()]


@pytest.mark.parametrize("api", [ApiFamily.OPENAI, ApiFamily.ANTHROPIC])
async def test_admitted_and_denied_responses_conform(stage: QuotaStage, clock: FakeClock,
                                                    api: ApiFamily) -> None:
    limits = {"rpm": limit("rpm", LimitKind.REQUESTS, 3, 60, burst=3),
              "itpm": limit("itpm", LimitKind.INPUT_TOKENS, 1000, 60),
              "otpm": limit("otpm", LimitKind.OUTPUT_TOKENS, 800, 60),
              "streams": limit("streams", LimitKind.CONCURRENCY, 2)}
    action = quota("r1", *limits.values())
    seen = []
    for _ in range(4):
        ctx = make_ctx(action, api=api, input_tokens=100, max_tokens=300)
        decision = await stage(ctx)
        seen.append((ctx, decision))
    statuses = [429 if decision else 200 for _, decision in seen]
    assert statuses == [200, 200, 429, 429]  # two leases held: the third stream waits
    for ctx, decision in seen:
        headers = ctx.response_headers
        policy, state = ietf(headers)
        assert policy["streams"] == {"q": 2, "qu": "concurrent-requests"}
        check_aliases(headers, items_of(ctx, stage, limits), clock(), api, precise=False)
        if decision is not None:
            assert decision.headers["RateLimit"] == headers["RateLimit"]
            retry = int(decision.headers["Retry-After"])
            assert retry >= 1 and int(decision.headers["retry-after-ms"]) <= retry * 1000
    # what the denial shows is what is really left: the denied charge was not applied
    _, denied = ietf(seen[2][0].response_headers)
    assert denied["rpm"]["r"] == 1 and denied["itpm"]["r"] == 800 and denied["streams"]["r"] == 0
    for ctx, _ in seen:
        await stage.settle(ctx)


async def test_shadow_limits_are_not_advertised_even_when_they_would_deny(stage: QuotaStage) -> None:
    enforced = quota("r1", limit("rpm", LimitKind.REQUESTS, 100, 60, burst=100))
    shadow = quota("r2", limit("rpm", LimitKind.REQUESTS, 1, 60),
                   limit("tpm", LimitKind.TOTAL_TOKENS, 10, 60), shadow=True)
    for i in range(3):
        ctx = make_ctx(enforced, shadow)
        assert await stage(ctx) is None
        policy, state = ietf(ctx.response_headers)
        assert list(policy) == ["rpm"] and state["rpm"]["r"] == 99 - i  # only r1's
        assert "x-ratelimit-limit-tokens" not in ctx.response_headers
        assert ctx.response_headers["x-ratelimit-limit-requests"] == "100"
        assert ctx.audit["quota"]["would_deny"] == (["r2/rpm"] if i else []) + ["r2/tpm"]
        await stage.settle(ctx)


async def test_a_store_that_did_not_answer_claims_nothing(clock: FakeClock) -> None:
    settings = QuotaSettings(replicas=2, on_store_failure=FailureMode.OPEN)
    stage = QuotaStage(DownStore(clock), settings, clock)
    opened = quota("r1", limit("rpm", LimitKind.REQUESTS, 10, 60, burst=10),
                   limit("tpd", LimitKind.TOTAL_TOKENS, 10_000, 86400))
    ctx = make_ctx(opened)
    assert await stage(ctx) is None
    assert ctx.response_headers == {}  # nothing was checked: no remaining quota to claim
    closed = quota("r2", limit("rpm", LimitKind.REQUESTS, 10, 60), on_store_failure=FailureMode.CLOSED)
    ctx = make_ctx(opened, closed)
    decision = await stage(ctx)
    assert decision is not None and decision.status == 503 and ctx.response_headers == {}
    assert set(decision.headers) == {"Retry-After"}
    # local: the replica's own count of its share, the only limits that were checked
    local = quota("r3", limit("tpd", LimitKind.TOTAL_TOKENS, 10_000, 86400),
                  on_store_failure=FailureMode.LOCAL)
    ctx = make_ctx(opened, local, input_tokens=100, max_tokens=100)
    assert await stage(ctx) is None
    policy, state = ietf(ctx.response_headers)
    assert list(policy.values()) == [{"q": 5000, "w": 86400, "tg-unit": "total_tokens"}]  # 10,000 / 2
    assert [params["r"] for params in state.values()] == [4800]
    assert ctx.response_headers["x-ratelimit-limit-tokens"] == "5000"
    assert ctx.response_headers["x-ratelimit-remaining-tokens"] == "4800"
    assert "x-ratelimit-limit-requests" not in ctx.response_headers  # r1's limits were skipped
    await stage.settle(ctx)
    await stage.guard.close()


@pytest.mark.parametrize(("route", "api"), [("messages.count_tokens", ApiFamily.ANTHROPIC),
                                            ("models", ApiFamily.OPENAI)])
async def test_routes_that_charge_no_tokens_claim_no_charge(stage: QuotaStage, clock: FakeClock, route: str,
                                                             api: ApiFamily) -> None:
    limits = {"rpm": limit("rpm", LimitKind.REQUESTS, 10, 60, burst=10),
              "tpm": limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60)}
    action = quota("r1", *limits.values())
    for i in range(3):
        ctx = make_ctx(action, api=api, input_tokens=500, max_tokens=500)
        ctx.request = dataclasses.replace(ctx.request, route=route, billed=False, generates=False)
        assert await stage(ctx) is None
        _, state = ietf(ctx.response_headers)
        # the token budget is shown as it is: untouched, and due back to full at once (nothing
        # was charged that would have to leave a window), while the request rate counts
        assert state["tpm"] == {"r": 1000, "t": 0} and state["rpm"]["r"] == 9 - i
        check_aliases(ctx.response_headers, items_of(ctx, stage, limits), clock(), api, precise=False)
        await stage.settle(ctx)


async def test_remaining_is_never_negative_after_a_limit_is_lowered(stage: QuotaStage) -> None:
    before = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60),
                   limit("streams", LimitKind.CONCURRENCY, 4))
    held = [make_ctx(before, input_tokens=300, max_tokens=300)] + [
        make_ctx(before, input_tokens=1, max_tokens=1) for _ in range(2)]
    for ctx in held:  # 604 tokens reserved, three leases held
        assert await stage(ctx) is None
    after = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 100, 60),  # reload: same identity,
                  limit("streams", LimitKind.CONCURRENCY, 1))  # numbers below what is in use
    ctx = make_ctx(after, input_tokens=1, max_tokens=1)
    decision = await stage(ctx)
    assert decision is not None and decision.status == 429
    policy, state = ietf(ctx.response_headers)
    assert state["tpm"]["r"] == 0 and state["streams"]["r"] == 0
    assert ctx.response_headers["x-ratelimit-remaining-tokens"] == "0"
    for c in held:
        await stage.settle(c)
