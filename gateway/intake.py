"""Read a request's body into the context: size limit, content type, UTF-8 JSON, known fields."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway import errors
from gateway.apis.base import ApiAdapter, RequestFieldError, RouteSpec
from gateway.context import Decision, RequestContext


async def read_body(request: web.Request, limit: int) -> bytes | Decision:
    """The raw body, or a Decision (413) when it is larger than ``limit``."""
    length = request.content_length
    if length is not None and length > limit:
        return errors.too_large(limit)
    try:
        # aiohttp enforces client_max_size on chunked bodies too.
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return errors.too_large(limit)


def parse_json_body(raw: bytes, content_type: str) -> dict[str, Any] | Decision:
    if content_type != "application/json":
        return errors.invalid_request(
            f"Content-Type must be application/json, got {content_type or 'none'}.")
    if not raw:
        return errors.invalid_request("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _json_error(raw, exc)
    if not isinstance(body, dict):
        return errors.invalid_request("The request body must be a JSON object.")
    return body


def _json_error(raw: bytes, exc: orjson.JSONDecodeError) -> Decision:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return errors.invalid_request(f"The request body is not valid UTF-8 (byte {bad.start}).")
    if "depth" in exc.msg or "recursion" in exc.msg:
        return errors.invalid_request("The request body is nested too deeply.")
    return errors.invalid_request(
        f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.")


async def intake(request: web.Request, ctx: RequestContext, route: RouteSpec, adapter: ApiAdapter,
                 limit: int) -> bytes | Decision:
    """Fill ``ctx.request`` from the HTTP request; returns the raw body or a Decision."""
    raw = await read_body(request, limit)
    if isinstance(raw, Decision):
        return raw
    view = ctx.request
    view.body_bytes = len(raw)
    if not route.has_body:
        return raw
    body = parse_json_body(raw, request.content_type if "Content-Type" in request.headers else "")
    if isinstance(body, Decision):
        return body
    view.body = body
    try:
        adapter.read_request(route, body, view)
    except RequestFieldError as exc:
        return errors.invalid_request(str(exc))
    # A cheap upper bound for reservation (about four bytes a token); reconciled with real usage.
    view.input_tokens_estimate = max(1, len(raw) // 4)
    return raw
