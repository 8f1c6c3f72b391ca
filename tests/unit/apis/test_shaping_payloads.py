"""Realistic provider payloads for the shaping tests, shaped after the providers' docs, and a check
that each one is valid for the official SDK types (so the tests feed what a provider really sends).

Every piece of content a degrade must hide carries a marker from ``SECRETS``; the visible answer is
``VISIBLE``. ``assert_clean`` is the single leak check used by the unit and functional tests.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import TypeAdapter

REASONING = "SECRET-THOUGHT"
SUMMARY = "SECRET-SUMMARY"
SIGNATURE = "SECRET-SIGNATURE-EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
ENCRYPTED = "gAAAAB-SECRET-ENCRYPTED-content"
REDACTED = "SECRET-REDACTED-EmwKAhgBEgy3va3pzix"
LOGPROB = -0.31415926
ALTERNATIVE = "SECRET-ALTERNATIVE"
SECRETS = (REASONING, SUMMARY, SIGNATURE, ENCRYPTED, REDACTED, str(LOGPROB)[1:], ALTERNATIVE)
TOKENS = ("Four", " is", " the", " answer", ".")
VISIBLE = "".join(TOKENS)
OUTPUT_TOKENS = 40  # what every upstream reports: reasoning included
INPUT_TOKENS = 12


def assert_clean(blob: bytes | str) -> None:
    """No marker of hidden content anywhere in what reached the client."""
    text = blob if isinstance(blob, str) else blob.decode()
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"leaked {leaked}: {text[:2000]}"


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def spaced(obj: Any) -> str:
    return json.dumps(obj)  # ", " and ": ", as the docs' examples and many compatible servers


def sse(events: list[tuple[str | None, dict[str, Any]]], dumps: Any = compact, done: bool = False) -> bytes:
    """An SSE body: ``(event name or None, payload)`` pairs, blank-line terminated."""
    out = []
    for name, payload in events:
        head = f"event: {name}\n" if name else ""
        out.append(f"{head}data: {dumps(payload)}\n\n")
    if done:
        out.append("data: [DONE]\n\n")
    return "".join(out).encode()


# -- OpenAI chat completions ------------------------------------------------------------------
def chat_logprobs(token: str) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": token,
                "logprob": LOGPROB,
                "bytes": list(token.encode()),
                "top_logprobs": [{"token": ALTERNATIVE, "logprob": LOGPROB, "bytes": None}],
            }
        ],
        "refusal": None,
    }


CHAT_USAGE = {
    "prompt_tokens": INPUT_TOKENS,
    "completion_tokens": OUTPUT_TOKENS,
    "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
    "completion_tokens_details": {"reasoning_tokens": OUTPUT_TOKENS - len(TOKENS)},
}


def chat_body(n: int = 2) -> dict[str, Any]:
    """A non-streamed chat completion from a reasoning server (DeepSeek / vLLM / OpenRouter
    fields side by side) with logprobs, ``n`` choices."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "deepseek-reasoner",
        "choices": [
            {
                "index": i,
                "message": {
                    "role": "assistant",
                    "content": VISIBLE,
                    "refusal": None,
                    "reasoning_content": REASONING,
                    "reasoning": REASONING,
                    "reasoning_details": [
                        {"type": "reasoning.text", "text": REASONING, "signature": SIGNATURE}
                    ],
                },
                "logprobs": {"content": chat_logprobs(VISIBLE)["content"], "refusal": None},
                "finish_reason": "stop",
            }
            for i in range(n)
        ],
        "usage": CHAT_USAGE,
    }


