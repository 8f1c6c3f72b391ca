"""Errors phrased in each API family's own shape, so each official SDK raises its proper class.

Stages speak in neutral error kinds (``Decision.error_type``); this module maps a kind to the
OpenAI body ``{"error": {"message", "type", "param", "code"}}`` or the Anthropic body
``{"type": "error", "error": {"type", "message"}}`` and to the retry hints the SDKs obey.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.apis.base import RouteSpec
from gateway.apis.sse import encode_event
from gateway.context import ApiFamily, Decision

# neutral kind → (OpenAI type, OpenAI code, Anthropic type)
_KINDS: dict[str, tuple[str, str | None, str]] = {
    "invalid_request": ("invalid_request_error", None, "invalid_request_error"),
    "authentication": ("authentication_error", "invalid_api_key", "authentication_error"),
    "permission": ("permission_error", "permission_denied", "permission_error"),
    "not_found": ("invalid_request_error", "not_found", "not_found_error"),
    "request_too_large": ("invalid_request_error", "request_too_large", "request_too_large"),
    # "requests" unless the denial names its limit's unit (Decision.openai_type: "tokens")
    "rate_limit": ("requests", "rate_limit_exceeded", "rate_limit_error"),
    "challenge": ("permission_error", "challenge_required", "permission_error"),
    "api_error": ("server_error", None, "api_error"),
    "bad_gateway": ("server_error", "upstream_unavailable", "api_error"),
    "timeout": ("server_error", "upstream_timeout", "api_error"),
    "overloaded": ("server_error", "overloaded", "overloaded_error"),
    "unavailable": ("server_error", "service_unavailable", "overloaded_error"),
}


def error_payload(api: ApiFamily, decision: Decision) -> dict[str, Any]:
    """The JSON body for ``decision`` in ``api``'s grammar."""
    openai_type, openai_code, anthropic_type = _KINDS.get(decision.error_type, _KINDS["api_error"])
    if api is ApiFamily.ANTHROPIC:
        inner: dict[str, Any] = {"type": anthropic_type, "message": decision.message}
        inner.update(decision.extra)
        return {"type": "error", "error": inner}
    inner = {
        "message": decision.message,
        "type": decision.openai_type or openai_type,
        "param": None,
        "code": decision.code or openai_code,
    }
    inner.update(decision.extra)
    return {"error": inner}


def error_response(api: ApiFamily, decision: Decision, request_id: str,
                   extra_headers: Mapping[str, str] | None = None) -> web.Response:
    """A complete error response: body, request-id headers and SDK retry hints."""
    headers = {
        "x-request-id": request_id,
        "request-id": request_id,
        # Denials and challenges must not invite the SDKs' blind retries; rate limits and
        # transient upstream failures may be retried (Retry-After tells when).
        "x-should-retry": "true" if decision.retryable else "false",
    }
    if extra_headers:
        headers.update(extra_headers)
    headers.update(decision.headers)
    body = orjson.dumps(error_payload(api, decision))
    return web.Response(status=decision.status, body=body, headers=headers,
                        content_type="application/json")


# The last sequence number in relayed Responses events (upstream JSON may have spaces).
_SEQUENCE_NUMBER = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


def stream_error_event(route: RouteSpec, decision: Decision, sent: bytes = b"") -> bytes:
    """``decision`` as the event that ends a stream already started (blank line included), in the
    grammar of ``route``'s API; ``sent`` is the last bytes relayed before it."""
    if route.name != "responses":
        payload = orjson.dumps(error_payload(route.api, decision))
        if route.api is ApiFamily.ANTHROPIC:
            return b"event: error\ndata: " + payload + b"\n\n"
        return b"data: " + payload + b"\n\n"  # chat: the openai SDK raises on an "error" key
    # The Responses API's ``error`` event. Its fields as documented at the top level (the SDK's
    # ResponseErrorEvent), numbered after the last event relayed, and the error object nested as
    # the live API sends it too: an "error" key is what makes the openai SDK raise APIError rather
    # than yield an event a client loop may ignore before it finds its stream ended.
    error = error_payload(route.api, decision)["error"]
    last = sent.rfind(b'"sequence_number"')
    found = _SEQUENCE_NUMBER.match(sent, last) if last >= 0 else None
    event = {
        "type": "error",
        "code": error["code"],
        "message": error["message"],
        "param": error["param"],
        "sequence_number": int(found.group(1)) + 1 if found else 0,
        "error": error,
    }
    return encode_event(orjson.dumps(event), b"error") + b"\n\n"


def invalid_request(message: str) -> Decision:
    return Decision(status=400, error_type="invalid_request", message=message)


def not_found(message: str = "Unknown route.") -> Decision:
    return Decision(status=404, error_type="not_found", message=message)


def too_large(limit: int) -> Decision:
    return Decision(status=413, error_type="request_too_large",
                    message=f"Request body exceeds the gateway limit of {limit} bytes.")


def bad_gateway(message: str = "The upstream model service could not be reached.") -> Decision:
    return Decision(status=502, error_type="bad_gateway", message=message, retryable=True)


def gateway_timeout(message: str = "The upstream model service did not answer in time.") -> Decision:
    return Decision(status=504, error_type="timeout", message=message, retryable=True)


def internal_error() -> Decision:
    return Decision(status=500, error_type="api_error", message="Internal gateway error.",
                    retryable=True)
