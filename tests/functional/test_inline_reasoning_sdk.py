"""Reasoning written inline in the answer (``<think> ... </think>``, an open-weight model served
without a reasoning parser) through the whole gateway: the mock upstream answers that way
(``x-mock-inline-reasoning``, its tags cut across deltas), an upstream with ``inline_reasoning``
and a degrade rule with ``strip_reasoning`` only; the official openai SDK reads the answers,
streamed (its accumulator) and not, and the raw bytes carry nothing of the reasoning, its
logprobs included. Usage stays as the upstream reported it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai

from gateway.upstream.mock.options import HEADER_INLINE_REASONING
from gateway.upstream.mock.text import mock_text, words
from gateway.upstream.mock_server import MockServer
from tests.conftest import GatewayFactory
from tests.functional.test_shaping_sdk import last_output_tokens, raw_post
from tests.support.gateway import CLIENT_KEY, RunningGateway

STRIP_REASONING_ONLY = """\
version: 1
rules:
  - id: degrade-everyone
    when: {field: principal.authenticated, equals: true}
    friction:
      degrade: {strip_reasoning: true}
"""
MESSAGES: Any = [{"role": "user", "content": "what is 2 + 2?"}]
CHUNKS = 6  # the mock_upstream fixture's: 6 reasoning and 6 content tokens per choice
REASONING_WORDS = [w.strip() for w in words(CHUNKS, reasoning=True)]


def answer(choice: int = 0) -> str:
    """What a degraded account reads: the text after ``</think>`` as the model wrote it."""
    return "\n\n" + mock_text(CHUNKS, choice)


def assert_no_reasoning(blob: bytes | str) -> None:
    text = blob.decode() if isinstance(blob, bytes) else blob
    for marker in ("Considering", "answering", "briefly", "<think", "think>", "<thi", "</th"):
        assert marker not in text, (marker, text[:1500])


@asynccontextmanager
async def gateway(start: GatewayFactory, mock: MockServer, tmp: Path, upstream_extra: str,
                  degrade: bool = True) -> AsyncIterator[RunningGateway]:
    extra = ""
    if degrade:
        directory = tmp / "pol"
        directory.mkdir(exist_ok=True)
        (directory / "rules.yaml").write_text(STRIP_REASONING_ONLY)
        extra = f"policies: {{dir: {directory}, watch: false}}\n"
    async with start(mock.url, extra, upstream_extra=upstream_extra) as gw:
        yield gw


def client(gw: RunningGateway, mode: str = "open") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0,
                              default_headers={HEADER_INLINE_REASONING: mode})


async def test_chat_answers_lose_the_inline_block_streamed_or_not(
        mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path) -> None:
    async with gateway(start_gateway, mock_upstream, tmp_path, "inline_reasoning: true") as gw:
        async with client(gw) as c:
            created = await c.chat.completions.create(model="deepseek-r1", messages=MESSAGES)
            assert await last_output_tokens(gw) == 2 * CHUNKS  # billed: reasoning and answer
            async with c.chat.completions.stream(model="deepseek-r1", messages=MESSAGES, n=2, logprobs=True,
                                                 top_logprobs=2) as stream:
                final = await stream.get_final_completion()
            assert await last_output_tokens(gw) == 2 * 2 * CHUNKS
        assert created.choices[0].message.content == answer()
        assert created.usage is not None and created.usage.completion_tokens == 2 * CHUNKS
        assert [ch.message.content for ch in final.choices] == [answer(0), answer(1)]
        # The answer's own logprobs survive; those of the pieces that held reasoning do not.
        for index, choice in enumerate(final.choices):
            assert choice.logprobs is not None and choice.logprobs.content is not None
            tokens = [t.token for t in choice.logprobs.content]
            assert tokens == list(words(CHUNKS, offset=index * 3)), tokens
        headers = {HEADER_INLINE_REASONING: "open"}
        for stream_it in (False, True):
            body = {"model": "deepseek-r1", "messages": MESSAGES, "stream": stream_it, "logprobs": True,
                    "top_logprobs": 3, "n": 2}
            assert_no_reasoning(await raw_post(gw, "/v1/chat/completions", body, **headers))


async def test_template_opened_block_only_closing_tag_comes_back(
        mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path) -> None:
    extra = "inline_reasoning: {opened_by_template: true}"
    async with gateway(start_gateway, mock_upstream, tmp_path, extra) as gw, client(gw, "template") as c:
        created = await c.chat.completions.create(model="qwq", messages=MESSAGES)
        async with c.chat.completions.stream(model="qwq", messages=MESSAGES) as stream:
            final = await stream.get_final_completion()
        assert created.choices[0].message.content == final.choices[0].message.content == answer()
        body = {"model": "qwq", "messages": MESSAGES, "stream": True}
        assert_no_reasoning(await raw_post(gw, "/v1/chat/completions", body,
                                           **{HEADER_INLINE_REASONING: "template"}))


async def test_cut_inside_the_block_sends_none_of_it(
        mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path) -> None:
    extra = "inline_reasoning: true"
    async with gateway(start_gateway, mock_upstream, tmp_path, extra) as gw, client(gw) as c:
        # max_tokens ends the answer inside the block: the closing tag never comes.
        created = await c.chat.completions.create(model="r1", messages=MESSAGES, max_tokens=3)
        # (the SDK's stream helper refuses a "length" finish: the chunks are read as they come)
        chunks = [chunk async for chunk in await c.chat.completions.create(
            model="r1", messages=MESSAGES, max_tokens=3, stream=True)]
    assert created.choices[0].message.content == "" and created.choices[0].finish_reason == "length"
    assert [(ch.choices[0].delta.role, ch.choices[0].delta.content, ch.choices[0].finish_reason)
            for ch in chunks] == [("assistant", "", None), (None, None, "length")]


async def test_completions_text_loses_the_block_streamed_or_not(
        mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path) -> None:
    extra = "inline_reasoning: true"
    async with gateway(start_gateway, mock_upstream, tmp_path, extra) as gw, client(gw) as c:
        created = await c.completions.create(model="r1", prompt="2 + 2 =", max_tokens=64)
        assert created.choices[0].text == answer()
        pieces = []
        streamed = await c.completions.create(model="r1", prompt="2 + 2 =", max_tokens=64, stream=True)
        async for chunk in streamed:
            assert chunk.choices[0].text or chunk.choices[0].finish_reason  # emptied events are dropped
            pieces.append(chunk.choices[0].text)
        assert "".join(pieces) == answer()
        assert await last_output_tokens(gw) == 2 * CHUNKS
        # With logprobs, each token kept past the block is at its text_offset in the text read.
        named: list[tuple[int, str]] = []
        pieces = []
        streamed = await c.completions.create(model="r1", prompt="2 + 2 =", max_tokens=64, stream=True,
                                              logprobs=1)
        async for chunk in streamed:
            lp = chunk.choices[0].logprobs
            if lp is not None:
                named += zip(lp.text_offset or [], lp.tokens or [], strict=True)
            pieces.append(chunk.choices[0].text)
        text = "".join(pieces)
        assert text == answer() and named
        assert all(text[at:at + len(token)] == token for at, token in named), (named, text)
        body = {"model": "r1", "prompt": "2 + 2 =", "stream": True, "logprobs": 2}
        assert_no_reasoning(await raw_post(gw, "/v1/completions", body, **{HEADER_INLINE_REASONING: "open"}))


async def test_without_degrade_or_without_the_setting_the_text_is_untouched(
        mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path) -> None:
    full = "<think>\n" + "".join(words(CHUNKS, reasoning=True)) + "\n</think>" + answer()
    # The setting alone changes nothing: only shaping that strips reasoning uses it.
    async with gateway(start_gateway, mock_upstream, tmp_path, "inline_reasoning: true", degrade=False) as gw:
        async with client(gw) as c:
            created = await c.chat.completions.create(model="r1", messages=MESSAGES)
            async with c.chat.completions.stream(model="r1", messages=MESSAGES) as stream:
                final = await stream.get_final_completion()
    assert created.choices[0].message.content == final.choices[0].message.content == full
    # A degrade without the setting strips reasoning fields only: the inline block gets through.
    async with gateway(start_gateway, mock_upstream, tmp_path, "") as gw, client(gw) as c:
        created = await c.chat.completions.create(model="r1", messages=MESSAGES)
    assert created.choices[0].message.content == full
    assert all(w in full for w in REASONING_WORDS)
