"""Capping max_tokens keeps an Anthropic thinking budget valid, or switches thinking off."""

from __future__ import annotations

from typing import Any

from gateway.context import ApiFamily, RequestContext, RequestView
from gateway.friction.degrade import _cap_max_tokens


def ctx_for(body: dict[str, Any]) -> RequestContext:
    view = RequestView(ApiFamily.ANTHROPIC, "messages", "/v1/messages", "POST", {}, body=body,
                       max_tokens=body.get("max_tokens"), reasoning=True,
                       reasoning_budget=body["thinking"]["budget_tokens"])
    return RequestContext("r", view)


def test_budget_is_lowered_below_the_new_max_tokens() -> None:
    body = {"max_tokens": 8000, "thinking": {"type": "enabled", "budget_tokens": 6000}}
    ctx = ctx_for(body)
    changed: list[str] = []
    _cap_max_tokens(ctx, body, 4000, changed)
    assert body == {"max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 3999}}
    assert ctx.request.reasoning_budget == 3999 and changed == ["max_tokens", "thinking.budget_tokens"]


def test_thinking_is_switched_off_when_no_valid_budget_is_left() -> None:
    body = {"max_tokens": 8000, "thinking": {"type": "enabled", "budget_tokens": 2048}}
    ctx = ctx_for(body)
    changed: list[str] = []
    _cap_max_tokens(ctx, body, 512, changed)
    assert body == {"max_tokens": 512, "thinking": {"type": "disabled"}}
    assert ctx.request.reasoning is False and changed == ["max_tokens", "thinking"]
