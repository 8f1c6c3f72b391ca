"""Degrade shaping of OpenAI responses: chat completions and the Responses API, whole bodies and
streams, checked for leaks, for SDK validity (the SDKs' own accumulators) and for usage."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from gateway.apis.openai import ChatStream, OpenAIAdapter
from gateway.apis.openai_responses import ResponsesStream
from gateway.apis.sse import event_data
from gateway.context import ApiFamily, RequestView, Shaping, Usage
from tests.unit.apis.test_shaping_payloads import (
    ALTERNATIVE,
    LOGPROB,
    OUTPUT_TOKENS,
    REASONING,
    SUMMARY,
    TOKENS,
    VISIBLE,
    assert_clean,
    chat_body,
    chat_chunks,
    compact,
    responses_body,
    responses_events,
    spaced,
)

BOTH = Shaping(strip_reasoning=True, strip_logprobs=True)
ADAPTER = OpenAIAdapter()
ROUTES = {r.name: r for r in ADAPTER.routes}


def run(handler: ChatStream | ResponsesStream, events: list[bytes]) -> list[bytes]:
    sent = [handler.on_event(e) for e in events]
    handler.finish()
    return [s for s in sent if s is not None]


def data_events(chunks: list[dict[str, Any]], dumps: Any = compact) -> list[bytes]:
    return [f"data: {dumps(c)}".encode() for c in chunks] + [b"data: [DONE]"]


def typed_events(events: list[tuple[str, dict[str, Any]]], dumps: Any = compact) -> list[bytes]:
    return [f"event: {name}\ndata: {dumps(p)}".encode() for name, p in events]


# -- chat completions --------------------------------------------------------------------------
def test_chat_body_loses_reasoning_and_logprobs_of_every_choice() -> None:
    body = chat_body(n=3)
    usage = Usage()
    ADAPTER.usage_from_body(ROUTES["chat.completions"], body, usage)
    assert ADAPTER.shape_body(ROUTES["chat.completions"], body, BOTH)
    assert_clean(json.dumps(body))
    completion = ChatCompletion.model_validate(body)
    assert [c.message.content for c in completion.choices] == [VISIBLE] * 3
    assert all(c.logprobs is None for c in completion.choices)
    assert usage.output_tokens == OUTPUT_TOKENS and usage.reasoning_tokens == OUTPUT_TOKENS - len(TOKENS)


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "reasoning_details"])
@pytest.mark.parametrize("dumps", [compact, spaced])
@pytest.mark.parametrize("hide_usage", [True, False])
def test_chat_stream_with_n_choices_is_clean_and_accumulates(key: str, dumps: Any, hide_usage: bool) -> None:
    chunks = chat_chunks(n=2, reasoning_key=key)
    if key == "reasoning_details":  # OpenRouter: a list of typed pieces
        for c in chunks:
            for choice in c["choices"]:
                if choice["delta"].get(key):
                    choice["delta"][key] = [{"type": "reasoning.text", "text": choice["delta"][key]}]
    usage = Usage()
    sent = run(ChatStream(usage, BOTH, hide_usage=hide_usage), data_events(chunks, dumps))
    assert_clean(b"\n\n".join(sent))
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for raw in sent[:-1]:
        state.handle_chunk(ChatCompletionChunk.model_validate_json(event_data(raw)))
    final = state.get_final_completion()
    assert [c.message.content for c in final.choices] == [VISIBLE, VISIBLE]
    assert sent[-1] == b"data: [DONE]"
    assert (usage.output_tokens, usage.complete) == (OUTPUT_TOKENS, True)
    assert (final.usage is None) == hide_usage


def test_chat_stream_strip_reasoning_alone_keeps_answer_logprobs_but_not_reasoning_ones() -> None:
    # Logprobs of reasoning tokens name those tokens: a reasoning-only delta goes as a whole.
    handler = ChatStream(Usage(), Shaping(strip_reasoning=True), hide_usage=True)
    sent = run(handler, data_events(chat_chunks(n=1)))
    blob = b"\n\n".join(sent).decode()
    assert REASONING not in blob
    lps = [json.loads(event_data(s))["choices"][0]["logprobs"] for s in sent[:-1] if b'"choices":[{' in s]
    assert sum(1 for lp in lps if lp) == len(TOKENS)


def test_chat_stream_strip_logprobs_alone_keeps_reasoning() -> None:
    handler = ChatStream(Usage(), Shaping(strip_logprobs=True), hide_usage=True)
    sent = run(handler, data_events(chat_chunks(n=1)))
    blob = b"\n\n".join(sent).decode()
    assert REASONING in blob and '"logprob"' not in blob


def test_chat_stream_unreadable_event_is_dropped_only_when_shaping() -> None:
    cut = b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"' + REASONING.encode()
    assert ChatStream(Usage(), BOTH, hide_usage=True).on_event(cut) is None
    assert ChatStream(Usage(), Shaping(), hide_usage=True).on_event(cut) is cut
    error = b'data: {"error":{"message":"overloaded","type":"server_error"}}'
    assert ChatStream(Usage(), BOTH, hide_usage=True).on_event(error) is error


def test_chat_stream_untouched_without_shaping_or_when_nothing_to_strip() -> None:
    events = data_events(chat_chunks(n=2))
    handler = ChatStream(Usage(), Shaping(), hide_usage=False)
    assert all(handler.on_event(e) is e for e in events)
    plain = [e for e in events if REASONING.encode() not in e and b"logprob" not in e]
    shaped = ChatStream(Usage(), BOTH, hide_usage=False)
    assert all(shaped.on_event(e) is e for e in plain)  # identity: the relay may resend the chunk


def test_legacy_completions_logprobs_are_stripped() -> None:
    choice: dict[str, Any] = {"index": 0, "text": VISIBLE, "finish_reason": "stop",
                              "logprobs": {"tokens": [ALTERNATIVE], "token_logprobs": [LOGPROB]}}
    body: dict[str, Any] = {"object": "text_completion", "choices": [choice]}
    assert ADAPTER.shape_body(ROUTES["completions"], body, BOTH)
    assert_clean(json.dumps(body))
    assert choice["logprobs"] is None and choice["text"] == VISIBLE


# -- Responses API ----------------------------------------------------------------------------
def test_responses_body_drops_reasoning_items_and_logprobs_but_keeps_counts() -> None:
    body = responses_body()
    usage = Usage()
    ADAPTER.usage_from_body(ROUTES["responses"], body, usage)
    assert ADAPTER.shape_body(ROUTES["responses"], body, BOTH)
    assert_clean(json.dumps(body))
    response = Response.model_validate(body)
    assert [i.type for i in response.output] == ["message"] and response.output_text == VISIBLE
    # A count, not content: kept (the SDK types require it, and clients are billed for it).
    assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens > 0
    assert usage.output_tokens == OUTPUT_TOKENS


def accumulate_responses(sent: list[bytes]) -> Response:
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for raw in sent:
        state.handle_event(adapter.validate_json(event_data(raw)))
    assert state._completed_response is not None  # set by response.completed
    return state._completed_response


@pytest.mark.parametrize("with_text", [False, True])
@pytest.mark.parametrize("dumps", [compact, spaced])
def test_responses_stream_is_clean_renumbered_and_accumulates(with_text: bool, dumps: Any) -> None:
    usage = Usage()
    sent = run(ResponsesStream(usage, BOTH), typed_events(responses_events(with_text), dumps))
    assert_clean(b"\n\n".join(sent))
    payloads = [json.loads(event_data(s)) for s in sent]
    assert not any(p["type"].startswith("response.reasoning") for p in payloads)
    # No gap betrays hidden events; the message is output 0, as in the final response.output.
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    assert {p["output_index"] for p in payloads if "output_index" in p} == {0}
    response = accumulate_responses(sent)
    assert [i.type for i in response.output] == ["message"] and response.output_text == VISIBLE
    assert (usage.output_tokens, usage.complete) == (OUTPUT_TOKENS, True)


def test_responses_stream_strip_logprobs_alone_keeps_reasoning_summary() -> None:
    sent = run(ResponsesStream(Usage(), Shaping(strip_logprobs=True)), typed_events(responses_events()))
    blob = b"\n\n".join(sent).decode()
    assert SUMMARY in blob and '"logprob"' not in blob
    assert accumulate_responses(sent).output_text == VISIBLE


def test_responses_stream_unshaped_is_identity() -> None:
    events = typed_events(responses_events(True))
    handler = ResponsesStream(Usage(), Shaping())
    assert all(handler.on_event(e) is e for e in events)


def test_responses_request_drops_encrypted_reasoning_and_summaries() -> None:
    body = {"model": "o4-mini", "input": "hi", "reasoning": {"effort": "high", "summary": "detailed"},
            "include": ["reasoning.encrypted_content", "message.output_text.logprobs"], "top_logprobs": 3}
    original = copy.deepcopy(body)
    view = RequestView(api=ApiFamily.OPENAI, route="responses", path="/v1/responses", method="POST",
                       headers={}, body=body)
    ADAPTER.read_request(ROUTES["responses"], body, view)
    assert ADAPTER.upstream_body(view, Shaping()) is None
    sent = ADAPTER.upstream_body(view, BOTH)
    assert sent is not None and body == original  # the client's body is not edited in place
    assert sent["include"] == [] and sent["reasoning"] == {"effort": "high"} and "top_logprobs" not in sent
