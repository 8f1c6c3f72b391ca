"""OpenAI-style API: chat completions, completions, responses, embeddings, models."""

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
from gateway.apis.sse import encode_event, event_data, event_name
from gateway.context import ApiFamily, RequestView, Usage

_O = ApiFamily.OPENAI
ROUTES = (
    RouteSpec("chat.completions", "/v1/chat/completions", "POST", _O),
    RouteSpec("completions", "/v1/completions", "POST", _O),
    RouteSpec("responses", "/v1/responses", "POST", _O),
    RouteSpec("embeddings", "/v1/embeddings", "POST", _O, generates=False),
    # Anthropic's API lists models on the same path: its clients are answered in its grammar.
    RouteSpec("models", "/v1/models", "GET", _O, has_body=False, generates=False, billed=False,
              shared=True),
)

_LOGPROB_INCLUDE = "message.output_text.logprobs"
_REASONING_INCLUDE = "reasoning.encrypted_content"
_SUMMARY_FIELDS = ("summary", "generate_summary")  # generate_summary: the deprecated spelling
# Reasoning text as OpenAI-compatible servers put it on chat messages and deltas: DeepSeek / vLLM
# ``reasoning_content``, vLLM / Ollama / OpenRouter ``reasoning``, OpenRouter ``reasoning_details``,
# and ``thinking`` from a few self-hosted servers. None of these is an OpenAI field.
_REASONING_KEYS = ("reasoning_content", "reasoning", "reasoning_details", "thinking")


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def _read_chat_usage(raw: dict[str, Any], usage: Usage) -> None:
    usage.input_tokens = as_int(raw.get("prompt_tokens", raw.get("input_tokens")))
    usage.output_tokens = as_int(raw.get("completion_tokens", raw.get("output_tokens")))
    details = raw.get("completion_tokens_details") or raw.get("output_tokens_details")
    if isinstance(details, dict):
        usage.reasoning_tokens = as_int(details.get("reasoning_tokens"))
    cached = raw.get("prompt_tokens_details") or raw.get("input_tokens_details")
    if isinstance(cached, dict):
        usage.cache_read_tokens = as_int(cached.get("cached_tokens"))
    usage.complete = True


class OpenAIAdapter:
    """Request fields, usage and shaping for the OpenAI family."""

    family: ApiFamily = ApiFamily.OPENAI
    routes: tuple[RouteSpec, ...] = ROUTES

    def read_request(self, route: RouteSpec, body: dict[str, Any], view: RequestView) -> None:
        view.model = str_field(body, "model")
        view.stream = bool_field(body, "stream")
        name = route.name
        if name == "chat.completions":
            view.max_tokens = int_field(body, "max_completion_tokens", 1)
            if view.max_tokens is None:
                view.max_tokens = int_field(body, "max_tokens", 1)
            view.logprobs = bool_field(body, "logprobs")
            view.top_logprobs = int_field(body, "top_logprobs")
            view.reasoning = body.get("reasoning_effort") is not None or body.get("reasoning") is not None
        elif name == "completions":
            view.max_tokens = int_field(body, "max_tokens", 1)
            view.logprobs = int_field(body, "logprobs") is not None
        elif name == "responses":
            view.max_tokens = int_field(body, "max_output_tokens", 1)
            view.top_logprobs = int_field(body, "top_logprobs")
            include = body.get("include")
            if include is not None and not isinstance(include, list):
                raise RequestFieldError("'include' must be a list")
            view.logprobs = bool(include and _LOGPROB_INCLUDE in include) or bool(view.top_logprobs)
            view.reasoning = body.get("reasoning") is not None
        if name in ("chat.completions", "completions"):
            view.n = int_field(body, "n", 1) or 1
            bias = body.get("logit_bias")
            if bias is not None and not isinstance(bias, dict):
                raise RequestFieldError("'logit_bias' must be an object")
            view.logit_bias = bool(bias)
            options = body.get("stream_options")
            if options is not None and not isinstance(options, dict):
                raise RequestFieldError("'stream_options' must be an object")
        if view.stream and name == "embeddings":
            raise RequestFieldError("'stream' is not supported for embeddings")

    def upstream_body(self, view: RequestView, shaping: Shaping) -> dict[str, Any] | None:
        body = view.body
        if body is None:
            return None
        changed = False
        if view.stream and view.route in ("chat.completions", "completions"):
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Ask for the usage chunk so streams are accounted exactly; the handler hides it.
                body = dict(body)
                body["stream_options"] = {**(options or {}), "include_usage": True}
                changed = True
        if shaping.strip_logprobs and any(k in body for k in ("logprobs", "top_logprobs", "logit_bias")):
            body = {k: v for k, v in body.items() if k not in ("logprobs", "top_logprobs", "logit_bias")}
            changed = True
        if shaping.strip_logprobs and isinstance(body.get("include"), list):
            body = dict(body)
            body["include"] = [i for i in body["include"] if i != _LOGPROB_INCLUDE]
            changed = True
        if shaping.strip_reasoning and view.route == "responses":
            # Do not ask for what the response side would strip anyway: encrypted reasoning and
            # reasoning summaries (the effort itself stays: it changes the answer, not the output).
            include = body.get("include")
            if isinstance(include, list) and _REASONING_INCLUDE in include:
                body = dict(body)
                body["include"] = [i for i in include if i != _REASONING_INCLUDE]
                changed = True
            reasoning = body.get("reasoning")
            if isinstance(reasoning, dict) and any(k in reasoning for k in _SUMMARY_FIELDS):
                body = dict(body)
                body["reasoning"] = {k: v for k, v in reasoning.items() if k not in _SUMMARY_FIELDS}
                changed = True
        return body if changed else None

    def usage_from_body(self, route: RouteSpec, body: dict[str, Any], usage: Usage) -> None:
        raw = body.get("usage")
        if isinstance(raw, dict):
            _read_chat_usage(raw, usage)

    def shape_body(self, route: RouteSpec, body: dict[str, Any], shaping: Shaping) -> bool:
        changed = False
        choices = body.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and _shape_choice(choice, shaping)[0]:
                changed = True
        if "output" in body:  # a Responses API object
            changed = _shape_response(body, shaping) or changed
        return changed

    def stream_handler(self, route: RouteSpec, view: RequestView, usage: Usage,
                       shaping: Shaping) -> StreamHandler:
        if route.name == "responses":
            return ResponsesStream(usage, shaping)
        options = (view.body or {}).get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return ChatStream(usage, shaping, hide_usage=not client_wants_usage)


