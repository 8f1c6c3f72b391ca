from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from gateway.client import solve_challenge
from gateway.context import ApiFamily, RequestContext, RequestView
from gateway.friction.action import MAX_DELAY, MIN_RATE
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
from gateway.risk.sigstore import BatchResult, MemorySignalStore, Op, StatePut
from gateway.stages.friction import FrictionStage
from gateway.store.base import StoreError
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
    assert ctx.audit["friction"]["applied"] == [{"rule": "slow", "effects": ["tarpit"]}]


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
    event = await stage.state.clear("acct1", "analyst", reverify_only=True)
    assert list(event["cleared"]) == ["rv"]
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


def sticky_ctx(**kw: object) -> RequestContext:
    """A later request of acct1: no rule matches, the risk stage saw friction state."""
    ctx = chat_ctx("x", **kw)  # type: ignore[arg-type]
    ctx.risk.signals["friction_active"] = 1.0
    return with_actions(ctx)


async def test_audit_names_every_rule_and_effect_applied_would_or_sticky() -> None:
    stage = make_stage(FakeClock())
    await stage.state.save("acct1", "old-slow", FrictionAction(tarpit=Tarpit(1.0), ttl=600.0))
    ctx = chat_ctx("x", max_tokens=100)
    ctx.risk.signals["friction_active"] = 1.0
    ctx.risk.score = 0.8
    with_actions(ctx, ("shadow-rv", FrictionAction(reverify=Reverify("https://v.example"), ttl=60.0), True),
                 ("soft", FrictionAction(degrade=Degrade(strip_logprobs=True), ttl=120.0), False))
    assert await stage(ctx) is None
    audit = ctx.audit["friction"]
    assert audit["applied"] == [{"rule": "soft", "effects": ["degrade"]},
                                {"rule": "old-slow", "effects": ["tarpit"], "sticky": True}]
    assert audit["would"] == [{"rule": "shadow-rv", "effects": ["reverify"], "ttl": 60.0}]
    assert audit["saved"] == [{"rule": "soft", "expires": round(FakeClock().now + 120)}]
    assert audit["risk"]["score"] == 0.8 and "degrade" in audit and audit["tarpit"]["delay"] == 1.0
    assert "effect" not in audit  # nothing stopped the request
    saved = (await stage.state.listing("acct1"))["friction"]
    assert set(saved) == {"old-slow", "soft"} and saved["soft"]["request_id"] == "rid"
    assert saved["soft"]["risk"]["score"] == 0.8
    assert "shadow-rv" not in saved  # a shadow rule is never made sticky


@pytest.mark.parametrize("rules, status, effect, rule_id", [
    ([("pow", FrictionAction(pow=PowChallenge(6))), ("rv", FrictionAction(reverify=Reverify("https://v.x"))),
      ("no", FrictionAction(deny=DenySpec(451, "no")))], 451, "deny", "no"),
    ([("pow", FrictionAction(pow=PowChallenge(6))), ("rv", FrictionAction(reverify=Reverify("https://v.x")))],
     403, "reverify", "rv"),
    ([("slow", FrictionAction(tarpit=Tarpit(5.0), degrade=Degrade(force_n1=True))),
      ("pow", FrictionAction(pow=PowChallenge(6)))], 401, "pow", None),
])
async def test_the_strongest_effect_wins(rules: list[tuple[str, FrictionAction]], status: int, effect: str,
                                         rule_id: str | None) -> None:
    stage = make_stage(FakeClock())
    ctx = with_actions(chat_ctx("x", n=3), *((r, a, False) for r, a in rules))
    decision = await stage(ctx)
    assert decision is not None and decision.status == status and decision.rule_id == rule_id
    assert ctx.audit["friction"]["effect"] == effect
    assert ctx.first_byte_delay == 0.0 and ctx.request.n == 3  # weaker effects not applied


@pytest.mark.parametrize("fixed, score, required", [(12, 1.0, 12), (4, 1.0, 8), (6, 0.5, 6), (None, 0.75, 6)])
async def test_pow_difficulty_is_the_highest_asked(fixed: int | None, score: float, required: int) -> None:
    stage = make_stage(FakeClock())  # from_risk: 4 bits at score 0.5 up to 8 at 1.0
    ctx = chat_ctx("x")
    ctx.risk.score = score
    actions = [("risk", FrictionAction(pow=PowChallenge()), False)]
    if fixed is not None:
        actions.append(("fixed", FrictionAction(pow=PowChallenge(fixed)), False))
    decision = await stage(with_actions(ctx, *actions))
    assert decision is not None and decision.extra["challenge"]["difficulty"] == required
    assert ctx.audit["friction"]["difficulty"] == required and ctx.audit["friction"]["pow"] == "issued"


