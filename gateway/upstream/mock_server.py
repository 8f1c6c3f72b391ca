"""A realistic fake of the OpenAI and Anthropic model APIs for the demo, the tests and the benchmarks.

``create_mock_app(options)`` builds the aiohttp application; ``run_mock`` serves it until cancelled
and ``serve_mock`` is the async context manager tests use. Behaviour per request is tuned with
``x-mock-*`` headers (see ``gateway.upstream.mock.options``) and everything the mock saw is kept
in ``app[MOCK_STATE]`` and served at ``/_mock/requests``, ``/_mock/stats``, ``POST /_mock/reset``.

Handler cancellation must be on (``run_mock``/``serve_mock`` and pytest-aiohttp's test server do
it) so a client that goes away is seen at once, not at the next write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from .mock import anthropic_api, openai_api, openai_responses
from .mock.call import BadRequest, Call
from .mock.delivery import Exchange, error_response
from .mock.options import ControlError, MockOptions, resolve_control
from .mock.state import MockState, RecordedRequest
from .mock.text import Plan
from .mock.wire import Family, Frame, dumps

__all__ = [
    "MOCK_OPTIONS",
    "MOCK_STATE",
    "MockOptions",
    "MockServer",
    "MockState",
    "create_mock_app",
    "run_mock",
    "serve_mock",
]

MOCK_STATE: Final = web.AppKey("tollgate_mock_state", MockState)
MOCK_OPTIONS: Final = web.AppKey("tollgate_mock_options", MockOptions)

_MAX_BODY: Final = 32 * 1024 * 1024
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class _Endpoint:
    family: Family
    plan: Callable[[Call], Plan]
    body: Callable[[Call, Plan], dict[str, Any]]
    stream: Callable[[Call, Plan, MockOptions], list[Frame]]


_CHAT = _Endpoint(
    "openai", openai_api.chat_plan, openai_api.chat_body, lambda c, p, o: openai_api.chat_stream(c, p)
)
_COMPLETIONS = _Endpoint(
    "openai",
    openai_api.completion_plan,
    openai_api.completion_body,
    lambda c, p, o: openai_api.completion_stream(c, p),
)
_RESPONSES = _Endpoint(
    "openai",
    openai_responses.responses_plan,
    openai_responses.responses_body,
    lambda c, p, o: openai_responses.responses_stream(c, p),
)
_MESSAGES = _Endpoint(
    "anthropic",
    anthropic_api.messages_plan,
    anthropic_api.messages_body,
    lambda c, p, o: anthropic_api.messages_stream(c, p, o.anthropic_ping),
)


def _family_of(path: str) -> Family:
    return "anthropic" if path.startswith("/v1/messages") else "openai"


async def _begin(request: web.Request, family: Family) -> Exchange | web.Response:
    """Read, record and validate one model request."""
    state, options = request.app[MOCK_STATE], request.app[MOCK_OPTIONS]
    seq, request_id = state.next_request_id()
    raw = await request.read()
    body: Any = None
    parse_error = None
    if raw:
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            parse_error = "We could not parse the JSON body of your request."
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    state.record_request(
        RecordedRequest(
            seq,
            request_id,
            time.time(),
            request.method,
            request.path,
            dict(request.query),
            headers,
            body,
            len(raw),
        )
    )
    if options.api_key is not None:
        bearer = headers.get("authorization", "")
        if bearer != f"Bearer {options.api_key}" and headers.get("x-api-key") != options.api_key:
            return error_response(family, 401, "Incorrect API key provided.", request_id)
    if parse_error is None and request.method == "POST" and not isinstance(body, dict):
        parse_error = "The request body must be a JSON object."
    if parse_error is not None:
        return error_response(family, 400, parse_error, request_id)
    try:
        control = resolve_control(options, request.headers)
    except ControlError as exc:
        return error_response(family, 400, str(exc), request_id)
    call = Call(request_id, seq, int(time.time()), control.chunks, body if isinstance(body, dict) else {},
                control.inline_reasoning)
    return Exchange(request, state, options, call, control, family)


def _generation_handler(endpoint: _Endpoint) -> _Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        ex = await _begin(request, endpoint.family)
        if isinstance(ex, web.Response):
            return ex
        stream = ex.call.body.get("stream") is True
        try:
            plan = endpoint.plan(ex.call)
            if stream:
                frames = endpoint.stream(ex.call, plan, ex.options)
            else:
                payload = dumps(endpoint.body(ex.call, plan))
        except BadRequest as exc:
            return ex.error(400, str(exc))
        return await (ex.send_stream(frames) if stream else ex.send_body(payload))

    return handler


def _simple_handler(family: Family, build: Callable[[Call, web.Request], dict[str, Any]]) -> _Handler:
    """Endpoints without generation (embeddings, token counting, models, unknown paths)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        ex = await _begin(request, family)
        if isinstance(ex, web.Response):
            return ex
        try:
            payload = dumps(build(ex.call, request))
        except BadRequest as exc:
            return ex.error(400, str(exc))
        except web.HTTPNotFound:
            message = f"mock: no route for {request.method} {request.path}"
            return error_response(_family_of(request.path), 404, message, ex.call.request_id)
        return await ex.send_body(payload)

    return handler


