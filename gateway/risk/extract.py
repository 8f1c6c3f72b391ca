"""What the risk signals read from a request body: instruction and user text, turn count.

Never logged or audited: the text lives only for the duration of the risk stage. Cost: a walk
over the message list, ``O(messages)``; text is capped at ``max_chars`` (newest user turn first,
then the system/instructions) so a huge prompt costs no more than a normal one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.context import ApiFamily, RequestView

DEFAULT_MAX_CHARS = 8192


@dataclass(frozen=True, slots=True)
class PromptText:
    """``system``: system/developer/instructions text; ``user``: the newest user turn;
    ``user_turns``: how many user turns the conversation holds (1 = single-turn)."""

    system: str
    user: str
    user_turns: int

    @property
    def combined(self) -> str:
        return f"{self.system}\n{self.user}" if self.system else self.user


EMPTY = PromptText("", "", 0)


def _content_text(content: Any, limit: int) -> str:
    """Text of an OpenAI/Anthropic ``content``: a string or a list of typed parts."""
    if isinstance(content, str):
        return content[:limit]
    if not isinstance(content, list):
        return ""
    parts: list[str] = []
    size = 0
    for part in content:
        if isinstance(part, dict):
            text = part.get("text")
            if isinstance(text, str):  # text / input_text / output_text parts
                parts.append(text[: limit - size])
                size += len(parts[-1])
                if size >= limit:
                    break
        elif isinstance(part, str):
            parts.append(part[: limit - size])
            size += len(parts[-1])
    return "\n".join(parts)


def _from_messages(messages: Any, system: str, limit: int) -> PromptText:
    if not isinstance(messages, list):
        return PromptText(system, "", 0)
    user = ""
    turns = 0
    sys_parts = [system] if system else []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role")
        if role == "user":
            turns += 1
            user = message.get("content")  # type: ignore[assignment]
        elif role in ("system", "developer") and len(sys_parts) < 4:
            sys_parts.append(_content_text(message.get("content"), limit))
    return PromptText("\n".join(sys_parts)[:limit], _content_text(user, limit), turns)


def extract_prompt(view: RequestView, max_chars: int = DEFAULT_MAX_CHARS) -> PromptText:
    """System and newest user text of an OpenAI chat/responses/completions or Anthropic body."""
    body = view.body
    if not isinstance(body, dict):
        return EMPTY
    if view.api is ApiFamily.ANTHROPIC:
        return _from_messages(body.get("messages"), _content_text(body.get("system"), max_chars), max_chars)
    route = view.route
    if route == "chat.completions":
        return _from_messages(body.get("messages"), "", max_chars)
    if route == "responses":
        instructions = body.get("instructions")
        system = instructions[:max_chars] if isinstance(instructions, str) else ""
        given = body.get("input")
        if isinstance(given, str):
            return PromptText(system, given[:max_chars], 1)
        return _from_messages(given, system, max_chars)
    if route == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
        return PromptText("", prompt[:max_chars] if isinstance(prompt, str) else "", 1)
    return EMPTY
