"""Wiring: settings → runtime components → the proxy and admin aiohttp applications."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

from gateway import errors
from gateway.accesslog import AccessLog
from gateway.apis import adapters
from gateway.apis.base import RouteSpec, request_family
from gateway.apis.openai import OpenAIAdapter
from gateway.context import ApiFamily
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline, RoutePlan, Stage, new_request_id
from gateway.settings import Settings, UpstreamSettings
from gateway.stages.draining import OpenStreams, WaitingRequests
from gateway.stages.forward import Forwarder
from gateway.upstream.base import Upstream, create_upstream
from gateway.wiring import Features, build_features

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Runtime:
    """Everything one gateway process holds; built at start-up, torn down at shutdown."""

    settings: Settings
    metrics: Metrics
    access_log: AccessLog
    features: Features
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    pipeline: Pipeline | None = None
    ready: bool = False
    mock_runner: web.AppRunner | None = None
    # Every forwarder's streams, which a stopping server ends with an error event, and requests
    # still waiting on their upstream, which it answers 503 (gateway.server).
    streams: OpenStreams = field(default_factory=OpenStreams)
    waiting: WaitingRequests = field(default_factory=WaitingRequests)

    def readiness(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "config_loaded": True,
            "upstreams": {name: u.ready for name, u in self.upstreams.items()},
            "not_ready": self.features.not_ready_reasons(),  # component → why it fails readiness
        }
        detail.update(self.features.readiness())
        return detail

    def ready_for(self, detail: dict[str, Any]) -> bool:
        """Whether ``detail`` (from :meth:`readiness`) means ready to serve: started, every
        upstream reachable and no component failing."""
        return self.ready and all(detail["upstreams"].values()) and not detail["not_ready"]


RUNTIME = web.AppKey("runtime", Runtime)


async def _start_mock(settings: Settings) -> tuple[Settings, web.AppRunner | None]:
    """Start the built-in mock model upstream in this process when the config asks for it."""
    mock = settings.mock_upstream
    if not mock.enabled:
        return settings, None
    from gateway.upstream.mock_server import MockOptions, create_mock_app

    runner = web.AppRunner(create_mock_app(MockOptions(chunks=mock.chunks, chunk_delay=mock.chunk_delay)),
                           access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, mock.host, mock.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else mock.port
    url = f"http://{mock.host}:{port}"
    if settings.upstreams:
        return settings, runner
    return replace(settings, upstreams=(UpstreamSettings(name="mock", base_url=url),)), runner


def _route_plans(runtime: Runtime) -> list[RoutePlan]:
    settings = runtime.settings
    enabled = set(settings.routes)
    forwarders: dict[ApiFamily, Forwarder] = {}
    for family, adapter in adapters().items():
        upstream_cfg = settings.upstream_for(family.value)
        if upstream_cfg is None:
            continue
        if isinstance(adapter, OpenAIAdapter) and upstream_cfg.inline_reasoning is not None:
            adapter = OpenAIAdapter(upstream_cfg.inline_reasoning)  # this upstream's <think> tags
        upstream = runtime.upstreams.get(upstream_cfg.name)
        if upstream is None:
            upstream = runtime.upstreams[upstream_cfg.name] = create_upstream(upstream_cfg)
        forwarders[family] = Forwarder(upstream, adapter, upstream_cfg.credential(), runtime.metrics,
                                       upstream_cfg.max_response_bytes, runtime.streams, runtime.waiting)
    plans: list[RoutePlan] = []
    for route in _all_routes():
        if enabled and route.name not in enabled:
            continue
        if route.shared:
            # Both APIs' path: each client goes to the upstream serving its own API, with that
            # API's credential header (an Anthropic client listing models must not reach an
            # OpenAI upstream); served while either family has an upstream.
            by_family = {family: forwarders[family] for family in ApiFamily if family in forwarders}
            if by_family:
                own = by_family.get(route.api) or next(iter(by_family.values()))
                plans.append(RoutePlan(route, own.adapter, own, by_family))
        elif route.api in forwarders:
            forwarder = forwarders[route.api]
            plans.append(RoutePlan(route, forwarder.adapter, forwarder))
    return plans


def _guess_family(request: web.Request) -> ApiFamily:
    if "anthropic-version" in request.headers or "x-api-key" in request.headers:
        return ApiFamily.ANTHROPIC
    return ApiFamily.OPENAI


async def _unknown_route(request: web.Request) -> web.Response:
    rid = new_request_id()
    return errors.error_response(_guess_family(request),
                                 errors.not_found(f"Unknown route {request.method} {request.path}."), rid)


def _allowed_methods(route: RouteSpec) -> frozenset[str]:
    # A GET route answers HEAD too, as GET without the body (see Pipeline._run).
    return frozenset({"GET", "HEAD"}) if route.method == "GET" else frozenset({route.method})


def _method_not_allowed(route: RouteSpec) -> Callable[[web.Request], Awaitable[web.Response]]:
    allowed = ", ".join(sorted(_allowed_methods(route)))

    async def handler(request: web.Request) -> web.Response:
        rid = new_request_id()
        decision = errors.invalid_request(f"Method {request.method} is not allowed on {request.path}.")
        decision = replace(decision, status=405, headers={"Allow": allowed})  # RFC 9110 §15.5.6
        return errors.error_response(request_family(route, request.headers), decision, rid)

    return handler


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    detail = runtime.readiness()
    ok = runtime.ready_for(detail)
    return web.json_response({"ready": ok, **detail}, status=200 if ok else 503)


def create_app(settings: Settings, stages: Sequence[Stage] | None = None) -> web.Application:
    """The proxy application. Components start in its cleanup context and stop in reverse.

    ``stages`` replaces the feature stages the settings would build (the traffic simulator drives
    the pipeline with a simulated clock and its own identity stage)."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    override = stages
    metrics = Metrics()
    runtime = Runtime(settings=settings, metrics=metrics, access_log=AccessLog(settings.logging.access_log),
                      features=Features())
    app[RUNTIME] = runtime

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Loading policies, keys, patterns and scripts reads files: off the event loop. Errors
        # (ConfigError, PolicyTestsFailed) propagate from here and stop the start-up.
        if override is None:
            runtime.features = await asyncio.to_thread(build_features, settings, metrics)
        else:
            runtime.features = Features(stages=list(override))
        runtime.settings, runtime.mock_runner = await _start_mock(runtime.settings)
        await runtime.access_log.start()
        # Log rotation by rename: SIGHUP and POST /admin/reload reopen the access log too.
        runtime.features.reloaders.append(runtime.access_log.reopen)
        await runtime.features.start()
        plans = _route_plans(runtime)
        stages: list[Stage] = list(runtime.features.stages)
        runtime.pipeline = Pipeline(stages, metrics, runtime.access_log, runtime.settings.max_body_bytes,
                                    audit=runtime.features.audit_sink,
                                    audit_builder=runtime.features.audit_builder)
        served_paths: dict[str, RoutePlan] = {}
        for plan in plans:
            served_paths[plan.route.path] = plan
        router.freeze_plans(served_paths, runtime.pipeline)
        runtime.ready = True
        try:
            yield
        finally:
            runtime.ready = False
            for upstream in runtime.upstreams.values():
                await upstream.close()
            await runtime.features.stop()
            await runtime.access_log.close()
            if runtime.mock_runner is not None:
                await runtime.mock_runner.cleanup()

    router = _DeferredRouter()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    for route in _all_routes():
        app.router.add_route("*", route.path, router.dispatcher(route))
    app.router.add_route("*", "/{tail:.*}", _unknown_route)
    app.cleanup_ctx.append(lifecycle)
    return app


def _all_routes() -> list[RouteSpec]:
    return [r for a in adapters().values() for r in a.routes]


class _DeferredRouter:
    """aiohttp freezes its router before start-up runs, but plans need started components
    (upstream sessions, stores); so routes are registered early and bound at start-up."""

    def __init__(self) -> None:
        self._plans: dict[str, RoutePlan] = {}
        self._pipeline: Pipeline | None = None

    def freeze_plans(self, plans: dict[str, RoutePlan], pipeline: Pipeline) -> None:
        self._plans = dict(plans)
        self._pipeline = pipeline

    def dispatcher(self, route: RouteSpec) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        path = route.path
        allowed = _allowed_methods(route)
        refuse_method = _method_not_allowed(route)

        async def dispatch(request: web.Request) -> web.StreamResponse:
            plan = self._plans.get(path)
            if plan is None or self._pipeline is None:  # route disabled, or no upstream for its family
                return await _unknown_route(request)
            if request.method not in allowed:
                return await refuse_method(request)
            return await self._pipeline.handle(request, plan)

        return dispatch
