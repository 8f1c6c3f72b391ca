"""Byte-level encoding shared by the mock API families: JSON, SSE frames and error bodies."""

from __future__ import annotations

import json
from typing import Any, Final, Literal

Family = Literal["openai", "anthropic"]

# (payload, paced): paced frames carry generated tokens and are preceded by the chunk delay,
# which is what makes a mock stream "slow" the way a real model is slow.
Frame = tuple[bytes, bool]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse_data(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def sse_event(event: str, obj: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(obj) + b"\n\n"


SSE_DONE: Final = b"data: [DONE]\n\n"

_OPENAI_TYPES: Final = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "unknown_url"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
}
_ANTHROPIC_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_body(family: Family, status: int, message: str, request_id: str) -> dict[str, Any]:
    """The error object each official SDK maps to its exception for ``status``."""
    if family == "anthropic":
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    kind_o, code = _OPENAI_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind_o, "param": None, "code": code}}


def stream_error_frame(family: Family, status: int, message: str, request_id: str) -> bytes:
    """An error delivered inside an already started stream, in that family's grammar."""
    body = error_body(family, status, message, request_id)
    return sse_event("error", body) if family == "anthropic" else sse_data(body)
