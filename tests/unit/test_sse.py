"""SSE framing and per-API stream handling on raw bytes, including awkward chunk boundaries."""

from __future__ import annotations

import json

import pytest
from openai.types.responses import ResponseErrorEvent

from gateway.apis.anthropic import ROUTES as ANTHROPIC_ROUTES
from gateway.apis.anthropic import MessagesStream
from gateway.apis.base import RouteSpec
from gateway.apis.openai import ROUTES as OPENAI_ROUTES
from gateway.apis.openai import ChatStream
from gateway.apis.sse import SseOverflow, SseSplitter, event_data, event_name
from gateway.context import NO_SHAPING, Shaping, Usage
from gateway.errors import stream_error_event
from gateway.stages.draining import SHUTTING_DOWN


def chat_chunk(
    content: str | None = None, usage: dict[str, int] | None = None, choices: bool = True
) -> bytes:
    body: dict[str, object] = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}] if choices else [],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def test_splitter_reassembles_events_across_any_chunking() -> None:
    stream = b"event: a\ndata: 1\n\ndata: 2\r\n\r\nevent: b\ndata: x\ndata: y\n\n"
    for size in range(1, len(stream) + 1):
        splitter = SseSplitter()
        events: list[bytes] = []
        for i in range(0, len(stream), size):
            events.extend(splitter.feed(stream[i : i + size]))
        assert events == [b"event: a\ndata: 1", b"data: 2", b"event: b\ndata: x\ndata: y"], size
        assert not splitter.pending


def test_event_fields() -> None:
    assert event_name(b"event: message_start\ndata: {}") == b"message_start"
    assert event_name(b"data: {}") is None
    assert event_data(b'data: {"a":1}') == b'{"a":1}'
    assert event_data(b"event: x\ndata: a\ndata:b") == b"a\nb"


def test_splitter_bounds_a_runaway_event() -> None:
    splitter = SseSplitter(max_event_bytes=1024)
    with pytest.raises(SseOverflow):
        splitter.feed(b"data: " + b"x" * 2048)


def test_chat_stream_hides_injected_usage_and_accounts_it() -> None:
    usage = Usage()
    handler = ChatStream(usage, NO_SHAPING, hide_usage=True)
    raw_events = [
        chat_chunk("a")[:-2],
        chat_chunk("b")[:-2],
        chat_chunk(usage={"prompt_tokens": 7, "completion_tokens": 2}, choices=False)[:-2],
        b"data: [DONE]",
    ]
    sent = [handler.on_event(e) for e in raw_events]
    handler.finish()
    assert sent[0] is raw_events[0] and sent[1] is raw_events[1]
    assert sent[2] is None and sent[3] == b"data: [DONE]"
    assert (usage.input_tokens, usage.output_tokens, usage.complete) == (7, 2, True)


def test_chat_stream_cut_short_charges_what_was_seen() -> None:
    usage = Usage()
    handler = ChatStream(usage, NO_SHAPING, hide_usage=True)
    for text in "abc":
        handler.on_event(chat_chunk(text)[:-2])
    handler.finish()
    assert usage.output_tokens == 3 and not usage.complete


def test_chat_stream_strips_reasoning_and_logprobs() -> None:
    handler = ChatStream(Usage(), Shaping(strip_reasoning=True, strip_logprobs=True), hide_usage=False)
    reasoning_only = (
        b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"hmm"},"finish_reason":null}]}'
    )
    assert handler.on_event(reasoning_only) is None
    with_logprobs = (
        b'data: {"choices":[{"index":0,"delta":{"content":"hi"},'
        b'"logprobs":{"content":[{"token":"hi","logprob":-0.1}]},"finish_reason":null}]}'
    )
    out = handler.on_event(with_logprobs)
    assert out is not None
    chunk = json.loads(event_data(out))
    assert chunk["choices"][0]["logprobs"] is None and chunk["choices"][0]["delta"]["content"] == "hi"


def anthropic_event(name: str, payload: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}".encode()