class ChatStream:
    """``data: {chat.completion.chunk}`` events then ``data: [DONE]``."""

    __slots__ = ("_usage", "_shaping", "_hide_usage", "_deltas")

    def __init__(self, usage: Usage, shaping: Shaping, hide_usage: bool) -> None:
        self._usage = usage
        self._shaping = shaping
        self._hide_usage = hide_usage
        self._deltas = 0

    def on_event(self, raw: bytes) -> bytes | None:
        if b'"usage"' in raw:
            if self._hide_usage and b'"usage":null' in raw:
                raw = raw.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")
            if b'"usage"' in raw:
                chunk = _loads(event_data(raw))
                usage = chunk.get("usage") if chunk else None
                if chunk is not None and isinstance(usage, dict):
                    _read_chat_usage(usage, self._usage)
                    if not chunk.get("choices"):
                        # The usage chunk: hidden from a client that did not ask for it.
                        return None if self._hide_usage else raw
        if raw.startswith(b"data: {"):
            self._deltas += 1
        if self._shaping.active:
            return self._shape(raw)
        return raw

    def on_chunk(self, chunk: bytes) -> bool:
        # Never while shaping: every event must be parsed (see _shape); otherwise only chunks
        # without usage or errors, which need neither accounting nor rewriting.
        if self._shaping.active or b'"usage"' in chunk or b'"error"' in chunk:
            return False
        self._deltas += chunk.count(b"data: {")
        return True

    def _shape(self, raw: bytes) -> bytes | None:
        # Parse every event rather than search for key names: a search misses what a client's
        # JSON parser still reads (spacing, escaped keys), and shaping is rare enough to afford it.
        data = event_data(raw)
        if not data.strip() or data == b"[DONE]":
            return raw
        chunk = _loads(data)
        if chunk is None:
            return None  # unreadable (cut or corrupt): it could hold what shaping strips
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return raw  # the usage chunk or an error: nothing to strip
        changed = keep = False
        for choice in choices:
            if not isinstance(choice, dict):
                keep = True
                continue
            edited, emptied = _shape_choice(choice, self._shaping)
            changed = changed or edited
            keep = keep or not emptied
        if not changed:
            return raw
        if not keep and not chunk.get("usage"):
            return None  # reasoning-only deltas: nothing left to send
        return encode_event(_dumps(chunk), event_name(raw))

    def finish(self) -> None:
        if not self._usage.complete:
            # Cut short: charge what was seen (one token per content chunk at least).
            self._usage.output_tokens = max(self._usage.output_tokens, self._deltas)


def _shape_choice(choice: dict[str, Any], shaping: Shaping) -> tuple[bool, bool]:
    """Strip one chat/completions choice (a message or a stream delta) in place: (changed, emptied),
    where emptied means it only carried reasoning and nothing is left worth sending."""
    changed = False
    if shaping.strip_logprobs and choice.get("logprobs") is not None:
        choice["logprobs"] = None
        changed = True
    if not shaping.strip_reasoning:
        return changed, False
    removed = False
    delta = choice.get("delta")
    for holder in (choice.get("message"), delta):
        if isinstance(holder, dict):
            for key in _REASONING_KEYS:
                if key in holder:
                    del holder[key]
                    removed = True
    # A reasoning-only delta goes as a whole, logprobs included: servers that score reasoning
    # tokens would otherwise spell the reasoning out in logprobs.content[].token.
    emptied = (
        removed
        and isinstance(delta, dict)
        and all(v is None for v in delta.values())
        and choice.get("finish_reason") is None
    )
    if emptied and choice.get("logprobs") is not None:
        choice["logprobs"] = None  # sent anyway when another choice of the chunk has content
    return changed or removed, emptied


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


def _shape_response(response: dict[str, Any], shaping: Shaping) -> bool:
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
            payload = _loads(event_data(raw))
            response = payload.get("response") if payload else None
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                _read_chat_usage(response["usage"], self._usage)
        if self._shaping.active:
            return self._shape(raw, name)
        return raw

    def _shape(self, raw: bytes, name: bytes) -> bytes | None:
        data = event_data(raw)
        if not data.strip() or data == b"[DONE]":
            return raw
        payload = _loads(data)
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
            changed = _shape_response(response, shaping) or changed
        if shaping.strip_logprobs:
            changed = _clear_logprobs(payload) or changed
            changed = _clear_logprobs(payload.get("part")) or changed
        changed = _shape_item(payload.get("item"), shaping) or changed
        if self._dropped_events and isinstance(payload.get("sequence_number"), int):
            payload["sequence_number"] -= self._dropped_events  # no gaps that count hidden events
            changed = True
        return encode_event(_dumps(payload), name or None) if changed else raw

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


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
