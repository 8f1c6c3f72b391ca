"""The admin listener: health, readiness, Prometheus metrics, status and authenticated controls.

Mutating calls need ``Authorization: Bearer <token>`` where ``admin.token_env`` names the
variable holding the token; without a token configured they are accepted from loopback only.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.app import RUNTIME, Runtime, _healthz, _readyz
from gateway.pipeline import peer_address

AdminHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authorised(request: web.Request, token_env: str | None) -> bool:
    token = os.environ.get(token_env) if token_env else None
    if token:
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())
    peer = peer_address(request)
    return peer is not None and peer.is_loopback


def require_admin(handler: AdminHandler) -> AdminHandler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        runtime = request.app[RUNTIME]
        if not authorised(request, runtime.settings.admin.token_env):
            return web.json_response({"error": "admin authorisation required"}, status=401)
        return await handler(request)

    return guarded


async def _metrics(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    return web.Response(body=runtime.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _status(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    return web.json_response({"ready": runtime.ready, **runtime.readiness()})


async def _reload(request: web.Request) -> web.Response:
    """Reload policies, keys and GeoIP databases now; each keeps its last good state on error."""
    runtime = request.app[RUNTIME]
    await runtime.features.reload()
    return web.json_response({"reloaded": True, **runtime.readiness()})


async def _explain(request: web.Request) -> web.Response:
    """POST a test-case style request context (JSON): how the live policy set decides it."""
    from gateway.policy.explain import explain
    from gateway.policy.testing import context_from_mapping
    from gateway.yamlsource import ConfigError

    runtime = request.app[RUNTIME]
    holder = runtime.features.policy
    if holder is None:
        return web.json_response({"error": "no policies configured"}, status=404)
    try:
        data = await request.json()
    except ValueError:
        return web.json_response({"error": "expected a JSON object"}, status=400)
    if not isinstance(data, dict):
        return web.json_response({"error": "expected a JSON object"}, status=400)
    try:
        ctx = context_from_mapping(data, "<admin request>")
    except ConfigError as exc:
        return web.json_response({"error": "invalid request context", "issues": [str(i) for i in exc.issues]},
                                 status=400)
    return web.json_response(explain(holder.current, ctx))


def create_admin_app(runtime: Runtime) -> web.Application:
    """Admin routes; features add theirs through ``runtime.features.admin_routes``."""
    app = web.Application()
    app[RUNTIME] = runtime
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/status", _status)
    app.router.add_post("/admin/reload", require_admin(_reload))
    app.router.add_post("/admin/explain", require_admin(_explain))
    for method, path, handler, mutating in runtime.features.admin_routes:
        app.router.add_route(method, path, require_admin(handler) if mutating else handler)
    return app
