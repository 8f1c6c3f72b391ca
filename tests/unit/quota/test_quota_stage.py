"""QuotaStage with a real MemoryStore on a fake clock, and hand-built contexts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import orjson
import pytest

from gateway.context import ApiFamily, RequestContext
from gateway.errors import error_payload
from gateway.quota.limits import LimitKind
from gateway.quota.settings import QuotaSettings
from gateway.quota.stage import QuotaStage
from gateway.store.base import Adjustment, Algorithm, Charge, ChargeResult, StoreError
from gateway.store.breaker import BreakerSettings, BreakerState, FailureMode
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.clock import FakeClock
from tests.support.quota_ctx import limit, make_ctx, quota
from tests.support.quota_stage import SETTINGS, DownStore
from tests.support.redis_servers import free_port


async def test_no_quota_actions_is_a_no_op(stage: QuotaStage) -> None:
    ctx = make_ctx()
    assert await stage(ctx) is None and ctx.response_headers == {}
    await stage.settle(ctx)


async def test_allows_then_429_with_retry_after_and_headers(stage: QuotaStage, clock: FakeClock) -> None:
    action = quota("r1", limit("rpm", LimitKind.REQUESTS, 60, 60, burst=2))
    first, second, third = make_ctx(action), make_ctx(action), make_ctx(action)
    assert await stage(first) is None and await stage(second) is None
    assert first.response_headers["x-ratelimit-remaining-requests"] == "1"
    assert second.response_headers["RateLimit"] == '"rpm";r=0;t=2'
    decision = await stage(third)
    assert decision is not None and decision.status == 429 and decision.error_type == "rate_limit"
    assert decision.code == "rate_limit_exceeded" and decision.rule_id == "r1" and decision.retryable
    assert decision.headers["Retry-After"] == "1" and decision.headers["retry-after-ms"] == "1000"
    assert decision.message == ("Rate limit exceeded: limit 'rpm' allows 60 requests "
                                "per 1m. Retry after 1 seconds.")
    assert third.audit["quota"]["denied"] == ["r1/rpm"]
    clock.advance(1.0)
    fourth = make_ctx(action)
    assert await stage(fourth) is None
    for ctx in (first, second, third, fourth):
        await stage.settle(ctx)
    assert stage.pending == 0


async def test_tokens_reserved_then_reconciled(stage: QuotaStage) -> None:
    action = quota("r1", limit("itpm", LimitKind.INPUT_TOKENS, 1000, 60),
                   limit("otpm", LimitKind.OUTPUT_TOKENS, 5000, 60))
    ctx = make_ctx(action, input_tokens=300, max_tokens=None, n=2, api=ApiFamily.ANTHROPIC)
    assert await stage(ctx) is None
    assert ctx.response_headers["anthropic-ratelimit-input-tokens-remaining"] == "700"
    assert ctx.response_headers["anthropic-ratelimit-output-tokens-remaining"] == "3000"  # 1000 × n=2
    ctx.upstream_started = time.perf_counter()
    ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.complete = 120, 80, True
    await stage.settle(ctx)
    probe = make_ctx(action, input_tokens=0, max_tokens=1, api=ApiFamily.ANTHROPIC)
    assert await stage(probe) is None
    assert probe.response_headers["anthropic-ratelimit-input-tokens-remaining"] == "880"
    assert probe.response_headers["anthropic-ratelimit-output-tokens-remaining"] == "4919"


async def test_memory_store_settles_without_an_await(stage: QuotaStage) -> None:
    """The pipeline only makes a task for settling when a stage hands back an awaitable."""
    action = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60))
    ctx = make_ctx(action, input_tokens=100, max_tokens=400)
    assert await stage(ctx) is None
    ctx.upstream_started = time.perf_counter()
    ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.complete = 100, 50, True
    assert stage.settle_now(ctx) is None  # applied at once
    assert stage.settle_now(ctx) is None  # and only once
    probe = make_ctx(action, input_tokens=0, max_tokens=1)
    assert await stage(probe) is None
    assert probe.response_headers["x-ratelimit-remaining-tokens"] == str(1000 - 150 - 1)


async def test_abandoned_stream_pays_for_what_was_produced(stage: QuotaStage) -> None:
    action = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 10_000, 60))
    ctx = make_ctx(action, input_tokens=100, max_tokens=4000)
    assert await stage(ctx) is None
    ctx.upstream_started = time.perf_counter()
    ctx.usage.output_tokens = 37  # streamed so far; no final usage: the client went away
    ctx.client_disconnected = True
    await stage.settle(ctx)
    assert ctx.audit["quota"]["settled"] == {"input_tokens": 100, "output_tokens": 37}
    probe = make_ctx(action, input_tokens=0, max_tokens=1)
    await stage(probe)
    assert probe.response_headers["x-ratelimit-remaining-tokens"] == str(10_000 - 137 - 1)


async def test_request_that_never_reached_the_upstream_is_refunded(stage: QuotaStage) -> None:
    action = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 10_000, 60))
    ctx = make_ctx(action, input_tokens=100, max_tokens=4000)
    assert await stage(ctx) is None
    await stage.settle(ctx)  # e.g. a later stage denied it
    probe = make_ctx(action, input_tokens=0, max_tokens=1)
    await stage(probe)
    assert probe.response_headers["x-ratelimit-remaining-tokens"] == "9999"


async def test_spend_is_priced_per_model(stage: QuotaStage) -> None:
    action = quota("r1", limit("usd", LimitKind.SPEND, 1_000_000, 86400))  # $1/day
    ctx = make_ctx(action, input_tokens=1000, max_tokens=500)
    assert await stage(ctx) is None
    # 1000 × $2.5/M + 500 × $10/M = $0.0075 = 7500 micro-USD; it stops counting one day plus
    # at most one bucket (1/30 day) later: t = 86400 + 2880 - (offset of now in its bucket)
    assert ctx.response_headers["RateLimit"] == '"usd";r=992500;t=87040'


async def test_audit_limits_same_json_on_the_admitted_fast_path(stage: QuotaStage) -> None:
    # The all-admitted path writes quota.limits from a pre-serialised template; a shadow limit
    # takes the general path (dicts). Names with JSON and %-format metacharacters on both.
    odd = 'r"1%d\\'
    enforced = quota(odd, limit("rpm%s", LimitKind.REQUESTS, 60, 60, burst=5),
                     limit('tp"d', LimitKind.TOTAL_TOKENS, 10_000, 86400))
    shadowed = quota("s%%", limit("rpm", LimitKind.REQUESTS, 60, 60, burst=5), shadow=True)
    fast, general = make_ctx(enforced), make_ctx(enforced, shadowed)
    assert await stage(fast) is None and await stage(general) is None
    fast_limits = orjson.loads(orjson.dumps(fast.audit["quota"]))["limits"]
    general_limits = orjson.loads(orjson.dumps(general.audit["quota"]))["limits"]
    assert isinstance(fast.audit["quota"]["limits"], orjson.Fragment)  # (else this tests nothing)
    assert fast_limits == [
        {"rule": odd, "limit": "rpm%s", "kind": "requests", "shadow": False, "allowed": True, "remaining": 4},
        {"rule": odd, "limit": 'tp"d', "kind": "total_tokens", "shadow": False, "allowed": True,
         "remaining": 10_000 - 100 - 200}]
    assert general_limits[:2] == [dict(entry, remaining=entry["remaining"] - (1 if i == 0 else 300))
                                  for i, entry in enumerate(fast_limits)]
    assert general_limits[2] == {"rule": "s%%", "limit": "rpm", "kind": "requests", "shadow": True,
                                 "allowed": True, "remaining": 4}


async def test_request_rates_leave_nothing_to_settle(stage: QuotaStage) -> None:
    rates = quota("r1", limit("rpm", LimitKind.REQUESTS, 60, 60, burst=5))
    tokens = quota("r2", limit("tpm", LimitKind.TOTAL_TOKENS, 10_000, 60))
    rate_only, with_tokens = make_ctx(rates), make_ctx(rates, tokens)
    assert await stage(rate_only) is None and await stage(with_tokens) is None
    assert stage.pending == 1  # only the request with a token reservation holds a ticket
    for ctx in (rate_only, with_tokens):
        ctx.upstream_started = time.perf_counter()
        ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.complete = 90, 10, True
        await stage.settle(ctx)
    assert "settled" not in rate_only.audit["quota"]
    assert with_tokens.audit["quota"]["settled"] == {"input_tokens": 90, "output_tokens": 10}
    assert stage.pending == 0


async def test_concurrency_lease_released_on_settle(stage: QuotaStage) -> None:
    action = quota("r1", limit("conc", LimitKind.CONCURRENCY, 1))
    first, second = make_ctx(action), make_ctx(action)
    assert await stage(first) is None
    decision = await stage(second)
    assert decision is not None and decision.status == 429
    await stage.settle(first)
    assert await stage(make_ctx(action)) is None


async def test_shadow_never_denies_but_records(stage: QuotaStage) -> None:
    action = quota("shadowed", limit("rpm", LimitKind.REQUESTS, 1, 60), shadow=True)
    ctxs = [make_ctx(action) for _ in range(3)]
    for ctx in ctxs:
        assert await stage(ctx) is None
    assert "would_deny" not in ctxs[0].audit["quota"]
    assert ctxs[1].audit["quota"]["would_deny"] == ["shadowed/rpm"]
    assert ctxs[2].response_headers == {}  # shadow limits are not advertised


async def test_one_denying_rule_charges_no_other(stage: QuotaStage) -> None:
    wide = quota("wide", limit("tpm", LimitKind.TOTAL_TOKENS, 10_000, 60))
    narrow = quota("narrow", limit("rpm", LimitKind.REQUESTS, 1, 60))
    assert await stage(make_ctx(wide, narrow, input_tokens=100, max_tokens=100)) is None
    denied = make_ctx(wide, narrow, input_tokens=100, max_tokens=100)
    assert (await stage(denied)) is not None
    assert denied.response_headers["x-ratelimit-remaining-tokens"] == "9800"  # not 9600
    assert denied.response_headers["x-ratelimit-remaining-requests"] == "0"


async def test_request_that_can_never_fit_is_not_retryable(stage: QuotaStage) -> None:
    action = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60))
    decision = await stage(make_ctx(action, input_tokens=100, max_tokens=4000))
    assert decision is not None and decision.status == 429 and not decision.retryable
    assert decision.headers["x-should-retry"] == "false" and "Retry-After" not in decision.headers


@pytest.mark.parametrize(("kind", "amount", "unit"), [
    (LimitKind.REQUESTS, 1, "requests"),
    (LimitKind.CONCURRENCY, 1, "requests"),  # only fewer requests in flight help
    (LimitKind.INPUT_TOKENS, 150, "tokens"),
    (LimitKind.OUTPUT_TOKENS, 300, "tokens"),
    (LimitKind.TOTAL_TOKENS, 450, "tokens"),
    (LimitKind.SPEND, 3000, "tokens"),  # priced from tokens: fewer tokens help
])
async def test_openai_429_type_names_the_unit_of_the_denying_limit(
        stage: QuotaStage, kind: LimitKind, amount: int, unit: str) -> None:
    # Each request costs 1 request, 100 input and 200 output tokens, 2250 micro-USD: the first
    # fits every limit above, the second none.
    action = quota("r1", limit("lim", kind, amount, 60))
    assert await stage(make_ctx(action, input_tokens=100, max_tokens=200)) is None
    decision = await stage(make_ctx(action, input_tokens=100, max_tokens=200))
    assert decision is not None and decision.retryable
    assert error_payload(ApiFamily.OPENAI, decision)["error"] == {
        "message": decision.message, "type": unit, "param": None, "code": "rate_limit_exceeded"}
    assert error_payload(ApiFamily.ANTHROPIC, decision)["error"]["type"] == "rate_limit_error"


async def test_a_request_that_can_never_fit_a_token_budget_says_tokens(stage: QuotaStage) -> None:
    action = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60))
    decision = await stage(make_ctx(action, input_tokens=100, max_tokens=4000))
    assert decision is not None and not decision.retryable
    assert error_payload(ApiFamily.OPENAI, decision)["error"]["type"] == "tokens"


async def test_the_429_type_is_the_limit_that_waits_longest(stage: QuotaStage, clock: FakeClock) -> None:
    # Both limits deny; the body describes the one that frees last, and its unit.
    action = quota("r1", limit("rpm", LimitKind.REQUESTS, 60, 60),
                   limit("tph", LimitKind.TOTAL_TOKENS, 400, 3600))
    assert await stage(make_ctx(action, input_tokens=100, max_tokens=200)) is None
    decision = await stage(make_ctx(action, input_tokens=100, max_tokens=200))
    assert decision is not None and "'tph'" in decision.message
    assert error_payload(ApiFamily.OPENAI, decision)["error"]["type"] == "tokens"


async def test_changed_numbers_apply_at_once_and_state_survives(stage: QuotaStage) -> None:
    before = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60))
    assert await stage(make_ctx(before, input_tokens=300, max_tokens=300)) is None
    after = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 700, 3600))  # policy reloaded
    probe = make_ctx(after, input_tokens=0, max_tokens=100)
    assert await stage(probe) is None
    assert probe.response_headers["x-ratelimit-remaining-tokens"] == "0"  # 700 - 600 - 100
    assert await stage(make_ctx(after, input_tokens=0, max_tokens=1)) is not None


@pytest.mark.parametrize("mode", list(FailureMode))
async def test_failure_modes_with_an_unreachable_store(mode: FailureMode, clock: FakeClock) -> None:
    monotonic = FakeClock(0.0)
    store = RedisStore.from_url(f"redis://127.0.0.1:{free_port()}/0", deadline=0.5)
    settings = QuotaSettings(replicas=3, on_store_failure=mode,
                             breaker=BreakerSettings(failures=2, reset_after=5.0))
    stage = QuotaStage(store, settings, clock, monotonic)
    action = quota("r1", limit("rpm", LimitKind.REQUESTS, 9, 60, burst=9))
    statuses = []
    for _ in range(5):
        ctx = make_ctx(action)
        decision = await stage(ctx)
        statuses.append(decision.status if decision else 200)
        await stage.settle(ctx)
    expected = {FailureMode.OPEN: [200] * 5, FailureMode.CLOSED: [503] * 5,
                FailureMode.LOCAL: [200, 200, 200, 429, 429]}[mode]  # 9 / 3 replicas
    assert statuses == expected
    stats = stage.guard.stats
    assert stats.errors == 2 and stats.short_circuited == 3 and stats.breaker_opened == 1
    assert stats.fallbacks[mode.value] == 5
    monotonic.advance(5.0)  # half-open: one probe goes to the store, fails, re-opens
    await stage(make_ctx(action))
    assert stats.errors == 3 and stats.breaker_state is BreakerState.OPEN
    assert stats.snapshot()["breaker_opened"] == 2  # opened, then re-opened after the probe
    await stage.guard.close()


class QueueingStore(MemoryStore):
    """A store that can queue reconciles (as RedisStore does); the test answers them."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.queued: list[tuple[list[Adjustment], Callable[[StoreError | None], None]]] = []

    def adjust_soon(self, adjustments: Sequence[Adjustment],
                    done: Callable[[StoreError | None], None]) -> bool:
        self.queued.append((list(adjustments), done))
        return True


