"""Anthropic-shaped bodies and streams: ``/v1/messages`` and ``/v1/messages/count_tokens``.

Shapes follow ``anthropic.types`` (``Message``, ``RawMessageStreamEvent``). With ``thinking``
enabled a thinking block (index 0, ``thinking_delta`` then ``signature_delta``) precedes the text
block (index 1); thinking tokens count as output tokens, as the real API bills them.
"""

from __future__ import annotations

from typing import Any

from .call import BadRequest, Call
from .text import Plan, count_input_tokens, plan_output, signature
from .wire import Frame, sse_event

_INPUT_FIELDS = ("system", "messages")


def _thinking_budget(call: Call) -> int | None:
    thinking = call.body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return None
    budget = thinking.get("budget_tokens")
    if thinking.get("type") == "enabled" and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
    ):
        raise BadRequest("thinking.budget_tokens: must be a positive integer")
    return budget if isinstance(budget, int) else call.chunks


def count_tokens_body(call: Call) -> dict[str, Any]:
    call.require_list("messages")
    return {"input_tokens": count_input_tokens(call.body, _INPUT_FIELDS)}


def messages_plan(call: Call) -> Plan:
    call.require_list("messages")
    max_tokens = call.opt_int("max_tokens")
    if max_tokens is None:
        raise BadRequest("max_tokens: Field required")
    budget = _thinking_budget(call)
    if budget is not None and budget >= max_tokens and call.body["thinking"].get("type") == "enabled":
        raise BadRequest("`max_tokens` must be greater than `thinking.budget_tokens`")
    return plan_output(
        input_tokens=count_input_tokens(call.body, _INPUT_FIELDS),
        chunks=call.chunks,
        limit=max_tokens,
        reasoning=0 if budget is None else min(call.chunks, budget),
    )


def _usage(plan: Plan, output_tokens: int, tier: bool = True) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": plan.input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    if tier:  # Message.usage has it; the cumulative MessageDeltaUsage does not
        usage["service_tier"] = "standard"
    return usage


def _message(
    call: Call, content: list[dict[str, Any]], stop: str | None, usage: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": f"msg_mock{call.seq}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage,
    }


def _stop_reason(plan: Plan) -> str:
    return "max_tokens" if plan.truncated else "end_turn"


def messages_body(call: Call, plan: Plan) -> dict[str, Any]:
    choice = plan.choices[0]
    content: list[dict[str, Any]] = []
    if choice.reasoning:
        text = choice.reasoning_text
        content.append({"type": "thinking", "thinking": text, "signature": signature(text)})
    if choice.content or not content:
        content.append({"type": "text", "text": choice.text})
    return _message(call, content, _stop_reason(plan), _usage(plan, plan.output_tokens))


def messages_stream(call: Call, plan: Plan, ping: bool) -> list[Frame]:
    choice = plan.choices[0]
    # message_start reports output_tokens: 1 like the real API; message_delta carries the total.
    frames: list[Frame] = [
        (
            sse_event(
                "message_start",
                {"type": "message_start", "message": _message(call, [], None, _usage(plan, 1))},
            ),
            False,
        )
    ]
    if ping:
        frames.append((sse_event("ping", {"type": "ping"}), False))

    def block(index: int, start: dict[str, Any], deltas: list[tuple[dict[str, Any], bool]]) -> None:
        frames.append(
            (
                sse_event(
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": start},
                ),
                False,
            )
        )
        for delta, paced in deltas:
            frames.append(
                (
                    sse_event(
                        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
                    ),
                    paced,
                )
            )
        frames.append(
            (sse_event("content_block_stop", {"type": "content_block_stop", "index": index}), False)
        )

    index = 0
    if choice.reasoning:
        thinking = [({"type": "thinking_delta", "thinking": t}, True) for t in choice.reasoning]
        thinking.append(({"type": "signature_delta", "signature": signature(choice.reasoning_text)}, False))
        block(index, {"type": "thinking", "thinking": "", "signature": ""}, thinking)
        index += 1
    if choice.content or index == 0:
        block(
            index,
            {"type": "text", "text": ""},
            [({"type": "text_delta", "text": t}, True) for t in choice.content],
        )
    delta = {"type": "message_delta", "delta": {"stop_reason": _stop_reason(plan), "stop_sequence": None}}
    delta["usage"] = _usage(plan, plan.output_tokens, tier=False)
    frames.append((sse_event("message_delta", delta), False))
    frames.append((sse_event("message_stop", {"type": "message_stop"}), False))
    return frames


MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")


def models_body() -> dict[str, Any]:
    """``GET /v1/models`` in the anthropic shape (same path as OpenAI's, told apart by header)."""
    data = [
        {
            "type": "model",
            "id": m,
            "display_name": m.replace("-", " ").title(),
            "created_at": "2025-01-01T00:00:00Z",
        }
        for m in MODELS
    ]
    return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