async def test_sticky_state_combines_in_rule_id_order_whatever_the_store_order() -> None:
    for order in (["b-deny", "a-deny"], ["a-deny", "b-deny"]):
        stage = make_stage(FakeClock())
        for rule in order:
            status = 451 if rule == "a-deny" else 429
            await stage.state.save("acct1", rule, FrictionAction(deny=DenySpec(status, rule), ttl=60.0))
        decision = await stage(sticky_ctx())
        assert decision is not None and (decision.status, decision.rule_id) == (451, "a-deny")


async def test_a_matching_rule_comes_before_sticky_state() -> None:
    stage = make_stage(FakeClock())
    await stage.state.save("acct1", "a-sticky", FrictionAction(deny=DenySpec(451, "sticky"), ttl=60.0))
    ctx = sticky_ctx()
    with_actions(ctx, ("z-now", FrictionAction(deny=DenySpec(403, "now")), False))
    decision = await stage(ctx)
    assert decision is not None and decision.rule_id == "z-now" and decision.status == 403


async def test_a_pow_solution_is_bound_to_the_principal_that_was_challenged() -> None:
    stage = make_stage(FakeClock())
    action = FrictionAction(pow=PowChallenge(6))
    decision = await stage(with_actions(chat_ctx("x", account="acct-a"), ("pow", action, False)))
    assert decision is not None
    solution = solve_challenge(dict(decision.extra))
    thief = with_actions(chat_ctx("x", account="acct-b", headers={"x-tollgate-solution": solution}),
                         ("pow", action, False))
    assert await stage(thief) is not None and thief.audit["friction"]["pow"] == "bad_mac"
    owner = with_actions(chat_ctx("x", account="acct-a", headers={"x-tollgate-solution": solution}),
                         ("pow", action, False))
    assert await stage(owner) is None  # the failed attempt did not burn it


async def test_a_solution_below_the_difficulty_now_required_is_too_easy() -> None:
    stage = make_stage(FakeClock())
    action = FrictionAction(pow=PowChallenge())  # from_risk
    calm = chat_ctx("x")
    calm.risk.score = 0.5
    decision = await stage(with_actions(calm, ("pow", action, False)))
    assert decision is not None and decision.extra["challenge"]["difficulty"] == 4
    solution = solve_challenge(dict(decision.extra))
    risen = with_actions(chat_ctx("x", headers={"x-tollgate-solution": solution}), ("pow", action, False))
    risen.risk.score = 1.0
    again = await stage(risen)
    assert again is not None and again.extra["challenge"]["difficulty"] == 8
    assert risen.audit["friction"]["pow"] == "too_easy" and risen.audit["friction"]["effect"] == "pow"


async def test_unreadable_friction_state_fails_open_and_is_audited() -> None:
    class Down(MemorySignalStore):
        async def batch(self, ops: Sequence[Op]) -> BatchResult:
            raise StoreError("down")

    stage = FrictionStage(Down(), MemoryStore(FakeClock()), ChallengeSettings(secret=b"s" * 32))
    ctx = sticky_ctx()
    assert await stage(ctx) is None and ctx.audit["friction"]["state_error"] == "load"
    saving = with_actions(chat_ctx("x"), ("slow", FrictionAction(tarpit=Tarpit(1.0), ttl=60.0), False))
    assert await stage(saving) is None
    assert saving.audit["friction"]["state_error"] == "save" and saving.first_byte_delay == 1.0


async def test_a_stored_tarpit_past_the_bounds_is_clamped() -> None:
    clock = FakeClock()
    signals = MemorySignalStore(clock)
    stage = FrictionStage(signals, MemoryStore(clock), ChallengeSettings(secret=b"s" * 32), clock)
    record = {"action": {"tarpit": {"first_byte_delay": 1e9, "tokens_per_second": 1e-9}}, "rule": "old"}
    await signals.batch([StatePut("fr:acct1", "old", json.dumps(record), 60.0)])  # saved by hand
    ctx = sticky_ctx()
    assert await stage(ctx) is None
    assert ctx.first_byte_delay == MAX_DELAY and ctx.pace_tokens_per_s == MIN_RATE
