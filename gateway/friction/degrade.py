"""``degrade``: edit the request body before forwarding and ask for response shaping.

Request side (both families): fallback model, ``n`` forced to 1, ``max_tokens`` capped (the
field the route uses; chat completions without one get ``max_tokens``), thinking budget capped
(Anthropic ``thinking.budget_tokens``, kept below ``max_tokens``; OpenAI ``reasoning_effort``
lowered to ``low``), logprobs/top_logprobs/logit_bias removed. Response side: ``ctx.shaping``
strips logprobs and reasoning/thinking content, whole bodies and streams, keeping streams valid for
the SDKs' accumulators (indexes renumbered) and usage counts intact; the OpenAI adapter also stops
asking the Responses API for encrypted reasoning and summaries (gateway/apis/openai.py, openai_responses.py,
gateway/apis/anthropic.py; what is stripped is listed in docs/distillation.md).
Stripping thinking from Anthropic responses means a client cannot send those blocks back in a
later tool-use turn: degraded accounts lose extended thinking with tools (documented).
"""

from __future__ import annotations

from typing import Any

from gateway.context import ApiFamily, RequestContext, Shaping
from gateway.friction.model import Degrade

_MAX_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_LOGPROB_FIELDS = ("logprobs", "top_logprobs", "logit_bias")
_LOGPROB_INCLUDE = "message.output_text.logprobs"


def apply_degrade(ctx: RequestContext, degrade: Degrade) -> list[str]:
    """Apply ``degrade`` to ``ctx``; returns what changed (for the audit record)."""
    view = ctx.request
    body = view.body
    changed: list[str] = []
    if isinstance(body, dict):
        changed = _edit_body(ctx, body, degrade)
    if degrade.strip_logprobs or degrade.strip_reasoning:
        shaping = ctx.shaping
        ctx.shaping = Shaping(shaping.strip_reasoning or degrade.strip_reasoning,
                              shaping.strip_logprobs or degrade.strip_logprobs)
        changed.append("shaping")
    if any(c != "shaping" for c in changed):
        ctx.body_modified = True
    return changed


def _edit_body(ctx: RequestContext, body: dict[str, Any], d: Degrade) -> list[str]:
    view = ctx.request
    changed: list[str] = []
    if d.fallback_model and body.get("model") != d.fallback_model:
        body["model"] = view.model = d.fallback_model
        changed.append("model")
    if d.force_n1 and isinstance(body.get("n"), int) and body["n"] > 1:
        body["n"] = view.n = 1
        changed.append("n")
    if d.strip_logprobs:
        removed = [body.pop(f) for f in _LOGPROB_FIELDS if f in body]  # a list: pop every field
        if removed:
            changed.append("logprobs")
        include = body.get("include")
        if isinstance(include, list) and _LOGPROB_INCLUDE in include:
            body["include"] = [i for i in include if i != _LOGPROB_INCLUDE]
            changed.append("logprobs")
        view.logprobs, view.top_logprobs, view.logit_bias = False, None, False
    if d.cap_max_tokens is not None:
        _cap_max_tokens(ctx, body, d.cap_max_tokens, changed)
    if d.cap_thinking_budget is not None:
        _cap_thinking(ctx, body, d.cap_thinking_budget, changed)
    return changed


def _cap_max_tokens(ctx: RequestContext, body: dict[str, Any], cap: int, changed: list[str]) -> None:
    view = ctx.request
    present = [f for f in _MAX_FIELDS if isinstance(body.get(f), int)]
    for name in present:
        if body[name] > cap:
            body[name] = cap
            changed.append(name)
    if not present and view.route in ("chat.completions", "completions", "messages"):
        body["max_tokens"] = cap
        changed.append("max_tokens")
    if view.max_tokens is None or view.max_tokens > cap:
        view.max_tokens = cap
    if view.api is ApiFamily.ANTHROPIC:
        _fit_thinking(ctx, body, None, changed)  # the budget must stay below the new max_tokens


# Efforts already at or below "low" stay as they are: a degrade lowers reasoning, and raising
# "none" (OpenAI's no-reasoning setting) to "low" would give a suspicious account more of it.
_AT_MOST_LOW = (None, "none", "minimal", "low")


def _cap_thinking(ctx: RequestContext, body: dict[str, Any], cap: int, changed: list[str]) -> None:
    view = ctx.request
    if view.api is ApiFamily.ANTHROPIC:
        _fit_thinking(ctx, body, cap, changed)
        return
    if body.get("reasoning_effort") not in _AT_MOST_LOW:
        body["reasoning_effort"] = "low"
        changed.append("reasoning_effort")
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") not in _AT_MOST_LOW:
        body["reasoning"] = {**reasoning, "effort": "low"}
        changed.append("reasoning.effort")


# Anthropic refuses a thinking budget under 1,024 tokens or not below max_tokens.
_MIN_THINKING_BUDGET = 1024


def _fit_thinking(ctx: RequestContext, body: dict[str, Any], cap: int | None, changed: list[str]) -> None:
    """Keep ``thinking.budget_tokens`` within ``cap`` and below ``max_tokens``; switch thinking off
    when no valid budget is left (a capped request must still be one the upstream accepts)."""
    thinking = body.get("thinking")
    if not (isinstance(thinking, dict) and isinstance(thinking.get("budget_tokens"), int)):
        return
    limit = thinking["budget_tokens"] if cap is None else min(cap, thinking["budget_tokens"])
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int):
        limit = min(limit, max_tokens - 1)
    if limit == thinking["budget_tokens"]:
        return
    view = ctx.request
    if limit < _MIN_THINKING_BUDGET:
        body["thinking"] = {"type": "disabled"}
        view.reasoning, view.reasoning_budget = False, None
        changed.append("thinking")
    else:
        body["thinking"] = {**thinking, "budget_tokens": limit}
        view.reasoning_budget = limit
        changed.append("thinking.budget_tokens")
