from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from gateway.client import solve_challenge
from gateway.context import ApiFamily, RequestContext, RequestView
from gateway.friction.degrade import apply_degrade
from gateway.friction.model import (
    CapTokens,
    Degrade,
    DenySpec,
    FrictionAction,
    PowChallenge,
    Reverify,
    Tarpit,
)
from gateway.policy.registry import MatchedAction
from gateway.risk.settings import ChallengeSettings
from gateway.risk.sigstore import MemorySignalStore
from gateway.stages.friction import FrictionStage
from gateway.store.memory import MemoryStore
from tests.unit.risk.helpers import FakeClock, chat_ctx


@dataclass
class Outcome:
    actions: list[MatchedAction] = field(default_factory=list)


def with_actions(ctx: RequestContext, *actions: tuple[str, FrictionAction, bool]) -> RequestContext:
    ctx.outcome = Outcome([MatchedAction(rule, "friction", value, shadow) for rule, value, shadow in actions])
    return ctx


def make_stage(clock: FakeClock) -> FrictionStage:
    return FrictionStage(MemorySignalStore(clock), MemoryStore(clock),
                         ChallengeSettings(secret=b"s" * 32, min_difficulty=4, max_difficulty=8), clock)


def test_degrade_edits_openai_body() -> None:
    ctx = chat_ctx("hi", logprobs=True, top_logprobs=5, logit_bias={"1": 2}, n=4, max_tokens=8000,
                   reasoning_effort="high")
    changed = apply_degrade(ctx, Degrade(True, True, True, 1000, 10, "small"))
    body = ctx.request.body
    assert body is not None
    assert body["model"] == "small" and body["n"] == 1 and body["max_tokens"] == 1000
    assert body["reasoning_effort"] == "low" and "logprobs" not in body and "logit_bias" not in body
    assert ctx.body_modified and ctx.shaping.strip_reasoning and ctx.shaping.strip_logprobs
    assert ctx.request.n == 1 and ctx.request.max_tokens == 1000 and "shaping" in changed


@pytest.mark.parametrize("effort", ["none", "minimal", "low"])
def test_degrade_never_raises_reasoning_effort(effort: str) -> None:
    ctx = chat_ctx("hi", reasoning_effort=effort)
    changed = apply_degrade(ctx, Degrade(cap_thinking_budget=1024))
    assert ctx.request.body is not None and ctx.request.body["reasoning_effort"] == effort
    assert "reasoning_effort" not in changed


def test_degrade_caps_anthropic_thinking_below_max_tokens() -> None:
    body = {"model": "c", "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 16000},
            "messages": [{"role": "user", "content": "x"}]}
    view = RequestView(api=ApiFamily.ANTHROPIC, route="messages", path="/v1/messages", method="POST",
                       headers={}, body=body, max_tokens=2000)
    ctx = RequestContext(request_id="r", request=view)
    apply_degrade(ctx, Degrade(cap_thinking_budget=4096))
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1999} and ctx.body_modified


async def test_shadow_is_only_recorded_and_tarpit_applies() -> None:
    stage = make_stage(FakeClock())
    ctx = with_actions(chat_ctx("x"), ("shadow-deny", FrictionAction(deny=DenySpec()), True),
                       ("slow", FrictionAction(tarpit=Tarpit(2.0, 5.0)), False))
    assert await stage(ctx) is None
    assert ctx.first_byte_delay == 2.0 and ctx.pace_tokens_per_s == 5.0
    assert ctx.audit["friction"]["would"] == [{"rule": "shadow-deny", "effects": ["deny"]}]
    assert ctx.audit["friction"]["applied"] == ["slow"]


async def test_pow_challenge_then_solution_then_replay() -> None:
    stage = make_stage(FakeClock())
    action = FrictionAction(pow=PowChallenge(6))
    decision = await stage(with_actions(chat_ctx("x"), ("pow", action, False)))
    assert decision is not None and decision.status == 401 and decision.error_type == "challenge"
    assert not decision.retryable and decision.headers["WWW-Authenticate"].startswith("Tollgate-PoW ")
    solution = solve_challenge(dict(decision.extra))
    ok = with_actions(chat_ctx("x", headers={"x-tollgate-solution": solution}), ("pow", action, False))
    assert await stage(ok) is None and ok.audit["friction"]["pow"] == "ok"
    again = with_actions(chat_ctx("x", headers={"x-tollgate-solution": solution}), ("pow", action, False))
    replayed = await stage(again)
    assert replayed is not None and again.audit["friction"]["pow"] == "replayed"


async def test_sticky_reverify_until_admin_clears() -> None:
    clock = FakeClock()
    stage = make_stage(clock)
    first = with_actions(chat_ctx("x"), ("rv", FrictionAction(reverify=Reverify("https://v.example")), False))
    decision = await stage(first)
    assert decision is not None and decision.status == 403
    assert decision.extra["challenge"]["kind"] == "reverify"
    later = chat_ctx("x")  # the rule no longer matches, the risk stage saw friction state
    later.risk.signals["friction_active"] = 1.0
    assert (await stage(with_actions(later))) is not None
    assert await stage.state.clear_reverify("acct1") == ["rv"]
    cleared = chat_ctx("x")
    cleared.risk.signals["friction_active"] = 1.0
    assert await stage(with_actions(cleared)) is None


async def test_sticky_state_expires_by_ttl() -> None:
    clock = FakeClock()
    stage = make_stage(clock)
    await stage(with_actions(chat_ctx("x"), ("slow", FrictionAction(tarpit=Tarpit(1.0), ttl=60.0), False)))
    assert "slow" in await stage.state.load("acct1")
    clock.now += 61
    assert await stage.state.load("acct1") == {}


async def test_cap_tokens_budget() -> None:
    stage = make_stage(FakeClock())
    action = FrictionAction(cap_tokens=CapTokens(limit=1500, per=3600.0))
    ctx = with_actions(chat_ctx("x", max_tokens=1000), ("cap", action, False))
    assert await stage(ctx) is None
    ctx.usage.output_tokens = 10
    await stage.settle(ctx)  # reconciled down to what was used
    assert await stage(with_actions(chat_ctx("x", max_tokens=1000), ("cap", action, False))) is None
    denied = await stage(with_actions(chat_ctx("x", max_tokens=1000), ("cap", action, False)))
    assert denied is not None and denied.status == 429 and "Retry-After" in denied.headers
