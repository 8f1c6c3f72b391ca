"""Anthropic-style API: messages (stream and not) and count_tokens."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.apis.base import (
    RequestFieldError,
    RouteSpec,
    Shaping,
    StreamHandler,
    as_int,
    bool_field,
    int_field,
    str_field,
)
from gateway.apis.sse import encode_event, event_data, event_name, json_object
from gateway.context import ApiFamily, RequestView, Usage

_A = ApiFamily.ANTHROPIC
ROUTES = (
    RouteSpec("messages", "/v1/messages", "POST", _A),
    # Counting tokens runs no model and is free upstream: it costs requests, never tokens.
    RouteSpec("messages.count_tokens", "/v1/messages/count_tokens", "POST", _A, generates=False,
              billed=False),
)

_THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _read_usage(raw: dict[str, Any], usage: Usage, final: bool) -> None:
    if "input_tokens" in raw:
        usage.input_tokens = as_int(raw.get("input_tokens"))
    if "output_tokens" in raw:
        # message_delta carries the cumulative count: keep the largest seen.
        usage.output_tokens = max(usage.output_tokens, as_int(raw.get("output_tokens")))
    if "cache_read_input_tokens" in raw:
        usage.cache_read_tokens = as_int(raw.get("cache_read_input_tokens"))
    if "cache_creation_input_tokens" in raw:
        usage.cache_write_tokens = as_int(raw.get("cache_creation_input_tokens"))
    if final:
        usage.complete = True


class AnthropicAdapter:
    """Request fields, usage and shaping for the Anthropic family."""

    family: ApiFamily = ApiFamily.ANTHROPIC
    routes: tuple[RouteSpec, ...] = ROUTES

    def read_request(self, route: RouteSpec, body: dict[str, Any], view: RequestView) -> None:
        view.model = str_field(body, "model")
        view.stream = bool_field(body, "stream")
        if route.name != "messages":
            return
        view.max_tokens = int_field(body, "max_tokens", 1)
        thinking = body.get("thinking")
        if thinking is not None:
            if not isinstance(thinking, dict):
                raise RequestFieldError("'thinking' must be an object")
            if thinking.get("type") in ("enabled", "adaptive"):
                view.reasoning = True
                view.reasoning_budget = int_field(thinking, "budget_tokens", 0)

    def upstream_body(self, view: RequestView, shaping: Shaping) -> dict[str, Any] | None:
        # Anthropic has no logprobs; thinking is stripped from the response side because a
        # request without thinking would change the model's behaviour, not just its output.
        return None

    def usage_from_body(self, route: RouteSpec, body: dict[str, Any], usage: Usage) -> None:
        raw = body.get("usage")
        if isinstance(raw, dict):
            _read_usage(raw, usage, final=True)

    def shape_body(self, route: RouteSpec, body: dict[str, Any], shaping: Shaping) -> bool:
        content = body.get("content")
        if not shaping.strip_reasoning or not isinstance(content, list):
            return False
        kept = [b for b in content if not (isinstance(b, dict) and b.get("type") in _THINKING_BLOCKS)]
        body["content"] = kept
        return len(kept) != len(content)

    def stream_handler(self, route: RouteSpec, view: RequestView, usage: Usage,
                       shaping: Shaping) -> StreamHandler:
        return MessagesStream(usage, shaping)


_DELTA = b"event: content_block_delta"
_BLOCK_EVENTS = frozenset({"content_block_start", "content_block_delta", "content_block_stop"})
_THINKING_DELTAS = frozenset({"thinking_delta", "signature_delta"})


class MessagesStream:
    """``event:``/``data:`` pairs; thinking blocks dropped with indices renumbered when shaping.

    The SDKs' accumulators append a block on ``content_block_start`` and address it by ``index``
    afterwards, so every later block's index moves down by the number of thinking blocks dropped
    before it, in every event that names it.
    """

    __slots__ = ("_usage", "_shaping", "_deltas", "_dropped")

    def __init__(self, usage: Usage, shaping: Shaping) -> None:
        self._usage = usage
        self._shaping = shaping
        self._deltas = 0
        self._dropped: list[int] = []  # indexes of the thinking blocks dropped so far

    def on_event(self, raw: bytes) -> bytes | None:
        if raw.startswith(_DELTA):
            self._deltas += 1  # the hot case: no parsing unless shaping
        else:
            name = event_name(raw)
            if name == b"message_start":
                payload = json_object(event_data(raw))
                message = payload.get("message") if payload else None
                if isinstance(message, dict) and isinstance(message.get("usage"), dict):
                    _read_usage(message["usage"], self._usage, final=False)
            elif name == b"message_delta":
                payload = json_object(event_data(raw))
                if payload and isinstance(payload.get("usage"), dict):
                    _read_usage(payload["usage"], self._usage, final=True)
        if self._shaping.strip_reasoning:
            return self._shape(raw)
        return raw

    def on_chunk(self, chunk: bytes) -> bool:
        # Never while stripping thinking: every event must be parsed (see _shape); the API has no
        # logprobs to strip. message_start / message_delta carry usage: those take the event path.
        if self._shaping.strip_reasoning or b"event: message_" in chunk:
            return False
        self._deltas += chunk.count(b"event: content_block_delta\n")
        return True

    def _shape(self, raw: bytes) -> bytes | None:
        # Decide on the parsed payload, not on the framing: an ``event:`` line without its space,
        # after an ``id:`` line or missing altogether must not let a thinking block through.
        data = event_data(raw)
        if not data.strip():
            return raw
        payload = json_object(data)
        if payload is None:
            return None  # unreadable (cut or corrupt): it could hold thinking
        kind = payload.get("type")
        if kind == "message_start":
            return self._shape_start(raw, payload)
        if kind not in _BLOCK_EVENTS:
            return raw
        index = payload.get("index")
        block = payload.get("content_block")
        delta = payload.get("delta")
        if (isinstance(block, dict) and block.get("type") in _THINKING_BLOCKS) or (
            isinstance(delta, dict) and delta.get("type") in _THINKING_DELTAS
        ):
            if isinstance(index, int) and index not in self._dropped:
                self._dropped.append(index)
            return None
        if not isinstance(index, int) or isinstance(index, bool):
            return raw
        if index in self._dropped:
            return None  # the stop of a thinking block
        shift = sum(1 for d in self._dropped if d < index)
        if not shift:
            return raw
        payload["index"] = index - shift
        return encode_event(_dumps(payload), event_name(raw))

    def _shape_start(self, raw: bytes, payload: dict[str, Any]) -> bytes:
        """``message_start`` normally has no content; blocks it does carry take the first indexes."""
        message = payload.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, list):
            return raw
        kept = []
        for index, block in enumerate(content):
            if isinstance(block, dict) and block.get("type") in _THINKING_BLOCKS:
                self._dropped.append(index)
            else:
                kept.append(block)
        if len(kept) == len(content):
            return raw
        message["content"] = kept
        return encode_event(_dumps(payload), event_name(raw))

    def finish(self) -> None:
        if not self._usage.complete:
            # Cut short: the last cumulative count, or one token per delta seen, whichever is larger.
            self._usage.output_tokens = max(self._usage.output_tokens, self._deltas)