def _models(call: Call, request: web.Request) -> dict[str, Any]:
    if "anthropic-version" in request.headers:  # the anthropic SDK lists models on the same path
        return anthropic_api.models_body()
    return openai_api.models_body(call.created)


def _model(call: Call, request: web.Request) -> dict[str, Any]:
    """``GET /v1/models/{id}``: one entry of the listing, in the asking SDK's shape."""
    listing = _models(call, request)
    model_id = request.match_info["model_id"]
    found: dict[str, Any] | None = next((m for m in listing["data"] if m["id"] == model_id), None)
    if found is None:
        raise web.HTTPNotFound()
    return found


def _not_found(call: Call, request: web.Request) -> dict[str, Any]:
    raise web.HTTPNotFound()


async def _mock_requests(request: web.Request) -> web.Response:
    limit = request.query.get("limit")
    items = request.app[MOCK_STATE].requests_json(int(limit) if limit and limit.isdigit() else None)
    return web.json_response({"requests": items})


async def _mock_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[MOCK_STATE].stats())


async def _mock_reset(request: web.Request) -> web.Response:
    request.app[MOCK_STATE].reset()
    return web.json_response({"ok": True})


def create_mock_app(options: MockOptions | None = None) -> web.Application:
    """The mock upstream as an aiohttp application; its state is ``app[MOCK_STATE]``."""
    options = options or MockOptions()
    app = web.Application(client_max_size=_MAX_BODY)
    app[MOCK_OPTIONS] = options
    app[MOCK_STATE] = MockState(history=options.history)
    r = app.router
    r.add_post("/v1/chat/completions", _generation_handler(_CHAT))
    r.add_post("/v1/completions", _generation_handler(_COMPLETIONS))
    r.add_post("/v1/responses", _generation_handler(_RESPONSES))
    r.add_post("/v1/messages", _generation_handler(_MESSAGES))
    r.add_post(
        "/v1/messages/count_tokens",
        _simple_handler("anthropic", lambda c, _: anthropic_api.count_tokens_body(c)),
    )
    r.add_post(
        "/v1/embeddings",
        _simple_handler("openai", lambda c, _: openai_api.embeddings_body(c, options.embedding_dims)),
    )
    r.add_get("/v1/models", _simple_handler("openai", _models))
    r.add_get("/v1/models/{model_id:.+}", _simple_handler("openai", _model))
    r.add_get("/_mock/requests", _mock_requests)
    r.add_get("/_mock/stats", _mock_stats)
    r.add_post("/_mock/reset", _mock_reset)
    r.add_route("*", "/{tail:.*}", _simple_handler("openai", _not_found))
    return app


@dataclass(frozen=True, slots=True)
class MockServer:
    """A running mock: where it listens and what it saw."""

    url: str  # e.g. http://127.0.0.1:40123 (no trailing slash, no /v1)
    port: int
    app: web.Application

    @property
    def state(self) -> MockState:
        return self.app[MOCK_STATE]


@contextlib.asynccontextmanager
async def serve_mock(
    options: MockOptions | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[MockServer]:
    """Serve the mock on ``host:port`` (0 picks a free port) for the duration of the block."""
    app = create_mock_app(options)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096)
        await site.start()
        bound = runner.addresses[0][1]
        yield MockServer(url=f"http://{host}:{bound}", port=bound, app=app)
    finally:
        await runner.cleanup()


async def run_mock(host: str = "127.0.0.1", port: int = 9000, options: MockOptions | None = None) -> None:
    """Serve the mock until the task is cancelled (the CLI runs this under uvloop)."""
    async with serve_mock(options, host, port):
        await asyncio.Event().wait()
