"""``cap_tokens``: reserved and reconciled like a quota token budget, on the memory store and on
Redis. What a request pays (complete, cut short, never reached the model, refused, stopped
before the cap), what the audit shows, what concurrent requests can spend at the cap, and that a
proof-of-work solution is spent only once the cap has let its request through."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.client import solve_challenge
from gateway.context import RequestContext
from gateway.friction.model import CapTokens, DenySpec, FrictionAction, PowChallenge
from gateway.risk.settings import ChallengeSettings
from gateway.risk.sigstore import MemorySignalStore
from gateway.stages.friction import FrictionStage
from gateway.store.base import Store, StoreError
from gateway.store.memory import MemoryStore
from gateway.store.redis import RedisStore
from tests.support.redis_servers import RedisServer
from tests.unit.friction.test_friction_stage import with_actions
from tests.unit.risk.helpers import FakeClock, chat_ctx

INPUT = 50
POW = (("pow", FrictionAction(pow=PowChallenge(4)), False),)


@dataclass
class Harness:
    stage: FrictionStage
    store: Store


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    clock = FakeClock()
    store: Store
    if request.param == "memory":
        store = MemoryStore(clock)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore.from_url(server.url, prefix=f"t:{request.node.name}:", deadline=2.0)
    settings = ChallengeSettings(secret=b"s" * 32, min_difficulty=4, max_difficulty=8)
    yield Harness(FrictionStage(MemorySignalStore(clock), store, settings, clock), store)
    await store.close()


def capped(limit: int, max_tokens: int | None = 1000, *, rule: str = "cap", n: int = 1,
           extra: tuple[tuple[str, FrictionAction, bool], ...] = (), solution: str = "") -> RequestContext:
    body: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens is not None else {}
    headers = {"x-tollgate-solution": solution} if solution else {}
    ctx = chat_ctx("x", n=n, headers=headers, **body)
    ctx.request.input_tokens_estimate = INPUT
    return with_actions(ctx, *extra, (rule, FrictionAction(cap_tokens=CapTokens(limit, 3600.0)), False))


def answered(ctx: RequestContext, input_tokens: int, output_tokens: int, complete: bool = True) -> None:
    ctx.upstream_started = 1.0
    ctx.upstream_status = 200
    usage = ctx.usage
    usage.input_tokens, usage.output_tokens, usage.complete = input_tokens, output_tokens, complete


async def remaining(h: Harness, limit: int, rule: str = "cap") -> int:
    """What the budget has left: a probe reserving 1 token (then refunded)."""
    cap = FrictionAction(cap_tokens=CapTokens(limit, 3600.0))
    probe = with_actions(chat_ctx("x", max_tokens=1), (rule, cap, False))
    assert await h.stage(probe) is None
    left: int = probe.audit["friction"]["cap_tokens"]["caps"][0]["remaining"]
    await h.stage.settle(probe)  # never reached the model: refunded
    return left + 1


async def test_reservation_is_settled_to_what_was_consumed(harness: Harness) -> None:
    ctx = capped(5000, 1000, n=2)
    assert await harness.stage(ctx) is None
    note = ctx.audit["friction"]["cap_tokens"]
    assert note["reserved"] == INPUT + 2000 and note["result"] == "charged"
    assert note["caps"] == [{"rule": "cap", "key": "account", "limit": 5000, "allowed": True,
                             "remaining": 5000 - INPUT - 2000}]
    answered(ctx, 40, 300)
    await harness.stage.settle(ctx)
    assert note["settled"] == 340
    assert await remaining(harness, 5000) == 5000 - 340


async def test_a_stream_cut_short_pays_for_what_was_produced(harness: Harness) -> None:
    ctx = capped(5000)
    assert await harness.stage(ctx) is None
    answered(ctx, INPUT, 7, complete=False)  # the forwarder counts the input of a cut stream
    await harness.stage.settle(ctx)
    assert await remaining(harness, 5000) == 5000 - INPUT - 7
    silent = capped(5000)  # a non-streamed answer the client left before it came: input consumed
    assert await harness.stage(silent) is None
    answered(silent, 0, 0, complete=False)
    await harness.stage.settle(silent)
    assert silent.audit["friction"]["cap_tokens"]["settled"] == INPUT


async def test_a_request_that_never_ran_pays_nothing(harness: Harness) -> None:
    never = capped(5000)
    assert await harness.stage(never) is None
    await harness.stage.settle(never)  # e.g. the upstream could not be reached
    refused = capped(5000)
    assert await harness.stage(refused) is None
    refused.upstream_started, refused.upstream_status = 1.0, 500
    await harness.stage.settle(refused)
    assert refused.audit["friction"]["cap_tokens"]["settled"] == 0
    assert await remaining(harness, 5000) == 5000


async def test_a_request_stopped_by_stronger_friction_is_not_charged(harness: Harness) -> None:
    stronger = (("deny", FrictionAction(deny=DenySpec()), False),
                ("pow", FrictionAction(pow=PowChallenge(6)), False))
    for extra in stronger:
        ctx = capped(5000, extra=(extra,))
        decision = await harness.stage(ctx)
        assert decision is not None and "cap_tokens" not in ctx.audit["friction"]
        await harness.stage.settle(ctx)
    assert await remaining(harness, 5000) == 5000


async def test_budget_hit_is_audited_and_refused_with_the_rule(harness: Harness) -> None:
    first = capped(1500)
    assert await harness.stage(first) is None
    second = capped(1500)
    decision = await harness.stage(second)
    assert decision is not None and decision.status == 429 and decision.retryable
    assert decision.rule_id == "cap" and int(decision.headers["Retry-After"]) >= 1
    audit = second.audit["friction"]
    assert audit["effect"] == "cap_tokens" and audit["cap_tokens"]["result"] == "exhausted"
    assert audit["cap_tokens"]["caps"][0]["allowed"] is False
    await harness.stage.settle(second)  # nothing held: nothing to settle
    assert await remaining(harness, 1500) == 1500 - INPUT - 1000


async def test_a_reservation_larger_than_the_cap_can_never_fit(harness: Harness) -> None:
    ctx = capped(1000, 5000)
    decision = await harness.stage(ctx)
    assert decision is not None and decision.status == 429 and not decision.retryable
    assert "max_tokens" in decision.message and "Retry-After" not in decision.headers
    assert ctx.audit["friction"]["cap_tokens"]["result"] == "never_fits"


async def test_several_caps_charge_all_or_none(harness: Harness) -> None:
    wide = ("wide", FrictionAction(cap_tokens=CapTokens(100_000, 3600.0)), False)
    assert await harness.stage(capped(1500, extra=(wide,))) is None
    denied = capped(1500, extra=(wide,))
    assert await harness.stage(denied) is not None
    assert [c["allowed"] for c in denied.audit["friction"]["cap_tokens"]["caps"]] == [True, False]
    assert await remaining(harness, 100_000, "wide") == 100_000 - INPUT - 1000  # charged once


async def test_routes_where_no_model_runs_are_not_charged(harness: Harness) -> None:
    ctx = capped(10)
    ctx.request.billed = ctx.request.generates = False  # e.g. models, count_tokens
    assert await harness.stage(ctx) is None
    assert ctx.audit["friction"]["cap_tokens"] == {"reserved": 0, "result": "nothing_to_reserve"}


async def test_concurrent_requests_never_reserve_past_the_cap(harness: Harness) -> None:
    """1,050 tokens per request against 5,000: four fit, whatever the interleaving; the check and
    the charge are one atomic store call, so the fifth to tenth are refused."""
    contexts = [capped(5000) for _ in range(10)]
    decisions = await asyncio.gather(*(harness.stage(c) for c in contexts))
    assert sum(d is None for d in decisions) == 4
    for ctx, decision in zip(contexts, decisions, strict=True):
        if decision is None:
            answered(ctx, INPUT, 1000)
        await harness.stage.settle(ctx)
    assert await remaining(harness, 5000) == 5000 - 4 * 1050


async def test_overshoot_is_bounded_by_what_a_request_uses_past_its_reservation(harness: Harness) -> None:
    """Without max_tokens a request reserves 1,024 output tokens; the model may produce more, and
    that excess is the only way past the cap (settled after the fact, then the cap refuses)."""
    ctx = capped(2000, None)
    assert await harness.stage(ctx) is None
    assert ctx.audit["friction"]["cap_tokens"]["reserved"] == INPUT + 1024
    answered(ctx, INPUT, 2500)  # 550 over the cap, all from this one request
    await harness.stage.settle(ctx)
    refused = capped(2000, 10)
    assert await harness.stage(refused) is not None


async def solved(h: Harness) -> str:
    """A solution to a fresh challenge (the request asking for it charges no cap)."""
    decision = await h.stage(capped(1500, extra=POW))
    assert decision is not None and decision.status == 401
    return solve_challenge(dict(decision.extra))


async def test_a_solution_the_cap_refuses_stays_good_for_the_retry(harness: Harness) -> None:
    solution = await solved(harness)
    holder = capped(1500)  # 1,050 of the 1,500 reserved by a request in flight
    assert await harness.stage(holder) is None
    refused = capped(1500, extra=POW, solution=solution)
    decision = await harness.stage(refused)
    assert decision is not None and decision.status == 429 and decision.retryable
    audit = refused.audit["friction"]
    assert audit["effect"] == "cap_tokens" and audit["pow"] == "unspent"
    await harness.stage.settle(holder)  # never reached the model: its reservation is refunded
    retry = capped(1500, extra=POW, solution=solution)
    assert await harness.stage(retry) is None and retry.audit["friction"]["pow"] == "ok"
    answered(retry, INPUT, 100)
    await harness.stage.settle(retry)
    replay = capped(1500, extra=POW, solution=solution)
    decision = await harness.stage(replay)
    assert decision is not None and decision.status == 401 and decision.code == "challenge_required"
    audit = replay.audit["friction"]
    assert audit["effect"] == "pow" and audit["pow"] == "replayed"
    # The replay was found after its cap reservation (the spend comes last): refunded at settle.
    assert audit["cap_tokens"]["result"] == "charged"
    await harness.stage.settle(replay)
    assert audit["cap_tokens"]["settled"] == 0
    assert await remaining(harness, 1500) == 1500 - INPUT - 100


async def test_one_solution_sent_twice_at_once_is_accepted_once(harness: Harness) -> None:
    solution = await solved(harness)
    racing = [capped(5000, extra=POW, solution=solution) for _ in range(2)]
    decisions = await asyncio.gather(*(harness.stage(c) for c in racing))
    assert sorted(d is None for d in decisions) == [False, True]
    assert sorted(c.audit["friction"]["pow"] for c in racing) == ["ok", "replayed"]
    for ctx, decision in zip(racing, decisions, strict=True):
        if decision is None:
            answered(ctx, INPUT, 100)
        await harness.stage.settle(ctx)
    assert await remaining(harness, 5000) == 5000 - INPUT - 100  # the loser's reservation refunded


class GuardDownStore(MemoryStore):
    """Charges work; the replay guard cannot be reached."""

    async def set_if_absent(self, key: str, ttl: float) -> bool:
        raise StoreError("replay guard unreachable")


async def test_a_solution_that_cannot_be_spent_is_challenged_again_and_refunded() -> None:
    clock = FakeClock()
    store = GuardDownStore(clock)
    settings = ChallengeSettings(secret=b"s" * 32, min_difficulty=4, max_difficulty=8)
    h = Harness(FrictionStage(MemorySignalStore(clock), store, settings, clock), store)
    ctx = capped(1500, extra=POW, solution=await solved(h))
    decision = await h.stage(ctx)
    assert decision is not None and decision.status == 401  # fail closed: freshness unproven
    audit = ctx.audit["friction"]
    assert audit["pow"] == "replayed" and audit["pow_store_error"] is True
    await h.stage.settle(ctx)
    assert await remaining(h, 1500) == 1500
