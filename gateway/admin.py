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
from gateway.policy.reload import ReloadOutcome

AdminHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authorised(request: web.Request, token_env: str | None) -> bool:
    token = os.environ.get(token_env) if token_env else None
    if token:
        # aiohttp keeps undecodable header bytes as surrogates: restore the bytes rather than
        # raise (a 500) on a stray byte.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, f"Bearer {token}".encode())
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
    detail = runtime.readiness()
    return web.json_response({"ready": runtime.ready_for(detail), **detail})


# A policy set on disk that cannot go live: the request was fine, what it asked for cannot be done.
RELOAD_FAILED_STATUS = 422


async def _reload(request: web.Request) -> web.Response:
    """Reload policies, keys and GeoIP databases now; each keeps its last good state on error.

    200 with ``reloaded: true`` when the policy files on disk now serve (``result`` ``ok`` or
    ``unchanged``); 422 with ``reloaded: false`` and the ``error`` when they were refused, so a
    deploy script notices. The outcome is the holder's latest: had the file watcher reloaded the
    same files a moment later, that is the state of the files now on disk, which is what counts.
    """
    runtime = request.app[RUNTIME]
    await runtime.features.reload()
    holder = runtime.features.policy
    outcome = holder.last_outcome if holder is not None else None
    if outcome is ReloadOutcome.FAILED and holder is not None:
        body = {"reloaded": False, "result": outcome.value, "error": holder.last_error, **runtime.readiness()}
        return web.json_response(body, status=RELOAD_FAILED_STATUS)
    result = outcome.value if outcome is not None else None
    return web.json_response({"reloaded": True, "result": result, **runtime.readiness()})


async def _explain(request: web.Request) -> web.Response:
    """POST a test-case style request context (JSON): how the live policy set decides it."""
    from gateway.policy.explain import explain
    from gateway.policy.testing import context_from_mapping
    from gateway.stages.client_ip import nat64_of
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
        ctx = context_from_mapping(data, "<admin request>", nat64_of(runtime.settings))
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