async def test_settle_queues_reconciles_and_counts_their_outcome(clock: FakeClock) -> None:
    store = QueueingStore(clock)
    stage = QuotaStage(store, SETTINGS, clock)
    action = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 10_000, 60))
    ctxs = [make_ctx(action, input_tokens=100, max_tokens=200) for _ in range(2)]
    for ctx in ctxs:
        assert await stage(ctx) is None
        ctx.usage.input_tokens, ctx.usage.output_tokens, ctx.usage.complete = 100, 20, True
        ctx.upstream_started, ctx.upstream_status = 1.0, 200
        await stage.settle(ctx)  # returns without the store having answered
    assert [[a.delta for a in adjustments] for adjustments, _ in store.queued] == [[-180], [-180]]
    stats = stage.guard.stats
    store.queued[0][1](None)
    store.queued[1][1](StoreError("store error: connection lost"))
    assert stats.calls == 4 and stats.errors == 1 and stats.settle_failures == 1
    assert stats.breaker_state is BreakerState.CLOSED  # one failure does not open it


async def test_headers_follow_the_route_family_and_qualify_shared_names(stage: QuotaStage) -> None:
    r1 = quota("r1", limit("rpm", LimitKind.REQUESTS, 10, 60, burst=10))
    r2 = quota("r2", limit("rpm", LimitKind.REQUESTS, 5, 60, burst=5),
               limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60))
    shadow = quota("r3", limit("rpm", LimitKind.REQUESTS, 1, 60), shadow=True)
    for api in ApiFamily:
        ctx = make_ctx(r1, r2, shadow, api=api, input_tokens=10, max_tokens=10)
        assert await stage(ctx) is None
        headers = ctx.response_headers
        assert headers["RateLimit-Policy"] == (
            '"r1.rpm";q=10;w=60;qu="requests", "r2.rpm";q=5;w=60;qu="requests", '
            '"tpm";q=1000;w=60;tg-unit="total_tokens"')
        used = 0 if api is ApiFamily.OPENAI else 1
        assert headers["RateLimit"] == (f'"r1.rpm";r={9 - used};t={6 + 6 * used}, '
                                        f'"r2.rpm";r={4 - used};t={12 + 12 * used}, '
                                        f'"tpm";r={980 - 20 * used};t=62')
        if api is ApiFamily.OPENAI:
            assert headers["x-ratelimit-limit-requests"] == "5"  # the tighter one
            assert headers["x-ratelimit-remaining-tokens"] == "980"
            assert not any(name.startswith("anthropic-") for name in headers)
        else:
            assert headers["anthropic-ratelimit-requests-remaining"] == "3"
            assert headers["anthropic-ratelimit-tokens-limit"] == "1000"
            assert not any(name.startswith("x-ratelimit-") for name in headers)


