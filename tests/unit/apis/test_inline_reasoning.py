"""Inline reasoning (``<think> ... </think>`` in the answer's text) removed by shaping: the filter
alone (same output wherever the text is cut), then chat completions and completions, whole bodies
and streams, through the OpenAI adapter and the openai SDK's own stream accumulator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.apis.inline_reasoning import MAX_HELD_SPACE, InlineReasoning
from gateway.apis.openai import ChatStream, OpenAIAdapter
from gateway.apis.sse import event_data
from gateway.context import RequestView, Shaping, Usage

THINK = InlineReasoning()
TEMPLATE = InlineReasoning(opened_by_template=True)
STRIP = Shaping(strip_reasoning=True)
ADAPTER = OpenAIAdapter(THINK)
ROUTES = {r.name: r for r in ADAPTER.routes}

SECRET = "Let me think: two plus two, carry nothing"
ANSWER = "\n\nThe answer is 4 (<think> stays here).</think>"
SAMPLES = [
    f"<think>\n{SECRET}\n</think>{ANSWER}",
    f" \n\t<think>{SECRET}</think>{ANSWER}",  # whitespace first: it goes with the block
    f"{SECRET}\n</think>{ANSWER}",  # the template wrote <think>
    f"<think>{SECRET}",  # never closes (cut by max_tokens)
    "<think></think>",
    "<thi",  # the text ends inside what could have been the tag: it was text
    "  ",
    "<thinking>is not the tag</think> so nothing goes",
    f"No reasoning here <think>{SECRET}</think> later is left alone",
    "<think><think>nested</think>after</think>end",
    "<think>思考 ünïcode</think>答案 ✓",
    "<<think>x</think>",
    "",
]


def reference(text: str, tags: InlineReasoning) -> str:
    """What is removed, by definition (short leading whitespace: the filter's bound is tested apart)."""
    if tags.opened_by_template:
        at = text.find(tags.close)
        return "" if at < 0 else text[at + len(tags.close):]
    rest = text.lstrip()
    if not rest.startswith(tags.open):
        return text
    at = rest.find(tags.close, len(tags.open))
    return "" if at < 0 else rest[at + len(tags.close):]


def leaks(blob: str) -> bool:
    """Any 8 characters of the reasoning in what was sent."""
    return any(SECRET[k:k + 8] in blob for k in range(len(SECRET) - 7))


def fed(tags: InlineReasoning, pieces: list[str]) -> str:
    f = tags.filter()
    return "".join(f.feed(p) for p in pieces) + f.finish()


# -- the filter --------------------------------------------------------------------------------
@pytest.mark.parametrize("tags", [THINK, TEMPLATE], ids=["open", "template"])
@pytest.mark.parametrize("text", SAMPLES)
def test_strip_matches_the_definition(tags: InlineReasoning, text: str) -> None:
    assert tags.stripped(text) == reference(text, tags)


def test_what_is_kept() -> None:
    assert THINK.stripped(f"<think>\n{SECRET}\n</think>{ANSWER}") == ANSWER  # after the block: as it was
    assert THINK.stripped(f"\n <think>{SECRET}</think>x") == "x"
    assert THINK.stripped(f"Hi <think>{SECRET}</think>") == f"Hi <think>{SECRET}</think>"  # not leading
    assert THINK.stripped(f"<think>{SECRET}") == ""  # never closed: all of it was reasoning
    assert THINK.stripped("<thi") == "<thi" and THINK.stripped(" ") == " "
    assert TEMPLATE.stripped(f"{SECRET}</think>x</think>") == "x</think>"
    assert TEMPLATE.stripped("an answer without the closing tag") == ""  # documented: it was all inside
    custom = InlineReasoning(open="◁think▷", close="◁/think▷")
    assert custom.stripped(f"◁think▷{SECRET}◁/think▷Answer") == "Answer"


@pytest.mark.parametrize("tags", [THINK, TEMPLATE], ids=["open", "template"])
@pytest.mark.parametrize("text", SAMPLES)
def test_every_split_point_gives_the_same_output(tags: InlineReasoning, text: str) -> None:
    whole = tags.stripped(text)
    for i in range(len(text) + 1):
        assert fed(tags, [text[:i], text[i:]]) == whole, i
        for j in range(i, len(text) + 1):
            assert fed(tags, [text[:i], text[i:j], text[j:]]) == whole, (i, j)
    assert fed(tags, list(text)) == whole  # one character at a time
    assert fed(tags, ["", *text, ""]) == whole  # empty pieces change nothing


def test_what_the_filter_holds_is_bounded() -> None:
    f = THINK.filter()
    assert f.feed("<think>") == ""
    for _ in range(1000):
        assert f.feed(SECRET * 3) == ""
        assert len(f._held) < len(THINK.close)  # only a possible partial closing tag
    assert f.feed("</thi") == "" and f.feed("nk>rest") == "rest" and f.passing
    g = THINK.filter()
    assert g.feed("<th") == "" and g.feed("x") == "<thx" and g.passing  # not the tag: sent at once


def test_long_leading_whitespace_is_released_but_the_block_is_still_removed() -> None:
    space = " \n" * MAX_HELD_SPACE
    text = f"{space}<think>{SECRET}</think>Answer"
    assert THINK.stripped(text) == space + "Answer"
    for i in range(0, len(text) + 1, 7):
        assert fed(THINK, [text[:i], text[i:]]) == space + "Answer", i
    f = THINK.filter()
    assert f.feed(space) == space  # sent as it comes: holding it longer would be unbounded
    assert len(f._held) == 0
    short = " " * MAX_HELD_SPACE
    assert THINK.stripped(f"{short}<think>x</think>y") == "y"  # up to the bound it goes with the block


@pytest.mark.parametrize("bad", ["", " <think>", "<think> ", "x" * 33])
def test_tags_are_validated(bad: str) -> None:
    with pytest.raises(ValueError, match="tag of 1 to 32 characters"):
        InlineReasoning(open=bad)
    with pytest.raises(ValueError, match="close must be"):
        InlineReasoning(close=bad)


# -- through the adapter: whole bodies ---------------------------------------------------------
def chat_logprobs(token: str) -> dict[str, Any]:
    entry = {"token": token, "logprob": -0.1, "bytes": None, "top_logprobs": []}
    return {"content": [entry], "refusal": None}


def chat_body(contents: list[str], logprobs: bool = True) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "deepseek-r1",
        "choices": [{"index": i, "finish_reason": "stop", "message": {"role": "assistant", "content": c},
                     "logprobs": chat_logprobs(c) if logprobs else None}
                    for i, c in enumerate(contents)],
        "usage": {"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45},
    }


def test_chat_body_loses_the_leading_block_of_every_choice_and_its_logprobs() -> None:
    body = chat_body([SAMPLES[0], SAMPLES[1], "plain answer"])
    usage = Usage()
    ADAPTER.usage_from_body(ROUTES["chat.completions"], body, usage)
    assert ADAPTER.shape_body(ROUTES["chat.completions"], body, STRIP)
    assert SECRET not in json.dumps(body)
    completion = ChatCompletion.model_validate(body)
    assert [c.message.content for c in completion.choices] == [ANSWER, ANSWER, "plain answer"]
    assert [c.logprobs is None for c in completion.choices] == [True, True, False]  # untouched: kept
    assert completion.usage is not None and completion.usage.completion_tokens == 40
    assert usage.output_tokens == 40


def test_completions_body_text_loses_the_block() -> None:
    body: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "qwq",
                            "choices": [{"index": 0, "text": SAMPLES[2], "finish_reason": "stop",
                                         "logprobs": {"tokens": ["x"], "token_logprobs": [-0.1]}}]}
    assert OpenAIAdapter(TEMPLATE).shape_body(ROUTES["completions"], body, STRIP)
    completion = Completion.model_validate(body)
    assert completion.choices[0].text == ANSWER and completion.choices[0].logprobs is None


