"""Degrade shaping of Anthropic messages: thinking and redacted_thinking blocks dropped from bodies
and streams, later block indexes renumbered, checked with the SDK's own stream accumulator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from gateway.apis.anthropic import AnthropicAdapter, MessagesStream
from gateway.apis.sse import event_data, event_name
from gateway.context import Shaping, Usage
from tests.unit.apis.test_shaping_payloads import (
    OUTPUT_TOKENS,
    REASONING,
    TOKENS,
    VISIBLE,
    assert_clean,
    compact,
    messages_body,
    messages_events,
    spaced,
)

STRIP = Shaping(strip_reasoning=True)
ADAPTER = AnthropicAdapter()
ROUTE = ADAPTER.routes[0]
EVENT: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


def accumulate(sent: list[bytes]) -> Any:
    """What ``client.messages.stream(...).get_final_message()`` builds from these events (the SDK
    skips events without an ``event:`` name and ``ping``, as its stream decoder does)."""
    snapshot, bufs = None, dict[int, bytes]()
    for raw in sent:
        name = event_name(raw)
        if name is None or name == b"ping":
            continue
        event = EVENT.validate_json(event_data(raw))
        assert event.type == name.decode()  # the name still matches the payload
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def frame(name: str, payload: dict[str, Any], style: str, dumps: Any) -> bytes:
    data = dumps(payload)
    if style == "canonical":
        return f"event: {name}\ndata: {data}".encode()
    if style == "no-space":
        return f"event:{name}\ndata:{data}".encode()
    if style == "id-first":
        return f"id: 7\nevent: {name}\ndata: {data}".encode()
    if style == "data-first":
        return f"data: {data}\nevent: {name}".encode()
    if style == "multi-line":  # one JSON value over several data: lines (joined with \n)
        return (f"event: {name}\n" + "\n".join(f"data: {line}" for line in json.dumps(payload, indent=1)
                                               .splitlines())).encode()
    raise AssertionError(style)


def test_body_loses_thinking_and_redacted_thinking() -> None:
    body = messages_body()
    usage = Usage()
    ADAPTER.usage_from_body(ROUTE, body, usage)
    assert ADAPTER.shape_body(ROUTE, body, STRIP)
    assert_clean(json.dumps(body))
    message = Message.model_validate(body)
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[0].text == VISIBLE  # type: ignore[union-attr]
    assert usage.output_tokens == OUTPUT_TOKENS  # thinking tokens stay billed


@pytest.mark.parametrize("style", ["canonical", "no-space", "id-first", "data-first", "multi-line"])
@pytest.mark.parametrize("dumps", [compact, spaced])
def test_stream_drops_thinking_renumbers_and_accumulates(style: str, dumps: Any) -> None:
    usage = Usage()
    handler = MessagesStream(usage, STRIP)
    sent = [s for s in (handler.on_event(frame(n, p, style, dumps)) for n, p in messages_events()) if s]
    handler.finish()
    assert_clean(b"\n\n".join(sent))
    indexes = [json.loads(event_data(s)).get("index") for s in sent]
    assert [i for i in indexes if i is not None] == [0] * (2 + len(TOKENS)) + [1] * 4
    final = accumulate(sent)
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == VISIBLE and final.content[1].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == OUTPUT_TOKENS
    assert (usage.output_tokens, usage.complete) == (OUTPUT_TOKENS, True)


def test_thinking_in_message_start_shifts_the_streamed_blocks() -> None:
    events = messages_events()[2:]  # content blocks onwards, renumbered after one prefilled block
    for _, payload in events:
        if "index" in payload:
            payload["index"] += 1
    start = {"type": "message_start", "message": {**messages_events()[0][1]["message"], "content": [
        {"type": "redacted_thinking", "data": "x" + REASONING}]}}
    handler = MessagesStream(Usage(), STRIP)
    sent = [s for s in (handler.on_event(frame(n, p, "canonical", compact))
                        for n, p in [("message_start", start), *events]) if s]
    assert_clean(b"\n\n".join(sent))
    assert [b.type for b in accumulate(sent).content] == ["text", "tool_use"]


def test_thinking_delta_without_its_start_is_still_dropped() -> None:
    handler = MessagesStream(Usage(), STRIP)
    for kind in ("thinking_delta", "signature_delta"):
        field = "thinking" if kind == "thinking_delta" else "signature"
        raw = frame("content_block_delta", {"type": "content_block_delta", "index": 5,
                                            "delta": {"type": kind, field: REASONING}}, "canonical", compact)
        assert handler.on_event(raw) is None


def test_unreadable_event_is_dropped_only_when_shaping() -> None:
    cut = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"thinking":"'
    assert MessagesStream(Usage(), STRIP).on_event(cut) is None
    assert MessagesStream(Usage(), Shaping()).on_event(cut) is cut


def test_unshaped_and_untouched_events_are_identity() -> None:
    events = [frame(n, p, "canonical", compact) for n, p in messages_events()]
    handler = MessagesStream(Usage(), Shaping())
    assert all(handler.on_event(e) is e for e in events)
    shaped = MessagesStream(Usage(), STRIP)
    kept = [e for e in events if shaped.on_event(e) is e]
    # Events without a block index go as received; every later block event was renumbered.
    names = [b"message_start", b"ping", b"ping", b"message_delta", b"message_stop"]
    assert [event_name(e) for e in kept] == names


def test_fast_path_only_when_no_thinking_to_strip() -> None:
    payload = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
    chunk = frame("content_block_delta", payload, "canonical", compact) + b"\n\n"
    assert MessagesStream(Usage(), Shaping()).on_chunk(chunk)
    assert MessagesStream(Usage(), Shaping(strip_logprobs=True)).on_chunk(chunk)  # nothing to strip here
    assert not MessagesStream(Usage(), STRIP).on_chunk(chunk)
