"""The request path: intake → stages (a Decision short-circuits) → forward → settle → audit.

A pipeline is a fold over small stages sharing one :class:`RequestContext`. Stages that hold
resources for the length of a request (quota reservations, concurrency leases) also implement
``settle(ctx)``, which runs after the response ended whatever happened to it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from gateway import errors
from gateway.accesslog import AccessLog
from gateway.apis.base import ApiAdapter, RouteSpec, request_family
from gateway.context import ApiFamily, ClientInfo, Decision, RequestContext, RequestView
from gateway.intake import intake
from gateway.metrics import Metrics
from gateway.settling import Settling
from gateway.stages.forward import Forwarder, UpstreamFailure

log = logging.getLogger(__name__)

Stage = Callable[[RequestContext], Awaitable[Decision | None]]


class AuditSink(Protocol):
    def emit(self, record: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


AuditBuilder = Callable[[RequestContext], dict[str, Any]]


class _RandomIds:
    """Unpredictable ids of 24 hex characters, cut from the OS's random bytes fetched a few
    kilobytes at a time: one ``getrandom`` per 256 ids instead of one per request. A forked
    child starts with an empty buffer (it would otherwise hand out its parent's next ids)."""

    __slots__ = ("_at", "_hex")

    IDS_PER_FILL = 256

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0

    def next(self) -> str:
        at = self._at
        if at >= len(self._hex):
            self._hex = os.urandom(12 * self.IDS_PER_FILL).hex()
            at = 0
        self._at = at + 24
        return self._hex[at:at + 24]

    def forget(self) -> None:
        self._hex = ""
        self._at = 0


_random_ids = _RandomIds()
os.register_at_fork(after_in_child=_random_ids.forget)


def new_request_id() -> str:
    """The gateway's own id for a request: unpredictable, 24 hex characters.

    A client's ``X-Request-Id`` is never adopted: the id is the audit trail's key, and a client
    choosing it could collide with or impersonate another request's records. What the client
    sent is recorded beside it as ``client_request_id`` (gateway/logfile.py)."""
    return _random_ids.next()


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# A few hundred distinct peers (proxies, clients) cover most traffic, and parsing an address costs
# more than the rest of the client-address stage.
@functools.lru_cache(maxsize=4096)
def _parse_peer(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def peer_address(request: web.Request) -> IPAddress | None:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer or not isinstance(peer[0], str):
        return None
    return _parse_peer(peer[0])


@dataclass(slots=True)
class RoutePlan:
    """What serves one route: its adapter and forwarder."""

    route: RouteSpec
    adapter: ApiAdapter
    forwarder: Forwarder
    # A path both families define (RouteSpec.shared): the forwarder of each family with an
    # upstream, picked by the family the request speaks; a family missing here is not served.
    by_family: Mapping[ApiFamily, Forwarder] | None = None


class Pipeline:
    """Runs every proxied request through the stages, then upstream."""

    def __init__(self, stages: Sequence[Stage], metrics: Metrics, access_log: AccessLog,
                 max_body_bytes: int, audit: AuditSink | None = None,
                 audit_builder: AuditBuilder | None = None) -> None:
        # The leading stages that read headers only (client address, geo, identity) run before
        # the body is read: an unauthenticated client cannot make the gateway buffer and parse a
        # body, nor learn how it would be validated.
        head = 0
        while head < len(stages) and getattr(stages[head], "before_body", False):
            head += 1
        self._before_body = tuple(stages[:head])
        self._stages = tuple(stages[head:])
        self._settlers: tuple[Settling, ...] = tuple(s for s in stages if isinstance(s, Settling))  # type: ignore[misc]
        self._metrics = metrics
        self._access_log = access_log
        access_log.losses.bind(metrics.lost_records("access"))
        self._max_body = max_body_bytes
        self._audit = audit
        self._audit_builder = audit_builder

    async def handle(self, request: web.Request, plan: RoutePlan) -> web.StreamResponse:
        route = plan.route
        # Only a path both families define needs a look at the headers to know whose grammar
        # (errors, rate-limit fields, ``request.api``) the request speaks.
        api = request_family(route, request.headers) if route.shared else route.api
        ctx = RequestContext(
            request_id=new_request_id(),
            request=RequestView(api=api, route=route.name, path=request.path,
                                method=request.method, headers=request.headers, billed=route.billed,
                                generates=route.generates),
            client=ClientInfo(peer_ip=peer_address(request)),
        )
        response: web.StreamResponse | None = None
        try:
            response = await self._run(request, ctx, plan)
            return response
        except asyncio.CancelledError:
            ctx.client_disconnected = True
            raise
        except web.HTTPException as exc:  # aiohttp's own refusals, in the API's shape
            kind = "invalid_request" if exc.status < 500 else "api_error"
            response = self._refuse(ctx, Decision(status=exc.status, error_type=kind, message=exc.reason))
            return response
        except Exception:  # never a stack trace to the client: an error in the API's shape
            log.exception("unhandled error in request %s", ctx.request_id)
            response = self._refuse(ctx, errors.internal_error())
            return response
        finally:
            ctx.finished = time.perf_counter()
            if ctx.client_disconnected:
                # nginx's convention for "client closed request", also when the forwarder noticed
                # it on a failed write and still returned its (never completed) response.
                ctx.status = 499
            elif response is not None:
                ctx.status = response.status
            try:
                rest = self._settle_now(ctx)
                if rest:
                    # Settling must complete even when the client's disconnect cancelled this task.
                    await asyncio.shield(self._settle_rest(rest))
            finally:
                self._record(ctx)

    async def _run(self, request: web.Request, ctx: RequestContext, plan: RoutePlan) -> web.StreamResponse:
        # HEAD (let through on GET routes only) is GET without the body (RFC 9110 §9.3.2): the
        # upstream is asked with GET, so status, headers and Content-Length are the GET's, and
        # aiohttp leaves the body out of the answer to HEAD. Cloned before the body is read
        # (aiohttp refuses to clone after).
        upstream_request = request.clone(method="GET") if request.method == "HEAD" else request
        for stage in self._before_body:
            decision = await stage(ctx)
            if decision is not None:
                return self._refuse(ctx, decision)
        raw = await intake(request, ctx, plan.route, plan.adapter, self._max_body)
        if isinstance(raw, Decision):
            return self._refuse(ctx, raw)
        for stage in self._stages:
            decision = await stage(ctx)
            if decision is not None:
                return self._refuse(ctx, decision)
        forwarder = plan.forwarder
        if plan.by_family is not None:
            found = plan.by_family.get(ctx.request.api)
            if found is None:
                return self._refuse(ctx, errors.not_found(
                    f"No upstream serves the {ctx.request.api.value} API's {ctx.request.path} here."))
            forwarder = found
        try:
            return await forwarder(upstream_request, ctx, plan.route, raw)
        except UpstreamFailure as failure:
            response = self._refuse(ctx, failure.decision)
            if failure.kind == "shutdown":
                # The gateway is stopping: the connection closes after this answer, and says so
                # even to a request that arrived before the drain, with keep-alive agreed then.
                response.force_close()
            return response

    def _refuse(self, ctx: RequestContext, decision: Decision) -> web.Response:
        ctx.decision = decision
        return errors.error_response(ctx.request.api, decision, ctx.request_id, ctx.response_headers)

    def _settle_now(self, ctx: RequestContext) -> list[tuple[Settling, Awaitable[None]]]:
        rest: list[tuple[Settling, Awaitable[None]]] = []
        for stage in self._settlers:
            try:
                pending = stage.settle_now(ctx)
            except Exception:  # settling must not stop the others; the failure is logged
                log.exception("settle failed in %s", type(stage).__name__)
                continue
            if pending is not None:
                rest.append((stage, pending))
        return rest

    @staticmethod
    async def _settle_rest(rest: list[tuple[Settling, Awaitable[None]]]) -> None:
        for stage, pending in rest:
            try:
                await pending
            except Exception:
                log.exception("settle failed in %s", type(stage).__name__)

    def _record(self, ctx: RequestContext) -> None:
        """Metrics, access log and audit: synchronous, so no task is needed to protect them."""
        usage = ctx.usage
        self._metrics.observe_request(ctx.request.route, ctx.status,
                                      (ctx.finished or ctx.started) - ctx.started,
                                      usage.input_tokens, usage.output_tokens,
                                      ctx.decision.error_type if ctx.decision is not None else "forwarded")
        if ctx.client_disconnected:
            self._metrics.client_disconnects.inc()
        self._access_log.log(ctx)
        if self._audit is not None and self._audit_builder is not None:
            try:
                self._audit.emit(self._audit_builder(ctx))
            except Exception:  # the audit trail must never break the request path
                log.exception("audit record failed")