def test_bodies_are_untouched_without_the_setting_or_without_strip_reasoning() -> None:
    for adapter, shaping in ((OpenAIAdapter(), STRIP), (ADAPTER, Shaping(strip_logprobs=True)),
                             (ADAPTER, Shaping())):
        body = chat_body([SAMPLES[0]], logprobs=False)
        adapter.shape_body(ROUTES["chat.completions"], body, shaping)
        assert body["choices"][0]["message"]["content"] == SAMPLES[0]
    responses: dict[str, Any] = {"object": "response", "output": [
        {"type": "message", "content": [{"type": "output_text", "text": SAMPLES[0]}]}]}
    ADAPTER.shape_body(ROUTES["responses"], responses, STRIP)  # not an inline-reasoning route
    assert responses["output"][0]["content"][0]["text"] == SAMPLES[0]


# -- through the adapter: streams --------------------------------------------------------------
def chat_events(pieces: list[str], n: int = 1, logprobs: bool = True) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "deepseek-r1"}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **extra}).encode()

    events = [event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}]) for i in range(n)]
    for piece in pieces:
        for i in range(n):
            lp = chat_logprobs(piece) if logprobs else None
            events.append(event([{"index": i, "delta": {"content": piece}, "logprobs": lp,
                                  "finish_reason": None}]))
    events.append(event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": "stop"}
                         for i in range(n)]))
    events.append(event([], usage={"prompt_tokens": 5, "completion_tokens": 40, "total_tokens": 45}))
    return [*events, b"data: [DONE]"]


