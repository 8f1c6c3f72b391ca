"""The per-request input handed to the API-family builders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class BadRequest(ValueError):
    """The request body is invalid for this endpoint (answered with a 400 in the API's shape)."""


@dataclass(frozen=True, slots=True)
class Call:
    request_id: str
    seq: int
    created: int  # unix seconds
    chunks: int
    body: dict[str, Any]
    # OpenAI answers reason inline in their text: "open" | "template" (mock.options.InlineMode).
    inline_reasoning: str | None = None

    @property
    def model(self) -> str:
        model = self.body.get("model")
        return model if isinstance(model, str) and model else "mock-model"

    def opt_int(self, *names: str, low: int = 1, high: int = 1_000_000) -> int | None:
        """The first present integer field among ``names``, validated against [low, high]."""
        for name in names:
            value = self.body.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise BadRequest(f"'{name}' must be an integer in [{low}, {high}]")
            return value
        return None

    def require_list(self, name: str) -> list[Any]:
        value = self.body.get(name)
        if not isinstance(value, list) or not value:
            raise BadRequest(f"'{name}' is required and must be a non-empty array")
        return value
