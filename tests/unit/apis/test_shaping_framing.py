"""Shaping holds whatever the framing: events split across chunks at every byte, CRLF or CR line
ends, ``data:`` without its space, JSON spread over several ``data:`` lines. Chunks go through the
relay's own ``Forwarder._events_out`` (fast path included) and the result is decoded with the
openai SDK's SSE decoder, as a client would."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from openai._streaming import SSEDecoder

from gateway.apis.anthropic import MessagesStream
from gateway.apis.base import StreamHandler
from gateway.apis.openai import ChatStream
from gateway.apis.openai_responses import ResponsesStream
from gateway.apis.sse import SseSplitter
from gateway.context import NO_SHAPING, Shaping, Usage
from gateway.stages.forward import Forwarder
from tests.unit.apis.test_shaping_payloads import (
    OUTPUT_TOKENS,
    VISIBLE,
    assert_clean,
    chat_chunks,
    messages_events,
    responses_events,
    sse,
)

BOTH = Shaping(strip_reasoning=True, strip_logprobs=True)
Make = Callable[[Shaping, Usage], StreamHandler]


def chat_body() -> bytes:
    return sse([(None, c) for c in chat_chunks(n=2)], done=True)


def responses_body() -> bytes:
    return sse(list(responses_events(with_text=True)))


def messages_body() -> bytes:
    return sse(list(messages_events()))


STREAMS: dict[str, tuple[Callable[[], bytes], Make]] = {
    "chat": (chat_body, lambda s, u: ChatStream(u, s, hide_usage=True)),
    "responses": (responses_body, lambda s, u: ResponsesStream(u, s)),
    "messages": (messages_body, lambda s, u: MessagesStream(u, s)),
}


def crlf(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r\n")


def bare_cr(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r")


def no_space(body: bytes) -> bytes:
    return body.replace(b"data: ", b"data:").replace(b"event: ", b"event:")


def multi_line(body: bytes) -> bytes:
    """Every JSON value over several ``data:`` lines (split after each comma: still valid JSON)."""
    return body.replace(b",", b",\ndata: ")


FRAMINGS: dict[str, Callable[[bytes], bytes]] = {
    "lf": lambda b: b, "crlf": crlf, "cr": bare_cr, "no-space": no_space, "multi-line": multi_line,
}


def relay(body: bytes, handler: StreamHandler, cuts: list[int]) -> tuple[bytes, list[bytes]]:
    """What the relay writes for ``body`` arriving in pieces cut at ``cuts``."""
    splitter = SseSplitter()
    out: list[bytes] = []
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    for piece in pieces:
        data, _ = Forwarder._events_out(splitter, handler, piece)
        out.append(data)
    assert not splitter.pending  # terminated streams leave no tail
    handler.finish()
    return b"".join(out), out


def client_view(sent: bytes) -> list[Any]:
    """The JSON payloads an SDK decodes from ``sent``."""
    events = SSEDecoder().iter_bytes(iter([sent]))
    return [json.loads(e.data) for e in events if e.data and e.data != "[DONE]"]


def visible_text(kind: str, payloads: list[Any]) -> str:
    if kind == "chat":
        return "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads
                       if p["choices"] and p["choices"][0]["index"] == 0)
    if kind == "responses":
        return "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta")
    return "".join(p["delta"]["text"] for p in payloads if p["type"] == "content_block_delta"
                   and p["delta"]["type"] == "text_delta")


@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("kind", list(STREAMS))
def test_no_leak_whatever_the_chunking(kind: str, framing: str) -> None:
    build, make = STREAMS[kind]
    body = FRAMINGS[framing](build())
    sizes = [1, 2, 3, 5, 13, 64, 257, 4096, len(body)]
    for size in sizes:
        usage = Usage()
        sent, _ = relay(body, make(BOTH, usage), list(range(size, len(body), size)))
        assert_clean(sent)
        assert visible_text(kind, client_view(sent)) == VISIBLE, (size, sent[:300])
        assert usage.output_tokens == OUTPUT_TOKENS, size


@pytest.mark.parametrize("kind", list(STREAMS))
def test_no_leak_with_one_cut_anywhere(kind: str) -> None:
    build, make = STREAMS[kind]
    body = crlf(build())
    for cut in range(1, len(body)):
        sent, _ = relay(body, make(BOTH, Usage()), [cut])
        assert_clean(sent)


@pytest.mark.parametrize("kind", list(STREAMS))
def test_unshaped_whole_chunks_leave_as_received(kind: str) -> None:
    build, make = STREAMS[kind]
    if kind == "chat":  # a client that asked for the usage chunk: nothing to hide
        make = lambda s, u: ChatStream(u, s, hide_usage=False)  # noqa: E731
    body = build()
    events = body.split(b"\n\n")[:-1]
    # Chunks of whole events, as upstreams usually send them: the relay's output is the chunk itself.
    chunks = [b"".join(e + b"\n\n" for e in events[i:i + 3]) for i in range(0, len(events), 3)]
    cuts = list(__import__("itertools").accumulate(len(c) for c in chunks))[:-1]
    sent, pieces = relay(body, make(NO_SHAPING, Usage()), cuts)
    assert sent == body
    for piece, chunk in zip(pieces, chunks, strict=True):
        assert piece is chunk or piece == chunk  # fast path (is) or untouched resend (==)
    fast = make(NO_SHAPING, Usage())
    assert any(fast.on_chunk(c) for c in chunks)  # ... and most take the fast path
    shaped = make(BOTH, Usage())
    assert not any(shaped.on_chunk(c) for c in chunks)  # never while shaping


def test_a_cr_that_ends_a_blank_line_completes_the_event_at_once() -> None:
    # Held back, the last event of a CR-framed stream was left to the relay's raw tail, unshaped.
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\r\r") == [b"data: a"] and not splitter.pending
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\r\n\r") == [b"data: a"]
    assert splitter.feed(b"\ndata: b\r\n\r\n") == [b"data: b"]  # the LF of that CRLF is not a line
    splitter = SseSplitter()
    assert splitter.feed(b"data: a\r") == [] and splitter.pending  # maybe half a CRLF: wait
    assert splitter.feed(b"\n\r\n") == [b"data: a"]