def stream_view(route: str, body: dict[str, Any] | None = None) -> RequestView:
    return RequestView(api=ADAPTER.family, route=route, path=ROUTES[route].path, method="POST", headers={},
                       body={"stream": True, **(body or {})}, stream=True)


def chat_handler(tags: InlineReasoning = THINK, shaping: Shaping = STRIP, usage: Usage | None = None) -> Any:
    view = stream_view("chat.completions", {"stream_options": {"include_usage": True}})
    return OpenAIAdapter(tags).stream_handler(ROUTES["chat.completions"], view, usage or Usage(), shaping)


def relay(handler: Any, events: list[bytes]) -> list[bytes]:
    sent = [handler.on_event(e) for e in events]
    handler.finish()
    return [s for s in sent if s is not None]


def accumulate(sent: list[bytes]) -> Any:
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for raw in sent:
        if raw != b"data: [DONE]":
            state.handle_chunk(ChatCompletionChunk.model_validate_json(event_data(raw)))
    return state.get_final_completion()


@pytest.mark.parametrize("tags", [THINK, TEMPLATE], ids=["open", "template"])
@pytest.mark.parametrize("text", [SAMPLES[0], SAMPLES[1], SAMPLES[2], SAMPLES[3], SAMPLES[5], SAMPLES[8]])
def test_chat_stream_split_at_every_offset_accumulates_to_the_stripped_text(tags: InlineReasoning,
                                                                          text: str) -> None:
    expected = tags.stripped(text)
    for i in range(len(text) + 1):
        usage = Usage()
        sent = relay(chat_handler(tags, usage=usage), chat_events([text[:i], text[i:]], n=2))
        final = accumulate(sent)
        assert [c.message.content or "" for c in final.choices] == [expected, expected], i
        assert [c.finish_reason for c in final.choices] == ["stop", "stop"]
        if expected != text:
            assert not leaks(b"".join(sent).decode()), i
        assert final.usage is not None and final.usage.completion_tokens == 40  # as the upstream said
        assert (usage.output_tokens, usage.complete) == (40, True)


def test_chat_stream_drops_emptied_deltas_keeps_role_finish_and_usage_and_nulls_logprobs() -> None:
    pieces = ["<thi", "nk>\n", "Let", " me", " think", "\n</th", "ink>\n\n", "The", " answer"]
    sent = relay(chat_handler(), chat_events(pieces))
    chunks = [json.loads(event_data(s)) for s in sent[:-1]]
    deltas = [c["choices"][0]["delta"] if c["choices"] else None for c in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "\n\n"}, {"content": "The"},
                      {"content": " answer"}, {}, None]
    assert chunks[1]["choices"][0]["logprobs"] is None  # the piece that held "ink>": its logprobs too
    assert chunks[2]["choices"][0]["logprobs"]["content"][0]["token"] == "The"  # past the block: kept
    assert chunks[-1]["usage"]["completion_tokens"] == 40 and sent[-1] == b"data: [DONE]"


def test_chat_stream_settles_held_text_with_the_finish_reason() -> None:
    # The text ended on what could have been the start of the tag: it was text after all.
    sent = relay(chat_handler(), chat_events([" ", "<th"]))
    assert accumulate(sent).choices[0].message.content == " <th"


def test_chat_stream_cut_inside_the_block_sends_nothing_of_it() -> None:
    events = chat_events(["<think>", SECRET, " still"])[:-3]  # no finish, no usage, no [DONE]
    sent = relay(chat_handler(), events)
    assert SECRET not in b"".join(sent).decode() and len(sent) == 1  # the role chunk only


def test_chat_stream_reasoning_fields_and_inline_block_both_go() -> None:
    events = chat_events(["<think>", "x</think>", "Answer"])
    raw = json.loads(event_data(events[1]))
    raw["choices"][0]["delta"]["reasoning_content"] = SECRET
    events[1] = b"data: " + json.dumps(raw).encode()
    sent = relay(chat_handler(), events)
    assert SECRET not in b"".join(sent).decode()
    assert accumulate(sent).choices[0].message.content == "Answer"


def test_stream_fast_path_is_unchanged_without_the_setting_or_strip_reasoning() -> None:
    events = chat_events(["<think>", SECRET, "</think>", "Answer"])
    for tags, shaping in ((None, STRIP), (THINK, Shaping(strip_logprobs=True)), (THINK, Shaping())):
        view = stream_view("chat.completions")
        handler = OpenAIAdapter(tags).stream_handler(ROUTES["chat.completions"], view, Usage(), shaping)
        assert isinstance(handler, ChatStream) and handler._inline is None  # no filter, no per-event work
    unshaped = chat_handler(shaping=Shaping())
    assert all(unshaped.on_event(e) is e for e in events[:-2])  # the relay may resend the bytes as-is
    assert unshaped.on_chunk(b"\n\n".join(events[1:3]) + b"\n\n")  # the zero-copy path stays open


