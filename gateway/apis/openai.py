"""OpenAI-style API: chat completions, completions, responses, embeddings, models."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.apis.base import (
    RequestFieldError,
    RouteSpec,
    Shaping,
    StreamHandler,
    bool_field,
    int_field,
    str_field,
)
from gateway.apis.inline_reasoning import InlineReasoning, InlineReasoningFilter
from gateway.apis.openai_responses import ResponsesStream, read_usage, shape_response
from gateway.apis.sse import encode_event, event_data, event_name, json_object
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
    # a model's id may hold slashes on some servers (vLLM: "meta-llama/Llama-3.1-8B")
    RouteSpec("models.retrieve", "/v1/models/{model_id:.+}", "GET", _O, has_body=False,
              generates=False, billed=False, shared=True),
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


class OpenAIAdapter:
    """Request fields, usage and shaping for the OpenAI family.

    ``inline_reasoning``: the upstream writes reasoning inline in the answer's text
    (``upstreams[].inline_reasoning``); shaping that strips reasoning then removes that block from
    chat completions and completions too (gateway/apis/inline_reasoning.py)."""

    family: ApiFamily = ApiFamily.OPENAI
    routes: tuple[RouteSpec, ...] = ROUTES

    def __init__(self, inline_reasoning: InlineReasoning | None = None) -> None:
        self.inline_reasoning = inline_reasoning

    def _inline(self, route: RouteSpec, shaping: Shaping) -> InlineReasoning | None:
        """The inline tags to strip from this response, if any (None on the fast path)."""
        inline = self.inline_reasoning
        if inline is None or not shaping.strip_reasoning or route.name not in _INLINE_ROUTES:
            return None
        return inline

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
            read_usage(raw, usage)

    def shape_body(self, route: RouteSpec, body: dict[str, Any], shaping: Shaping) -> bool:
        changed = False
        choices = body.get("choices")
        inline = self._inline(route, shaping)
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, dict) and _shape_choice(
                    choice, shaping, None if inline is None else inline.filter(), whole=True)[0]:
                changed = True
        if "output" in body:  # a Responses API object
            changed = shape_response(body, shaping) or changed
        return changed

    def stream_handler(self, route: RouteSpec, view: RequestView, usage: Usage,
                       shaping: Shaping) -> StreamHandler:
        if route.name == "responses":
            return ResponsesStream(usage, shaping)
        options = (view.body or {}).get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        return ChatStream(usage, shaping, hide_usage=not client_wants_usage,
                          inline=self._inline(route, shaping))


class ChatStream:
    """``data: {chat.completion.chunk}`` events then ``data: [DONE]``."""

    __slots__ = ("_usage", "_shaping", "_hide_usage", "_deltas", "_inline", "_filters")

    def __init__(self, usage: Usage, shaping: Shaping, hide_usage: bool,
                 inline: InlineReasoning | None = None) -> None:
        self._usage = usage
        self._shaping = shaping
        self._hide_usage = hide_usage
        self._deltas = 0
        # Inline reasoning to strip from the text (only while shaping strips reasoning): one
        # filter per choice index, made when the choice first appears.
        self._inline = inline
        self._filters: dict[Any, InlineReasoningFilter] = {}

    def on_event(self, raw: bytes) -> bytes | None:
        if b'"usage"' in raw:
            if self._hide_usage and b'"usage":null' in raw:
                raw = raw.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")
            if b'"usage"' in raw:
                chunk = json_object(event_data(raw))
                usage = chunk.get("usage") if chunk else None
                if chunk is not None and isinstance(usage, dict):
                    read_usage(usage, self._usage)
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
        chunk = json_object(data)
        if chunk is None:
            return None  # unreadable (cut or corrupt): it could hold what shaping strips
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return raw  # the usage chunk or an error: nothing to strip
        changed = keep = False
        inline = self._inline
        for choice in choices:
            if not isinstance(choice, dict):
                keep = True
                continue
            edited, emptied = _shape_choice(choice, self._shaping,
                                            None if inline is None else self._filter(choice))
            changed = changed or edited
            keep = keep or not emptied
        if not changed:
            return raw
        if not keep and not chunk.get("usage"):
            return None  # reasoning-only deltas: nothing left to send
        return encode_event(_dumps(chunk), event_name(raw))

    def _filter(self, choice: dict[str, Any]) -> InlineReasoningFilter:
        """The inline reasoning filter of ``choice`` (only called when there are inline tags)."""
        inline = self._inline
        assert inline is not None
        index = choice.get("index", 0)
        if not isinstance(index, int):
            index = repr(index)  # not a valid index, but it must not share another choice's filter
        found = self._filters.get(index)
        if found is None:
            found = self._filters[index] = inline.filter()
        return found

    def finish(self) -> None:
        if not self._usage.complete:
            # Cut short: charge what was seen (one token per content chunk at least).
            self._usage.output_tokens = max(self._usage.output_tokens, self._deltas)


def _shape_choice(choice: dict[str, Any], shaping: Shaping, inline: InlineReasoningFilter | None = None,
                  whole: bool = False) -> tuple[bool, bool]:
    """Strip one chat/completions choice (a message or a stream delta) in place: (changed, emptied),
    where emptied means it only carried reasoning and nothing is left worth sending. ``inline``
    strips reasoning written in the text itself; ``whole``: the choice's whole text is here (a
    complete body), rather than one piece of a stream."""
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
    if inline is not None and _strip_inline(choice, delta, inline, whole):
        removed = True
        if choice.get("logprobs") is not None:
            choice["logprobs"] = None  # they name every token, those of the reasoning too
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        emptied = (
            not text
            and (not isinstance(delta, dict) or all(v is None or k == "content" for k, v in delta.items()))
            and choice.get("finish_reason") is None
        )
    elif inline is not None and inline.removed and _shift_offsets(choice.get("logprobs"), inline.removed):
        changed = True  # a completions delta past the block: its offsets counted the block too
    if emptied and choice.get("logprobs") is not None:
        choice["logprobs"] = None  # sent anyway when another choice of the chunk has content
    return changed or removed, emptied


def _strip_inline(choice: dict[str, Any], delta: Any, inline: InlineReasoningFilter, whole: bool) -> bool:
    """Feed one choice's piece of text (``delta.content``, ``message.content`` or the completions
    ``text``) through its filter and put back what may be sent; True if that differs. The text
    ends with the body, or with the choice's ``finish_reason`` in a stream: what the filter held
    back is settled then."""
    if isinstance(delta, dict):
        holder, key = delta, "content"
    elif isinstance(message := choice.get("message"), dict):
        holder, key = message, "content"
    elif "text" in choice:
        holder, key = choice, "text"
    else:
        return False  # no text at all (a malformed choice): nothing to strip or settle
    text = holder.get(key)
    if isinstance(text, str):
        out = inline.feed(text)
    elif text is None:
        out = ""
    else:
        return False  # not text (a server's content parts): nothing this filter knows to strip
    if whole or choice.get("finish_reason") is not None:
        out += inline.finish()
    if out == (text or ""):
        return False
    holder[key] = out
    return True


def _shift_offsets(logprobs: Any, removed: int) -> bool:
    """Lower a completions choice's ``logprobs.text_offset`` values (character offsets into the
    choice's whole text) by the ``removed`` characters of reasoning before them; True if any
    changed. Chat logprobs have no offsets: nothing to do."""
    offsets = logprobs.get("text_offset") if isinstance(logprobs, dict) else None
    if not isinstance(offsets, list):
        return False
    changed = False
    for i, value in enumerate(offsets):
        if type(value) is int:  # not bool, not a server's odd value: those are left as they came
            # Never below 0: an offset inside the removed block would name reasoning (the filter
            # nulls those deltas' logprobs, so only a server counting oddly gets here).
            offsets[i] = max(0, value - removed)
            changed = True
    return changed


# Routes whose answers carry text that may begin with inline reasoning.
_INLINE_ROUTES = frozenset({"chat.completions", "completions"})
