"""Reasoning written inline in an OpenAI-compatible answer: ``<think> ... </think>`` before the text.

Open-weight reasoning models served without a reasoning parser (DeepSeek-R1 on vLLM or SGLang,
QwQ, many Ollama and llama.cpp deployments) put their chain of thought in ``message.content`` /
``delta.content`` (``text`` on /v1/completions) instead of a ``reasoning_content`` field. When the
chat template already wrote the opening tag, the text starts inside the block and holds only the
closing one. An upstream declares its tags (``upstreams[].inline_reasoning``, see
docs/configuration.md) and response shaping with ``strip_reasoning`` removes the leading block.

What is removed, for one choice's text:
- without ``opened_by_template``: a block at the very start, optionally after whitespace (which
  goes with it), up to and including the first closing tag; text that does not start that way is
  never touched;
- with ``opened_by_template``: everything up to and including the first closing tag;
- what follows the closing tag is never altered; a block that never closes (the text ends inside
  it) was all reasoning, and nothing of it is sent.

:class:`InlineReasoningFilter` does this over text that arrives in pieces cut anywhere (a delta may
end with ``<thi`` and the next begin with ``nk>``): it holds back only what could still be the
start of the answer's first tag (leading whitespace up to a bound, and a partial opening tag) or a
partial closing tag, so its memory is bounded whatever the stream. The output does not depend on
where the text was cut: ``feed`` of the pieces then ``finish`` gives the same string as
``stripped`` of the whole text. :attr:`InlineReasoningFilter.removed` counts the characters taken
out, by which offsets into the text that come later (completions ``logprobs.text_offset``) shift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Tags are short markers; the bound keeps what a filter holds back small.
MAX_TAG_CHARS: Final = 32
# Leading whitespace held back while the opening tag may still follow (it is dropped with the
# block). Past this it is sent as it comes and the filter keeps looking for the tag, so a model
# led to emit a long run of blank lines first does not get its reasoning through.
MAX_HELD_SPACE: Final = 256


@dataclass(frozen=True, slots=True)
class InlineReasoning:
    """An upstream's inline reasoning tags (``upstreams[].inline_reasoning``).

    open:               the opening tag, e.g. ``<think>``
    close:              the closing tag, e.g. ``</think>``
    opened_by_template: the chat template already wrote ``open`` into the prompt, so an answer
                        starts inside the block and holds only ``close`` (everything up to the
                        first ``close`` is reasoning)
    """

    open: str = "<think>"
    close: str = "</think>"
    opened_by_template: bool = False

    def __post_init__(self) -> None:
        for name, tag in (("open", self.open), ("close", self.close)):
            if not tag or len(tag) > MAX_TAG_CHARS or tag != tag.strip():
                raise ValueError(f"{name} must be a tag of 1 to {MAX_TAG_CHARS} characters without "
                                 f"leading or trailing whitespace, got {tag!r}")

    def filter(self) -> InlineReasoningFilter:
        """A filter for one choice's text."""
        return InlineReasoningFilter(self)

    def stripped(self, text: str) -> str:
        """``text`` without its leading reasoning block (a whole, non-streamed answer)."""
        f = InlineReasoningFilter(self)
        return f.feed(text) + f.finish()


_BEFORE: Final = 0  # the text so far is whitespace and maybe part of the opening tag
_INSIDE: Final = 1  # inside the block: dropped until the closing tag
_AFTER: Final = 2  # past the block, or the text does not start with one: sent as it comes


class InlineReasoningFilter:
    """The leading reasoning block of one choice's text, removed piece by piece (see the module)."""

    __slots__ = ("_open", "_close", "_state", "_held", "_released", "_fed", "_sent")

    def __init__(self, tags: InlineReasoning) -> None:
        self._open = tags.open
        self._close = tags.close
        self._state = _INSIDE if tags.opened_by_template else _BEFORE
        # _BEFORE: leading whitespace not sent yet, then a prefix of the opening tag;
        # _INSIDE: the block's last characters, which may begin the closing tag.
        self._held = ""
        self._released = False  # leading whitespace went past MAX_HELD_SPACE and was sent
        # Characters fed and sent until the text passes (counting stops then: nothing more is
        # removed, and the passing path stays a bare return).
        self._fed = 0
        self._sent = 0

    @property
    def passing(self) -> bool:
        """Nothing more will be removed: the rest of the text goes out unchanged."""
        return self._state == _AFTER

    @property
    def removed(self) -> int:
        """Characters of the text fed so far that are not sent and never will be (the block, and
        the whitespace before it): what an offset into the text past them must be lowered by."""
        # Before the block, what is held may still be sent; inside it, what is held is dropped.
        return 0 if self._state == _BEFORE else self._fed - self._sent

    def feed(self, text: str) -> str:
        """The part of the text to send now for the next piece ``text``."""
        state = self._state
        if state == _AFTER:
            return text
        out = self._inside(text) if state == _INSIDE else self._before(text)
        self._fed += len(text)
        self._sent += len(out)
        return out

    def finish(self) -> str:
        """The text ended: what was held back and turned out not to be reasoning."""
        held, self._held = self._held, ""
        state, self._state = self._state, _AFTER
        # Before: whitespace or a partial tag that never completed, which is text. Inside: the
        # block never closed, so it was all reasoning.
        out = held if state == _BEFORE else ""
        self._sent += len(out)
        return out

    def _before(self, text: str) -> str:
        held = self._held + text
        rest = held.lstrip()
        space = held[: len(held) - len(rest)]
        out = ""
        if self._released or len(space) > MAX_HELD_SPACE:
            self._released = True
            out, space = space, ""
        if not rest:
            self._held = space
            return out
        opener = self._open
        if rest.startswith(opener):
            self._state = _INSIDE
            self._held = ""
            return out + self._inside(rest[len(opener):])
        if opener.startswith(rest):
            self._held = space + rest  # the tag may still complete
            return out
        self._state = _AFTER  # not a reasoning block: the answer itself
        self._held = ""
        return out + space + rest

    def _inside(self, text: str) -> str:
        held = self._held + text
        close = self._close
        at = held.find(close)
        if at >= 0:
            self._state = _AFTER
            self._held = ""
            return held[at + len(close):]
        keep = len(close) - 1
        self._held = held[len(held) - keep:] if len(held) > keep else held
        return ""
