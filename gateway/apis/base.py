"""What the gateway knows of an API family: routes, request fields, usage, stream shaping."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.context import NO_SHAPING, ApiFamily, RequestView, Shaping, Usage

__all__ = ["NO_SHAPING", "Shaping"]


class RequestFieldError(ValueError):
    """A request field the gateway decides on has the wrong type or value (→ 400)."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """A proxied route: its logical name, API family and what its requests can do."""

    name: str  # e.g. "chat.completions"
    path: str
    method: str
    api: ApiFamily
    has_body: bool = True
    generates: bool = True  # produces output tokens (output reservations apply)
    billed: bool = True  # the model consumes the prompt's tokens (input reservations apply)
    # Both families define this path (``GET /v1/models``): whose grammar a request speaks is
    # read from its headers (:func:`request_family`), ``api`` being the default.
    shared: bool = False


# Anthropic's API requires this header and the anthropic SDKs send it on every request; no OpenAI
# client does. (``x-api-key`` is no sign: the gateway accepts its keys there from any client.)
ANTHROPIC_CLIENT_HEADER = "anthropic-version"


def request_family(route: RouteSpec, headers: Mapping[str, str]) -> ApiFamily:
    """The API family a request on ``route`` speaks, whose grammar its errors and rate-limit
    fields use: the route's own, except on a path both families define, where a request carrying
    ``anthropic-version`` is an Anthropic client's."""
    if route.shared and ANTHROPIC_CLIENT_HEADER in headers:
        return ApiFamily.ANTHROPIC
    return route.api


class StreamHandler(Protocol):
    """Per-stream state: accounts usage from events and returns the bytes to relay."""

    def on_event(self, raw: bytes) -> bytes | None:
        """The event to send (usually ``raw`` itself, without its blank-line terminator), or None
        to drop it. Returning ``raw`` unchanged lets the relay forward the upstream's bytes as-is."""
        ...

    def on_chunk(self, chunk: bytes) -> bool:
        """Account a chunk of whole events that needs no rewriting and return True, so the relay
        forwards it untouched without splitting it; False sends it through ``on_event``."""
        ...

    def finish(self) -> None:
        """The stream ended (completely or not): settle the usage estimate."""
        ...


class ApiAdapter(Protocol):
    """One API family's grammar."""

    family: ApiFamily
    routes: tuple[RouteSpec, ...]

    def read_request(self, route: RouteSpec, body: dict[str, Any], view: RequestView) -> None:
        """Fill ``view`` from the parsed body; raise RequestFieldError on wrong types."""
        ...

    def upstream_body(self, view: RequestView, shaping: Shaping) -> dict[str, Any] | None:
        """The body to send upstream if it differs from the client's, else None."""
        ...

    def usage_from_body(self, route: RouteSpec, body: dict[str, Any], usage: Usage) -> None:
        """Read usage from a complete (non-stream) response body."""
        ...

    def shape_body(self, route: RouteSpec, body: dict[str, Any], shaping: Shaping) -> bool:
        """Apply ``shaping`` to a complete response body in place; True if it changed."""
        ...

    def stream_handler(self, route: RouteSpec, view: RequestView, usage: Usage,
                       shaping: Shaping) -> StreamHandler:
        ...


def int_field(body: dict[str, Any], name: str, minimum: int = 0) -> int | None:
    """An optional integer field; booleans and strings are refused, not coerced."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestFieldError(f"'{name}' must be an integer")
    if value < minimum:
        raise RequestFieldError(f"'{name}' must be at least {minimum}")
    return value


def bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestFieldError(f"'{name}' must be a boolean")
    return value


def str_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestFieldError(f"'{name}' must be a string")
    return value


def as_int(value: Any) -> int:
    """A usage count from an upstream body: tolerant, never negative."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0