def chat_chunks(n: int = 2, reasoning_key: str = "reasoning_content") -> list[dict[str, Any]]:
    """A streamed chat completion: role, reasoning deltas (DeepSeek shape: ``content: null``),
    content deltas with logprobs, finish, usage chunk; ``n`` choices interleaved."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-reasoner"}

    def chunk(i: int, delta: dict[str, Any], lp: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}],
                "usage": None}

    chunks = [chunk(i, {"role": "assistant", "content": None, reasoning_key: ""}) for i in range(n)]
    for word in (REASONING, " and", f" {REASONING}"):
        for i in range(n):
            chunks.append(chunk(i, {"content": None, reasoning_key: word},
                                {"content": chat_logprobs(word)["content"], "refusal": None}))
    for token in TOKENS:
        for i in range(n):
            chunks.append(chunk(i, {"content": token, reasoning_key: None}, chat_logprobs(token)))
    chunks.extend(chunk(i, {}, finish="stop") for i in range(n))
    chunks.append({**base, "choices": [], "usage": CHAT_USAGE})
    return chunks


# -- OpenAI Responses API ----------------------------------------------------------------------
RESPONSES_USAGE = {
    "input_tokens": INPUT_TOKENS,
    "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    "output_tokens": OUTPUT_TOKENS,
    "output_tokens_details": {"reasoning_tokens": OUTPUT_TOKENS - len(TOKENS)},
    "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
}


def response_object(status: str, output: list[dict[str, Any]], final: bool) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": "o4-mini",
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_logprobs": 2,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": RESPONSES_USAGE if final else None,
        "metadata": {},
    }


def reasoning_item(done: bool, with_text: bool = False) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": "rs_1",
        "type": "reasoning",
        "summary": [{"type": "summary_text", "text": SUMMARY}] if done else [],
        "encrypted_content": ENCRYPTED if done else None,
    }
    if with_text:  # gpt-oss on vLLM & co: the raw reasoning text as content parts
        item["content"] = [{"type": "reasoning_text", "text": REASONING}] if done else []
    return item


def text_part(text: str, logprobs: bool = True) -> dict[str, Any]:
    lp = [{"token": t, "logprob": LOGPROB, "bytes": list(t.encode()),
           "top_logprobs": [{"token": ALTERNATIVE, "logprob": LOGPROB, "bytes": []}]} for t in TOKENS]
    return {"type": "output_text", "text": text, "annotations": [],
            "logprobs": lp if logprobs and text else []}


def message_item(done: bool) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [text_part(VISIBLE)] if done else [],
    }


def responses_body() -> dict[str, Any]:
    return response_object("completed", [reasoning_item(True, True), message_item(True)], final=True)


def responses_events(with_text: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """The documented event sequence of a reasoning model with summaries, encrypted reasoning and
    ``message.output_text.logprobs`` (``with_text``: reasoning text streamed too, gpt-oss style)."""
    events: list[tuple[str, dict[str, Any]]] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append((kind, {"type": kind, "sequence_number": len(events), **fields}))

    rs = {"item_id": "rs_1", "output_index": 0}
    emit("response.created", response=response_object("in_progress", [], final=False))
    emit("response.in_progress", response=response_object("in_progress", [], final=False))
    emit("response.output_item.added", output_index=0, item=reasoning_item(False, with_text))
    if with_text:
        emit("response.content_part.added", **rs, content_index=0,
             part={"type": "reasoning_text", "text": ""})
        emit("response.reasoning_text.delta", **rs, content_index=0, delta=REASONING)
        emit("response.reasoning_text.done", **rs, content_index=0, text=REASONING)
        emit("response.content_part.done", **rs, content_index=0,
             part={"type": "reasoning_text", "text": REASONING})
    emit("response.reasoning_summary_part.added", **rs, summary_index=0,
         part={"type": "summary_text", "text": ""})
    emit("response.reasoning_summary_text.delta", **rs, summary_index=0, delta=SUMMARY)
    emit("response.reasoning_summary_text.done", **rs, summary_index=0, text=SUMMARY)
    emit("response.reasoning_summary_part.done", **rs, summary_index=0,
         part={"type": "summary_text", "text": SUMMARY})
    emit("response.output_item.done", output_index=0, item=reasoning_item(True, with_text))
    ids = {"item_id": "msg_1", "output_index": 1, "content_index": 0}
    emit("response.output_item.added", output_index=1, item=message_item(False))
    emit("response.content_part.added", **ids, part=text_part(""))
    for token in TOKENS:
        lp = [{"token": token, "logprob": LOGPROB,
               "top_logprobs": [{"token": ALTERNATIVE, "logprob": LOGPROB}]}]
        emit("response.output_text.delta", **ids, delta=token, logprobs=lp)
    emit("response.output_text.done", **ids, text=VISIBLE, logprobs=text_part(VISIBLE)["logprobs"])
    emit("response.content_part.done", **ids, part=text_part(VISIBLE))
    emit("response.output_item.done", output_index=1, item=message_item(True))
    emit("response.completed", response=response_object(
        "completed", [reasoning_item(True, with_text), message_item(True)], final=True))
    return events


# -- Anthropic messages ------------------------------------------------------------------------
ANTHROPIC_USAGE = {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS,
                   "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def _message(content: list[dict[str, Any]], stop: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}


TOOL_USE = {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}


def messages_body() -> dict[str, Any]:
    """Extended thinking with a redacted block and interleaved thinking before a tool call."""
    return _message(
        [
            {"type": "thinking", "thinking": REASONING, "signature": SIGNATURE},
            {"type": "redacted_thinking", "data": REDACTED},
            {"type": "text", "text": VISIBLE},
            {"type": "thinking", "thinking": REASONING, "signature": SIGNATURE},
            TOOL_USE,
        ],
        "tool_use",
        ANTHROPIC_USAGE,
    )


def messages_events() -> list[tuple[str, dict[str, Any]]]:
    """The documented streaming shape: thinking (deltas + signature_delta), redacted_thinking
    (start/stop only), text, interleaved thinking, tool_use (input_json_delta), pings."""
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": _message(
            [], None, {**ANTHROPIC_USAGE, "output_tokens": 1})}),
        ("ping", {"type": "ping"}),
    ]

    def block(index: int, start: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        events.append(("content_block_start",
                       {"type": "content_block_start", "index": index, "content_block": start}))
        for delta in deltas:
            events.append(("content_block_delta",
                           {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))

    thinking = [
        {"type": "thinking_delta", "thinking": REASONING},
        {"type": "thinking_delta", "thinking": " more"},
        {"type": "signature_delta", "signature": SIGNATURE},
    ]
    block(0, {"type": "thinking", "thinking": "", "signature": ""}, thinking)
    block(1, {"type": "redacted_thinking", "data": REDACTED}, [])
    block(2, {"type": "text", "text": ""}, [{"type": "text_delta", "text": t} for t in TOKENS])
    events.append(("ping", {"type": "ping"}))
    block(3, {"type": "thinking", "thinking": "", "signature": ""}, thinking)
    block(4, {**TOOL_USE, "input": {}}, [{"type": "input_json_delta", "partial_json": '{"city": '},
                                         {"type": "input_json_delta", "partial_json": '"Paris"}'}])
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                                     "usage": {"output_tokens": OUTPUT_TOKENS}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


# -- the payloads are what the SDKs expect -----------------------------------------------------
def test_openai_payloads_are_valid_sdk_types() -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent

    ChatCompletion.model_validate(chat_body())
    for chunk in chat_chunks():
        ChatCompletionChunk.model_validate(chunk)
    Response.model_validate(responses_body())
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for with_text in (False, True):
        for kind, payload in responses_events(with_text):
            assert adapter.validate_python(payload).type == kind


@pytest.mark.parametrize("events", [messages_events()])
def test_anthropic_payloads_are_valid_sdk_types(events: list[tuple[str, dict[str, Any]]]) -> None:
    from anthropic.types import Message, RawMessageStreamEvent

    Message.model_validate(messages_body())
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    for kind, payload in events:
        if kind != "ping":
            adapter.validate_python(payload)
