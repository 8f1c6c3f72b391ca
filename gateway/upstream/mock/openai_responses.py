"""OpenAI Responses API (``POST /v1/responses``): the response object and its typed event stream.

Event order and fields follow ``openai.types.responses`` (``ResponseCreatedEvent`` ...
``ResponseCompletedEvent``); a ``max_output_tokens`` cut ends with ``response.incomplete``.
"""

from __future__ import annotations

from typing import Any

from .call import BadRequest, Call
from .text import Plan, count_input_tokens, logprob, plan_output
from .wire import Frame, sse_event


def _reasoning_effort(body: dict[str, Any]) -> str | None:
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") != "none":
        effort = reasoning.get("effort")
        return effort if isinstance(effort, str) else "medium"
    return None


def responses_plan(call: Call) -> Plan:
    if "input" not in call.body:
        raise BadRequest("'input' is required")
    return plan_output(
        input_tokens=count_input_tokens(call.body, ("input", "instructions")),
        chunks=call.chunks,
        limit=call.opt_int("max_output_tokens"),
        reasoning=call.chunks if _reasoning_effort(call.body) else 0,
    )


def _top_logprobs(call: Call) -> int | None:
    include = call.body.get("include")
    top = call.opt_int("top_logprobs", low=0, high=20)
    wanted = isinstance(include, list) and "message.output_text.logprobs" in include
    return top or 0 if (wanted or top is not None) else None


def _token_logprobs(tokens: tuple[str, ...], top: int | None, start: int = 0) -> list[dict[str, Any]]:
    if top is None:
        return []
    return [
        {
            "token": t,
            "logprob": logprob(start + i),
            "top_logprobs": [{"token": t, "logprob": logprob(start + i)}][: max(top, 0)],
        }
        for i, t in enumerate(tokens)
    ]


def _usage(plan: Plan) -> dict[str, Any]:
    return {
        "input_tokens": plan.input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": plan.output_tokens,
        "output_tokens_details": {"reasoning_tokens": plan.reasoning_tokens},
        "total_tokens": plan.input_tokens + plan.output_tokens,
    }


class _Builder:
    """Holds the ids and fixed fields shared by the non-streamed body and every stream event."""

    def __init__(self, call: Call, plan: Plan) -> None:
        self.call, self.plan = call, plan
        self.top = _top_logprobs(call)
        self.resp_id = f"resp_mock{call.seq}"
        self.msg_id = f"msg_mock{call.seq}"
        self.rs_id = f"rs_mock{call.seq}"
        self.choice = plan.choices[0]
        self.status = "incomplete" if plan.truncated else "completed"

    def response(self, status: str, output: list[dict[str, Any]], final: bool) -> dict[str, Any]:
        body = self.call.body
        effort = _reasoning_effort(body)
        return {
            "id": self.resp_id,
            "object": "response",
            "created_at": self.call.created,
            "status": status,
            "completed_at": self.call.created if final and status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if final and self.plan.truncated else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.call.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": effort, "summary": None},
            "store": bool(body.get("store", True)),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": _usage(self.plan) if final else None,
            "user": None,
            "metadata": body.get("metadata") or {},
        }

    def reasoning_item(self) -> dict[str, Any]:
        return {"id": self.rs_id, "type": "reasoning", "summary": []}

    def text_part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs()}

    def logprobs(self) -> list[dict[str, Any]]:
        return _token_logprobs(self.choice.content, self.top)

    def message(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.msg_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def final_output(self) -> list[dict[str, Any]]:
        output = [self.reasoning_item()] if self.choice.reasoning else []
        return output + [self.message(self.status, [self.text_part(self.choice.text)])]


def responses_body(call: Call, plan: Plan) -> dict[str, Any]:
    b = _Builder(call, plan)
    return b.response(b.status, b.final_output(), final=True)


def responses_stream(call: Call, plan: Plan) -> list[Frame]:
    b = _Builder(call, plan)
    frames: list[Frame] = []
    seq = iter(range(1 << 30))

    def emit(event: str, paced: bool = False, **fields: Any) -> None:
        frames.append((sse_event(event, {"type": event, "sequence_number": next(seq), **fields}), paced))

    emit("response.created", response=b.response("in_progress", [], final=False))
    emit("response.in_progress", response=b.response("in_progress", [], final=False))
    out = 0
    if b.choice.reasoning:
        emit("response.output_item.added", output_index=0, item=b.reasoning_item())
        # Reasoning text is not streamed by this API, but it takes time: an empty paced frame
        # per hidden token keeps the stream as slow as a reasoning model's.
        for _ in b.choice.reasoning[:-1]:
            frames.append((b"", True))
        emit("response.output_item.done", paced=True, output_index=0, item=b.reasoning_item())
        out = 1
    ids: dict[str, Any] = {"item_id": b.msg_id, "output_index": out, "content_index": 0}
    emit("response.output_item.added", output_index=out, item=b.message("in_progress", []))
    emit(
        "response.content_part.added",
        item_id=b.msg_id,
        output_index=out,
        content_index=0,
        part=b.text_part(""),
    )
    for i, token in enumerate(b.choice.content):
        emit(
            "response.output_text.delta",
            paced=True,
            delta=token,
            logprobs=_token_logprobs((token,), b.top, i),
            **ids,
        )
    text = b.choice.text
    emit("response.output_text.done", text=text, logprobs=b.logprobs(), **ids)
    emit(
        "response.content_part.done",
        item_id=b.msg_id,
        output_index=out,
        content_index=0,
        part=b.text_part(text),
    )
    emit("response.output_item.done", output_index=out, item=b.message(b.status, [b.text_part(text)]))
    final = "response.incomplete" if plan.truncated else "response.completed"
    emit(final, response=b.response(b.status, b.final_output(), final=True))
    return frames