async def test_local_fallback_headers_show_the_replica_share(clock: FakeClock) -> None:
    settings = QuotaSettings(replicas=3, on_store_failure=FailureMode.LOCAL)
    stage = QuotaStage(DownStore(clock), settings, clock)
    local = quota("r1", limit("rpm", LimitKind.REQUESTS, 9, 60, burst=9))
    skipped = quota("r2", limit("rpm", LimitKind.REQUESTS, 1, 60), on_store_failure=FailureMode.OPEN)
    ctx = make_ctx(local, skipped, api=ApiFamily.ANTHROPIC)
    assert await stage(ctx) is None
    assert ctx.audit["quota"]["backend"] == "local"
    headers = ctx.response_headers
    # only the local limit was checked, so its name needs no qualifying; 9 / 3 replicas
    assert headers["RateLimit-Policy"] == '"rpm";q=3;w=60;qu="requests"'
    assert headers["RateLimit"] == '"rpm";r=2;t=20'
    assert headers["anthropic-ratelimit-requests-limit"] == "3"
    assert "x-ratelimit-limit-requests" not in headers
    await stage.settle(ctx)
    await stage.guard.close()


async def test_memory_window_drops_buckets_that_left_the_window(clock: FakeClock) -> None:
    store = MemoryStore(clock)
    charge = Charge("w", Algorithm.WINDOW, 1_000_000, 3_000, 1)  # 30 buckets of 100 ms
    for _ in range(100):  # 10 s: a bucket every 100 ms, over three windows
        assert (await store.charge([charge])).allowed
        clock.advance(0.1)
    window = store._data["w"].value
    assert 30 <= len(window.buckets) <= 32  # held: one window plus at most one bucket, never the 10 s
    assert window.used == sum(window.buckets.values())  # the running total followed the drops
    peek = await store.charge([Charge("w", Algorithm.WINDOW, 1_000_000, 3_000, 0)])
    assert peek.states[0].remaining == 1_000_000 - 30  # the last 3 s of charges, one per 100 ms