def test_messages_stream_drops_thinking_and_renumbers_blocks() -> None:
    usage = Usage()
    handler = MessagesStream(usage, Shaping(strip_reasoning=True))
    events = [
        anthropic_event(
            "message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 5}}}
        ),
        anthropic_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        anthropic_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "x"}},
        ),
        anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        anthropic_event(
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        anthropic_event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "hi"}},
        ),
        anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 1}),
        anthropic_event(
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
        ),
    ]
    sent = [handler.on_event(e) for e in events]
    kept = [json.loads(event_data(s)) for s in sent if s is not None]
    blocks = [k for k in kept if k["type"].startswith("content_block")]
    assert [b["index"] for b in blocks] == [0, 0, 0]
    assert all(b.get("content_block", {}).get("type") != "thinking" for b in blocks)
    assert (usage.input_tokens, usage.output_tokens, usage.complete) == (5, 9, True)


def test_whole_chunks_without_usage_take_the_fast_path() -> None:
    usage = Usage()
    handler = ChatStream(usage, NO_SHAPING, hide_usage=True)
    assert handler.on_chunk(chat_chunk("a") + chat_chunk("b"))
    assert not handler.on_chunk(chat_chunk(usage={"prompt_tokens": 1, "completion_tokens": 2}, choices=False))
    assert not ChatStream(Usage(), Shaping(strip_logprobs=True), hide_usage=False).on_chunk(chat_chunk("a"))
    handler.finish()
    assert usage.output_tokens == 2  # counted from the fast path when the stream is cut short


def test_anthropic_usage_events_never_take_the_fast_path() -> None:
    usage = Usage()
    handler = MessagesStream(usage, NO_SHAPING)
    delta = anthropic_event(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
    )
    assert handler.on_chunk(delta + b"\n\n" + delta + b"\n\n")
    start = anthropic_event(
        "message_start", {"type": "message_start", "message": {"usage": {"input_tokens": 5}}}
    )
    assert not handler.on_chunk(start + b"\n\n")
    handler.finish()
    assert usage.output_tokens == 2


def _route(routes: tuple[RouteSpec, ...], name: str) -> RouteSpec:
    return next(r for r in routes if r.name == name)


def test_a_responses_stream_ends_with_its_error_event_numbered_after_the_last_one_relayed() -> None:
    responses = _route(OPENAI_ROUTES, "responses")
    sent = (b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n'
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            b'"sequence_number": 7,"delta":"hi"}\n\n')
    raw = stream_error_event(responses, SHUTTING_DOWN, sent)
    assert raw.endswith(b"\n\n")
    [event] = SseSplitter().feed(raw)
    assert event_name(event) == b"error"
    payload = json.loads(event_data(event))
    # The documented event (the openai SDK's own model of it) ...
    parsed = ResponseErrorEvent.model_validate(payload)
    assert (parsed.type, parsed.sequence_number, parsed.code) == ("error", 8, "service_unavailable")
    assert parsed.message == SHUTTING_DOWN.message and parsed.param is None
    # ... and the nested error object the live API sends, which the SDK raises APIError on.
    assert payload["error"] == {"message": SHUTTING_DOWN.message, "type": "server_error", "param": None,
                                "code": "service_unavailable"}
    # Nothing relayed yet: the first number.
    assert json.loads(event_data(stream_error_event(responses, SHUTTING_DOWN)))["sequence_number"] == 0


def test_chat_and_messages_streams_end_with_their_apis_error_events() -> None:
    chat = stream_error_event(_route(OPENAI_ROUTES, "chat.completions"), SHUTTING_DOWN, b"data: {}\n\n")
    assert chat == b"data: " + json.dumps({"error": {
        "message": SHUTTING_DOWN.message, "type": "server_error", "param": None,
        "code": "service_unavailable"}}, separators=(",", ":")).encode() + b"\n\n"
    messages = stream_error_event(_route(ANTHROPIC_ROUTES, "messages"), SHUTTING_DOWN)
    [event] = SseSplitter().feed(messages)
    assert event_name(event) == b"error"
    assert json.loads(event_data(event)) == {"type": "error", "error": {
        "type": "overloaded_error", "message": SHUTTING_DOWN.message}}
