"""Deterministic text, token counts and logprobs for the mock upstream.

A "token" here is one whitespace-separated word: input tokens are the words of the prompt text,
output tokens are the deltas the mock emits (one word each). That makes every usage figure
predictable in tests without a real tokenizer.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

_CONTENT_WORDS: Final = (
    "Tollgate", "mock", "reply", "streams", "tokens", "through", "the", "gateway", "and", "counts",
    "every", "word", "it", "sends", "back", "to", "you",
)  # fmt: skip
_REASONING_WORDS: Final = (
    "Considering", "the", "request", "step", "by", "step", "before", "answering", "briefly",
)  # fmt: skip
# Keys whose string values are prompt text in either API family (message content, system,
# instructions, prompt, embedding input, thinking blocks sent back); ids, roles and types are not.
_TEXT_KEYS: Final = frozenset({"content", "text", "thinking", "input", "prompt", "system", "instructions"})


def words(count: int, offset: int = 0, reasoning: bool = False) -> tuple[str, ...]:
    """``count`` tokens; all but the first carry a leading space so ``"".join`` reads naturally."""
    vocab = _REASONING_WORDS if reasoning else _CONTENT_WORDS
    return tuple((" " if i else "") + vocab[(offset + i) % len(vocab)] for i in range(count))


def mock_text(count: int, choice: int = 0) -> str:
    """The content the mock produces for ``count`` tokens of choice ``choice`` (for assertions)."""
    return "".join(words(count, offset=choice * 3))


def count_text_tokens(text: str) -> int:
    return len(text.split())


def _count(value: Any, key: str | None) -> int:
    if isinstance(value, str):
        return count_text_tokens(value) if key in _TEXT_KEYS else 0
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):  # pre-tokenized prompt / embedding input
        return 1 if key in _TEXT_KEYS else 0
    if isinstance(value, list):
        return sum(_count(v, key) for v in value)
    if isinstance(value, dict):
        return sum(_count(v, k) for k, v in value.items())
    return 0


def count_input_tokens(body: dict[str, Any], fields: tuple[str, ...]) -> int:
    """Words of prompt text under ``fields`` of a request body (at least 1, as real APIs bill)."""
    total = sum(_count(body[f], f if f != "messages" else None) for f in fields if f in body)
    return max(1, total)


@dataclass(frozen=True, slots=True)
class ChoicePlan:
    reasoning: tuple[str, ...]
    content: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one request will produce: per choice, reasoning tokens then content tokens."""

    input_tokens: int
    choices: tuple[ChoicePlan, ...]
    truncated: bool  # the token limit cut the output short

    @property
    def reasoning_tokens(self) -> int:
        return sum(len(c.reasoning) for c in self.choices)

    @property
    def output_tokens(self) -> int:
        return sum(len(c.reasoning) + len(c.content) for c in self.choices)


def plan_output(*, input_tokens: int, chunks: int, limit: int | None, n: int = 1, reasoning: int = 0) -> Plan:
    """Plan ``n`` choices of ``reasoning`` reasoning tokens and ``chunks`` content tokens, cut to
    ``limit`` output tokens per choice (reasoning counts against the limit, as with the real APIs)."""
    choices: list[ChoicePlan] = []
    truncated = False
    for index in range(n):
        r, c = reasoning, chunks
        if limit is not None:
            r = min(r, limit)
            c = min(c, limit - r)
            truncated = truncated or (r + c) < (reasoning + chunks)
        choices.append(
            ChoicePlan(reasoning=words(r, offset=index, reasoning=True), content=words(c, offset=index * 3))
        )
    return Plan(input_tokens=input_tokens, choices=tuple(choices), truncated=truncated)


def logprob(position: int) -> float:
    return -round(0.01 + 0.05 * (position % 7), 4)


def chat_logprob(token: str, position: int, top: int) -> dict[str, Any]:
    """One ``ChatCompletionTokenLogprob``; the chosen token leads its own ``top_logprobs``."""
    alternatives = [token] + [f"{token.strip()}_{k}" for k in range(1, top)]
    return {
        "token": token,
        "logprob": logprob(position),
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": alt, "logprob": logprob(position) - k, "bytes": list(alt.encode())}
            for k, alt in enumerate(alternatives[:top])
        ],
    }


def embedding(text: str, dims: int) -> list[float]:
    """A unit vector derived from the text's SHA-256, so equal inputs embed equally."""
    values: list[float] = []
    counter = 0
    while len(values) < dims:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    vector = values[:dims]
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vector]


def embedding_base64(vector: list[float]) -> str:
    """The ``encoding_format: base64`` form: little-endian float32, as the openai SDK decodes it."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def signature(text: str) -> str:
    """A stable opaque stand-in for Anthropic's thinking-block signature."""
    return base64.b64encode(hashlib.sha256(text.encode()).digest() * 2).decode()


def iter_embedding_inputs(value: Any) -> Iterator[str]:
    """Normalise ``input`` (str, list[str], list[int], list[list[int]]) to one string per item."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        yield " ".join(str(v) for v in value)
    elif isinstance(value, list):
        for item in value:
            yield item if isinstance(item, str) else " ".join(str(v) for v in item)