class _RecordingStore(MemoryStore):
    """A MemoryStore that keeps each charges sequence it was handed."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.seen: list[Sequence[Charge]] = []

    async def charge(self, charges: Sequence[Charge]) -> ChargeResult:
        self.seen.append(charges)
        return await super().charge(charges)


async def test_charges_are_reused_per_combination_and_slot(clock: FakeClock) -> None:
    """The same combination of key values with the same cost inputs hands the store the very same
    tuple (what the Redis store memoises its encoding by); new cost inputs rebuild only the charges
    whose cost changed; a new combination still reuses each slot's known key and charge."""
    store = _RecordingStore(clock)
    stage = QuotaStage(store, SETTINGS, clock)
    rule = quota("r", limit("rpm", "requests", 10**6, burst=10**6),
                 limit("tpd", "total_tokens", 10**9, 86400, key=("principal.org",)))

    def ctx(account: str, org: str, input_tokens: int = 100) -> RequestContext:
        c = make_ctx(rule, account=account, input_tokens=input_tokens)
        c.principal.org = org
        return c

    for c in (ctx("a", "o"), ctx("a", "o"), ctx("a", "o", input_tokens=150), ctx("b", "o", input_tokens=150)):
        assert await stage(c) is None
        await stage.settle(c)
    first, same, costlier, other = store.seen
    assert same is first  # one tuple object per combination and cost inputs
    assert costlier is not first and costlier[0] is first[0]  # the request rate's charge kept
    assert costlier[1].cost == first[1].cost + 50 and costlier[1].key == first[1].key
    assert other[0].key != first[0].key and other[1] is costlier[1]  # org slot: same key, same cost
    assert [c.key for c in first] == ["q|r|rpm|requests|principal.account=a",
                                      "q|r|tpd|total_tokens|principal.org=o"]