def completion_events(pieces: list[str]) -> list[bytes]:
    """One delta per piece, each with legacy logprobs naming it as one token at its offset into the
    choice's whole text (``text_offset``, as vLLM and OpenAI send them)."""
    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "qwq"}
    starts = [sum(len(p) for p in pieces[:k]) for k in range(len(pieces))]
    events = [b"data: " + json.dumps({**base, "choices": [
        {"index": 0, "text": p, "finish_reason": None,
         "logprobs": {"tokens": [p], "token_logprobs": [-0.1], "top_logprobs": [{p: -0.1}],
                      "text_offset": [at]}}]
    }).encode() for p, at in zip(pieces, starts, strict=True)]
    events.append(b"data: " + json.dumps({**base, "choices": [
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}]}).encode())
    return [*events, b"data: [DONE]"]


@pytest.mark.parametrize("tags", [THINK, TEMPLATE], ids=["open", "template"])
def test_completions_stream_split_at_every_offset(tags: InlineReasoning) -> None:
    text = SAMPLES[0] if not tags.opened_by_template else SAMPLES[2]
    view = stream_view("completions")
    for i in range(len(text) + 1):
        handler = OpenAIAdapter(tags).stream_handler(ROUTES["completions"], view, Usage(), STRIP)
        sent = relay(handler, completion_events([p for p in (text[:i], text[i:]) if p]))
        # The SDK builds stream chunks without validation (finish_reason is null mid-stream).
        choices = [json.loads(event_data(s))["choices"][0] for s in sent[:-1]]
        assert "".join(c["text"] for c in choices) == ANSWER, i
        assert all(c["text"] or c["finish_reason"] for c in choices)  # emptied ones are dropped
        # Logprobs stay only where the text went out as it came (they name the tokens).
        assert all(c["logprobs"]["tokens"] == [c["text"]] for c in choices if c["logprobs"])
        assert not leaks(b"".join(sent).decode()), i
        assert choices[-1]["finish_reason"] == "stop" and sent[-1] == b"data: [DONE]"


def completions_offsets(tags: InlineReasoning, pieces: list[str]) -> tuple[str, list[tuple[int, str]]]:
    """The text a client reads from a completions stream of ``pieces`` stripped by ``tags``, and
    every (text_offset, token) its logprobs still carry."""
    view = stream_view("completions")
    handler = OpenAIAdapter(tags).stream_handler(ROUTES["completions"], view, Usage(), STRIP)
    sent = relay(handler, completion_events(pieces))[:-1]
    choices = [json.loads(event_data(s))["choices"][0] for s in sent]
    named = [(at, token) for c in choices if c["logprobs"]
             for at, token in zip(c["logprobs"]["text_offset"], c["logprobs"]["tokens"], strict=True)]
    return "".join(c["text"] for c in choices), named


@pytest.mark.parametrize("tags", [THINK, TEMPLATE], ids=["open", "template"])
@pytest.mark.parametrize("text", SAMPLES)
def test_completions_text_offsets_point_into_the_stripped_text(tags: InlineReasoning, text: str) -> None:
    """Wherever the text is cut, each token a later delta keeps is found at its text_offset in what
    the client reads: the offsets no longer count the removed block."""
    expected = tags.stripped(text)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            # Three pieces, the last one whole: it lies past the block for most cuts.
            pieces = [p for p in (text[:i], text[i:j], text[j:]) if p]
            read, named = completions_offsets(tags, pieces)
            assert read == expected, (i, j)
            for at, token in named:
                assert read[at:at + len(token)] == token, (i, j, at, token)
            before = tags.filter()
            before.feed("".join(pieces[:-1]))
            if len(pieces) > 1 and before.passing:  # the last piece went out as it came
                assert named[-1] == (len(read) - len(pieces[-1]), pieces[-1]), (i, j)


def test_completions_offsets_past_the_block_are_lowered_by_what_was_removed() -> None:
    block = f"<think>{SECRET}</think>"
    read, named = completions_offsets(THINK, ["  ", block, "The", " answer"])
    assert read == "The answer"
    assert named == [(0, "The"), (3, " answer")]  # were len(block) + 2 and + 5
    # One character at a time: every delta past the block keeps its logprobs, shifted.
    read, named = completions_offsets(THINK, list(SAMPLES[1]))
    assert read == ANSWER and named == list(enumerate(ANSWER))
    f = THINK.filter()
    assert (f.feed("  <think>x</th"), f.removed) == ("", 14)  # the held tail counts: it goes too
    assert (f.feed("ink>y"), f.removed, f.passing) == ("y", 18, True)
    g = THINK.filter()
    assert (g.feed(" <th"), g.removed) == ("", 0)  # may still be text
    assert (g.feed("e answer"), g.removed) == (" <the answer", 0)
