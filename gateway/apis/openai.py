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
    RouteSpec("models", "/v1/models", "GET", _O, has_body=False, generates=False, billed=False),
)

_LOGPROB_INCLUDE = "message.output_text.logprobs"


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
        return body if changed else None

    def usage_from_body(self, route: RouteSpec, body: dict[str, Any], usage: Usage) -> None:
        raw = body.get("usage")
        if isinstance(raw, dict):
            _read_chat_usage(raw, usage)

    def shape_body(self, route: RouteSpec, body: dict[str, Any], shaping: Shaping) -> bool:
        changed = False
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            if shaping.strip_logprobs and choice.get("logprobs") is not None:
                choice["logprobs"] = None
                changed = True
            message = choice.get("message")
            if shaping.strip_reasoning and isinstance(message, dict):
                for key in ("reasoning_content", "reasoning"):
                    if key in message:
                        del message[key]
                        changed = True
        output = body.get("output")
        if isinstance(output, list):
            if shaping.strip_reasoning:
                kept = [i for i in output if not (isinstance(i, dict) and i.get("type") == "reasoning")]
                changed = changed or len(kept) != len(output)
                body["output"] = output = kept
            if shaping.strip_logprobs:
                for item in output:
                    for part in (item.get("content") or ()) if isinstance(item, dict) else ():
                        if isinstance(part, dict) and part.get("logprobs"):
                            part["logprobs"] = []
                            changed = True
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
        if self._shaping.active and (b'"logprobs"' in raw or b"reasoning" in raw):
            return self._shape(raw)
        return raw

    def on_chunk(self, chunk: bytes) -> bool:
        if self._shaping.active or b'"usage"' in chunk or b'"error"' in chunk:
            return False
        self._deltas += chunk.count(b"data: {")
        return True

    def _shape(self, raw: bytes) -> bytes | None:
        chunk = _loads(event_data(raw))
        if chunk is None:
            return raw
        emptied = True
        for choice in chunk.get("choices") or ():
            if self._shaping.strip_logprobs and choice.get("logprobs") is not None:
                choice["logprobs"] = None
            delta = choice.get("delta")
            if self._shaping.strip_reasoning and isinstance(delta, dict):
                delta.pop("reasoning_content", None)
                delta.pop("reasoning", None)
                if any(v is not None for v in delta.values()) or choice.get("finish_reason"):
                    emptied = False
            else:
                emptied = False
        if emptied and chunk.get("choices") and not chunk.get("usage"):
            return None  # a reasoning-only delta: nothing left to send
        return encode_event(_dumps(chunk))

    def finish(self) -> None:
        if not self._usage.complete:
            # Cut short: charge what was seen (one token per content chunk at least).
            self._usage.output_tokens = max(self._usage.output_tokens, self._deltas)


_USAGE_EVENTS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


class ResponsesStream:
    """Typed ``event:`` lines of the Responses API; usage rides in ``response.completed``."""

    __slots__ = ("_usage", "_shaping", "_deltas")

    def __init__(self, usage: Usage, shaping: Shaping) -> None:
        self._usage = usage
        self._shaping = shaping
        self._deltas = 0

    def on_chunk(self, chunk: bytes) -> bool:
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
        if self._shaping.strip_reasoning and (
            name.startswith(b"response.reasoning")
            or (name.startswith(b"response.output_item") and b'"type":"reasoning"' in raw)
        ):
            return None
        if self._shaping.strip_logprobs and b'"logprobs":[{' in raw:
            payload = _loads(event_data(raw))
            if payload is not None:
                payload["logprobs"] = []
                return encode_event(_dumps(payload), name)
        return raw

    def finish(self) -> None:
        if not self._usage.complete:
            self._usage.output_tokens = max(self._usage.output_tokens, self._deltas)


def _loads(data: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
