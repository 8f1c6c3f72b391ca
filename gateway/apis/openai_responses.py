"""The OpenAI Responses API's answers: usage, and shaping of its objects and typed event streams
(reasoning items dropped with every event that belongs to them, indexes and sequence numbers
renumbered, ``output_text`` logprobs emptied). Chat completions are in gateway/apis/openai.py."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.apis.base import Shaping, as_int
from gateway.apis.sse import encode_event, event_data, event_name, json_object
from gateway.context import Usage


def read_usage(raw: dict[str, Any], usage: Usage) -> None:
    """An OpenAI usage object into ``usage``: chat naming (prompt/completion tokens) or the
    Responses API's (input/output tokens)."""
    usage.input_tokens = as_int(raw.get("prompt_tokens", raw.get("input_tokens")))
    usage.output_tokens = as_int(raw.get("completion_tokens", raw.get("output_tokens")))
    details = raw.get("completion_tokens_details") or raw.get("output_tokens_details")
    if isinstance(details, dict):
        usage.reasoning_tokens = as_int(details.get("reasoning_tokens"))
    cached = raw.get("prompt_tokens_details") or raw.get("input_tokens_details")
    if isinstance(cached, dict):
        usage.cache_read_tokens = as_int(cached.get("cached_tokens"))
    usage.complete = True


def _clear_logprobs(part: Any) -> bool:
    """Empty the ``logprobs`` list of an ``output_text`` part or text event (the field is a list
    the SDK types require, so it is emptied, not removed)."""
    if isinstance(part, dict) and part.get("logprobs"):
        part["logprobs"] = []
        return True
    return False


def _is_reasoning(item: Any) -> bool:
    return isinstance(item, dict) and item.get("type") == "reasoning"


def _shape_item(item: Any, shaping: Shaping) -> bool:
    """Strip the logprobs of one (non-reasoning) output item's content parts."""
    changed = False
    content = item.get("content") if isinstance(item, dict) and shaping.strip_logprobs else None
    for part in content if isinstance(content, list) else ():
        changed = _clear_logprobs(part) or changed
    return changed


def shape_response(response: dict[str, Any], shaping: Shaping) -> bool:
    """Strip a Responses API object in place: reasoning items (summary, reasoning text and
    ``encrypted_content``) and ``output_text`` logprobs. ``usage.output_tokens_details.reasoning_tokens``
    stays: it is a count the client is billed for, not content."""
    output = response.get("output")
    if not isinstance(output, list):
        return False
    changed = False
    if shaping.strip_reasoning:
        kept = [item for item in output if not _is_reasoning(item)]
        if len(kept) != len(output):
            response["output"] = output = kept
            changed = True
    for item in output:
        changed = _shape_item(item, shaping) or changed
    return changed


_USAGE_EVENTS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})
# Parts that hold reasoning (a reasoning item's ``content`` and ``summary``).
_REASONING_PARTS = frozenset({"reasoning_text", "summary_text"})


class ResponsesStream:
    """Typed ``event:`` lines of the Responses API; usage rides in ``response.completed``.

    Shaping drops every event of a reasoning item (``response.reasoning_*``, its
    ``output_item.added/done`` and any event with its ``output_index``), renumbers later
    ``output_index`` and ``sequence_number`` values so the stream stays consistent with the final
    ``response.output`` (which loses its reasoning items too), and empties logprobs wherever an
    ``output_text`` carries them.
    """

    __slots__ = ("_usage", "_shaping", "_deltas", "_dropped_items", "_dropped_events")

    def __init__(self, usage: Usage, shaping: Shaping) -> None:
        self._usage = usage
        self._shaping = shaping
        self._deltas = 0
        self._dropped_items: list[int] = []  # output indexes of reasoning items, in stream order
        self._dropped_events = 0

    def on_chunk(self, chunk: bytes) -> bool:
        # Never while shaping: every event must be parsed (see _shape).
        if self._shaping.active or b'"usage"' in chunk:
            return False
        self._deltas += chunk.count(b"event: response.output_text.delta\n")
        return True

    def on_event(self, raw: bytes) -> bytes | None:
        name = event_name(raw) or b""
        if name == b"response.output_text.delta":
            self._deltas += 1
        elif name in _USAGE_EVENTS:
            payload = json_object(event_data(raw))
            response = payload.get("response") if payload else None
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                read_usage(response["usage"], self._usage)
        if self._shaping.active:
            return self._shape(raw, name)
        return raw

    def _shape(self, raw: bytes, name: bytes) -> bytes | None:
        data = event_data(raw)
        if not data.strip() or data == b"[DONE]":
            return raw
        payload = json_object(data)
        if payload is None:
            return None  # unreadable (cut or corrupt): it could hold what shaping strips
        shaping = self._shaping
        changed = False
        if shaping.strip_reasoning:
            if self._is_reasoning_event(payload, name):
                self._dropped_events += 1
                return None
            changed = self._renumber(payload)
        response = payload.get("response")
        if isinstance(response, dict):
            changed = shape_response(response, shaping) or changed
        if shaping.strip_logprobs:
            changed = _clear_logprobs(payload) or changed
            changed = _clear_logprobs(payload.get("part")) or changed
        changed = _shape_item(payload.get("item"), shaping) or changed
        if self._dropped_events and isinstance(payload.get("sequence_number"), int):
            payload["sequence_number"] -= self._dropped_events  # no gaps that count hidden events
            changed = True
        return encode_event(orjson.dumps(payload), name or None) if changed else raw

    def _is_reasoning_event(self, payload: dict[str, Any], name: bytes) -> bool:
        kind = payload.get("type")
        kind = kind if isinstance(kind, str) else name.decode("utf-8", "replace")
        index = payload.get("output_index")
        if _is_reasoning(payload.get("item")):
            if isinstance(index, int) and index not in self._dropped_items:
                self._dropped_items.append(index)
            return True
        part = payload.get("part")
        return (
            kind.startswith("response.reasoning")  # summary / reasoning text deltas, parts and dones
            or (isinstance(index, int) and index in self._dropped_items)
            or (isinstance(part, dict) and part.get("type") in _REASONING_PARTS)
        )

    def _renumber(self, payload: dict[str, Any]) -> bool:
        index = payload.get("output_index")
        if not isinstance(index, int) or isinstance(index, bool):
            return False
        shift = sum(1 for d in self._dropped_items if d < index)
        if shift:
            payload["output_index"] = index - shift
        return bool(shift)

    def finish(self) -> None:
        if not self._usage.complete:
            self._usage.output_tokens = max(self._usage.output_tokens, self._deltas)