async def test_keys_of_several_fields_are_the_limits_identity(clock: FakeClock) -> None:
    """A limit keyed on several fields: the stage builds the store key from the values it read,
    and it must be exactly the limit's identity (what quota state is found by, across reloads)."""
    store = _RecordingStore(clock)
    stage = QuotaStage(store, SETTINGS, clock)
    pair = limit("rpm-net", "requests", 10**6, burst=10**6, key=("principal.account", "principal.org"))
    rule = quota("r|1", pair, limit("rpm", "requests", 10**6, burst=10**6))
    contexts = []
    for account, org in (("a", "o{1}"), ("a", None), ("b", "o{1}"), ("a", "o{1}")):
        c = make_ctx(rule, account=account)
        c.principal.org = org
        contexts.append(c)
        assert await stage(c) is None
        await stage.settle(c)
    keys = [[charge.key for charge in seen] for seen in store.seen]
    assert keys == [[pair.identity("r|1", c), rule.value.limits[1].identity("r|1", c)] for c in contexts]
    assert keys[0][0] == "q|r%7C1|rpm-net|requests|principal.account=a|principal.org=o%7B1%7D"
    assert keys[1][0] == "q|r%7C1|rpm-net|requests|principal.account=a|principal.org=~"
    assert keys[3] == keys[0]
