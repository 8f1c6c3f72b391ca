"""Forward a request upstream and relay the response: whole bodies, or SSE event by event.

Streams are relayed as events complete (time to first byte preserved), with backpressure from
``StreamResponse.write``. When the client goes away aiohttp cancels the handler; leaving the
upstream context then closes the upstream connection, which is how the model stops generating.
There is no retry once a byte reached the client.

Two deadlines of the upstream's settings are the forwarder's, so that both upstream clients keep
them alike:
- ``client_write_timeout``: a client that stops reading a stream would hold its upstream
  connection, and a pool slot, for as long as the model generates (a write waits on backpressure
  without a limit). One periodic check per forwarder (:class:`_WriteDeadlines`) looks at the
  streams' writes in progress, like the pool's read-timeout sweeper; a write blocked longer than
  the limit has its client connection aborted, which is then handled as any client disconnect.
  A write costs a clock read and three attribute stores (one keeps the bytes written, which a
  closing Responses error event numbers itself after), no timer.
- ``total_timeout``: a deadline on a response that is not relayed as a stream, with one timer per
  request and only when configured. It is lifted once a response turns out to be a stream.

A stream that cannot go on ends with an error event in its API's grammar, which the official SDKs
raise as an API error (a stream that just stops is a parse or connection error to them): when the
upstream fails after the first byte (``errors.stream_error_event``), and when the gateway stops
(gateway/stages/draining.py ``OpenStreams``). A request still waiting on its upstream when the
gateway stops, whose client has had nothing of its response yet, is answered a retryable 503
instead (``WaitingRequests``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from multidict import CIMultiDict

from gateway import errors
from gateway.apis.base import ApiAdapter, RouteSpec, StreamHandler
from gateway.apis.sse import SseOverflow, SseSplitter
from gateway.context import Decision, RequestContext
from gateway.headers import client_response_headers, upstream_request_headers
from gateway.metrics import Metrics
from gateway.stages.draining import SHUTTING_DOWN, GatewayShutdown, OpenStreams, WaitingRequests
from gateway.upstream.base import Upstream, UpstreamConnectError, UpstreamProtocolError, UpstreamResponse

log = logging.getLogger(__name__)

_NO_BODY = frozenset({204, 304})  # a Content-Length on these describes another response


class _Writes:
    """One stream's client writes as the deadline check sees them."""

    __slots__ = ("transport", "since", "timed_out", "sent")

    def __init__(self, transport: asyncio.Transport | None) -> None:
        self.transport = transport
        self.since = 0.0  # when the write in progress began (loop time); 0: none in progress
        self.timed_out = False
        self.sent = b""  # the last bytes written: a closing Responses event numbers itself after them


class _WriteDeadlines:
    """``client_write_timeout`` for every stream a forwarder relays: a check every quarter of the
    limit (at most a second) while streams are open, instead of a timer per write. A write blocked
    past the limit aborts its client's connection; aiohttp then cancels the handler (or the next
    write fails), the path of any client disconnect."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._tick = max(0.01, min(1.0, limit / 4))
        self._open: set[_Writes] = set()
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, transport: asyncio.Transport | None) -> _Writes:
        writes = _Writes(transport)
        self._open.add(writes)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._tick, self._check)
        return writes

    def forget(self, writes: _Writes) -> None:
        self._open.discard(writes)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            late = loop.time() - self.limit
            blocked = [w for w in self._open if w.since and w.since < late]
            for writes in blocked:
                writes.timed_out = True
                self._open.discard(writes)
                if writes.transport is not None:
                    writes.transport.abort()
        except Exception:  # a bug here must not end the deadlines for the process's lifetime
            log.exception("client write deadline check failed")
        finally:
            # Stops when no stream is open (no timer left behind), restarts with the next one.
            self._handle = loop.call_later(self._tick, self._check) if self._open else None


class UpstreamFailure(Exception):
    """The upstream could not be used; carries the Decision to answer with."""

    def __init__(self, decision: Decision, kind: str) -> None:
        super().__init__(decision.message)
        self.decision = decision
        self.kind = kind


def _failure(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure(errors.gateway_timeout(), "timeout")
    if isinstance(exc, aiohttp.ClientConnectorError | UpstreamConnectError):
        return UpstreamFailure(errors.bad_gateway(), "connect")
    if isinstance(exc, UpstreamProtocolError | aiohttp.ClientResponseError):  # pool | session
        return _malformed()
    return UpstreamFailure(errors.bad_gateway("The upstream model service failed."), "reset")


# What the upstream clients decode (aiohttp: gzip and deflate always; br and zstd with their
# optional libraries). Anything else would be relayed as bytes the client cannot read.
_DECODED = frozenset({"identity", "gzip", "deflate"}
                     | ({"br"} if HAS_BROTLI else set()) | ({"zstd"} if HAS_ZSTD else set()))


def _undecodable(encoding: str) -> UpstreamFailure | None:
    """A 502 for a Content-Encoding the gateway cannot decode (it asked for identity)."""
    if encoding.strip().lower() in _DECODED:
        return None
    return UpstreamFailure(errors.bad_gateway(
        f"The upstream model service answered in Content-Encoding {encoding[:40]!r}, which the "
        "gateway cannot decode."), "protocol")


def _shut_out(ctx: RequestContext) -> UpstreamFailure:
    """``SHUTTING_DOWN`` for a request the stopping gateway abandons before its client had any of
    its response; recorded for the audit trail, and settled as consuming nothing (the retry pays)."""
    ctx.audit["shutdown"] = "upstream_cancelled" if ctx.upstream_started is not None else "not_forwarded"
    ctx.nothing_consumed = True
    return UpstreamFailure(SHUTTING_DOWN, "shutdown")


# Failures before a request was written upstream (connecting, or waiting for a pooled connection):
# unlike a reset or a timeout later on, the model cannot have read it.
_NEVER_SENT = (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError, UpstreamConnectError)


def _malformed() -> UpstreamFailure:
    return UpstreamFailure(errors.bad_gateway("The upstream model service sent a malformed response."),
                           "protocol")


class _HeadersWithFirstEvents(web.StreamResponse):
    """A stream response whose status line and headers leave with its first body bytes."""

    _send_headers_immediately = False


class Forwarder:
    """Sends ``ctx`` upstream and writes the client's response."""

    def __init__(
        self,
        upstream: Upstream,
        adapter: ApiAdapter,
        credential: str | None,
        metrics: Metrics,
        max_response_bytes: int,
        streams: OpenStreams | None = None,
        waiting: WaitingRequests | None = None,
    ) -> None:
        self._upstream = upstream
        self._streams = streams if streams is not None else OpenStreams()
        self._waiting = waiting if waiting is not None else WaitingRequests()
        self.adapter = adapter
        self._credential = credential
        self._metrics = metrics
        self._max_response = max_response_bytes
        self._ttfb = metrics.upstream_ttfb.labels(upstream.name)
        settings = upstream.settings
        self._total_timeout = settings.total_timeout
        self._write_deadlines = (_WriteDeadlines(settings.client_write_timeout)
                                 if settings.client_write_timeout > 0 else None)
        self._write_timeouts = metrics.client_write_timeouts.labels(upstream.name)

    def _body(self, ctx: RequestContext, raw: bytes) -> bytes | None:
        view = ctx.request
        if view.body is None:
            return raw or None
        changed = self.adapter.upstream_body(view, ctx.shaping)
        if changed is not None:
            return orjson.dumps(changed)
        if ctx.body_modified:
            return orjson.dumps(view.body)
        return raw

    async def __call__(
        self, request: web.Request, ctx: RequestContext, route: RouteSpec, raw: bytes
    ) -> web.StreamResponse:
        # the request's family, not the route's: on a path both APIs define they differ
        headers = upstream_request_headers(request.headers, ctx.request.api, self._credential,
                                           ctx.request_id)
        body = self._body(ctx, raw)
        waiting = self._waiting
        task = asyncio.current_task()
        assert task is not None  # a handler runs in aiohttp's task for the request
        if not waiting.add(task):
            raise _shut_out(ctx)
        try:
            if ctx.first_byte_delay > 0:
                # The tarpit waits before the upstream is asked: no upstream connection is held and
                # no generation runs meanwhile, and a client that gives up costs the model nothing.
                # (The delay is the gateway's, so total_timeout does not count it.)
                await asyncio.sleep(ctx.first_byte_delay)
            ctx.upstream_started = started = time.perf_counter()
            if self._total_timeout:
                async with asyncio.timeout(self._total_timeout) as deadline:
                    return await self._exchange(request, ctx, route, headers, body, started, deadline, task)
            return await self._exchange(request, ctx, route, headers, body, started, None, task)
        except UpstreamFailure as refused:  # too large, or not a response to relay
            self._metrics.upstream_errors.labels(refused.kind).inc()
            raise
        except (TimeoutError, aiohttp.ClientError) as exc:
            failure = _failure(exc)
            if isinstance(exc, _NEVER_SENT):
                ctx.nothing_consumed = True
            self._metrics.upstream_errors.labels(failure.kind).inc()
            raise failure from exc
        except asyncio.CancelledError:
            # The stopping gateway's grace ran out while this request waited (WaitingRequests):
            # the upstream request is closed by now (its context was left), and the client, who
            # has nothing yet, is told to retry rather than having its connection reset.
            if not waiting.cut(task):
                raise
            raise _shut_out(ctx) from None
        finally:
            waiting.discard(task)

    async def _exchange(self, request: web.Request, ctx: RequestContext, route: RouteSpec,
                        headers: CIMultiDict[str], body: bytes | None, started: float,
                        deadline: asyncio.Timeout | None, task: asyncio.Task[Any]) -> web.StreamResponse:
        async with self._upstream.request(request.method, request.path_qs, headers, body) as up:
            ctx.upstream_ttfb = time.perf_counter()
            self._ttfb.observe(ctx.upstream_ttfb - started)
            ctx.upstream_status = up.status
            if up.status < 200:  # a 101 no one asked for (interim 1xx were skipped)
                raise _malformed()
            encoding = up.headers.get("Content-Encoding")
            if encoding is not None and (refused := _undecodable(encoding)) is not None:
                raise refused
            if ctx.request.stream and up.status == 200 and up.content_type == "text/event-stream":
                if deadline is not None:
                    deadline.reschedule(None)  # a stream is bounded by read_timeout, not in total
                # Its client hears from it from now on: at the cut it ends with an error event
                # (OpenStreams), no longer a 503.
                self._waiting.discard(task)
                return await self._relay_stream(request, ctx, route, up)
            return await self._relay_body(ctx, route, up, encoding is not None)

    def _response_headers(self, ctx: RequestContext, up: UpstreamResponse) -> CIMultiDict[str]:
        headers = client_response_headers(up.headers)
        upstream_id = headers.get("request-id") or headers.get("x-request-id")
        if upstream_id:
            # Kept for support tickets with the provider; the client's id is the gateway's.
            headers["x-upstream-request-id"] = upstream_id
        headers["x-request-id"] = ctx.request_id
        headers["request-id"] = ctx.request_id
        headers.update(ctx.response_headers)
        return headers

    async def _relay_body(
        self, ctx: RequestContext, route: RouteSpec, up: UpstreamResponse, compressed: bool
    ) -> web.Response:
        # A declared length bounds the body as read, unless it was compressed: then it bounds
        # only the compressed bytes, and the decoded ones are counted as they come.
        if up.content_length is not None and not compressed:
            if up.content_length > self._max_response and up.status not in _NO_BODY:
                raise self._too_large()
            data = await up.read()  # bounded by the declared length (the parser enforces it)
        else:
            parts: list[bytes] = []
            size = 0
            async for part in up.content.iter_any():
                size += len(part)
                if size > self._max_response:
                    raise self._too_large()
                parts.append(part)
            data = b"".join(parts)
        if up.status == 200 and up.content_type == "application/json" and data:
            data = self._account_body(ctx, route, data)
        headers = self._response_headers(ctx, up)
        return web.Response(status=up.status, body=data, headers=headers)

    @staticmethod
    def _too_large() -> UpstreamFailure:
        return UpstreamFailure(errors.bad_gateway("The upstream response is too large."), "too_large")

    def _account_body(self, ctx: RequestContext, route: RouteSpec, data: bytes) -> bytes:
        try:
            parsed: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            return data
        if not isinstance(parsed, dict):
            return data
        self.adapter.usage_from_body(route, parsed, ctx.usage)
        if ctx.shaping.active and self.adapter.shape_body(route, parsed, ctx.shaping):
            return orjson.dumps(parsed)
        return data

    @staticmethod
    def _events_out(splitter: SseSplitter, handler: StreamHandler, chunk: bytes) -> tuple[bytes, int]:
        """The bytes to relay for ``chunk`` and how many events they hold (for pacing)."""
        whole = not splitter.pending and b"\r" not in chunk  # chunk holds exactly these events
        if whole and chunk.endswith(b"\n\n") and handler.on_chunk(chunk):
            # The common case: whole events that need no rewriting go out as received, unsplit.
            return chunk, chunk.count(b"\n\n")
        events = splitter.feed(chunk)
        if not events:
            return b"", 0
        out: list[bytes] = []
        unchanged = True
        for raw in events:
            if not raw:
                continue
            sent = handler.on_event(raw)
            if sent is not raw:
                unchanged = False
            if sent is not None:
                out.append(sent)
        if unchanged and whole and chunk.endswith(b"\n\n") and len(out) == len(events):
            return chunk, len(out)  # the upstream's bytes, untouched
        return (b"\n\n".join(out) + b"\n\n", len(out)) if out else (b"", 0)

    async def _relay_events(self, response: web.StreamResponse, splitter: SseSplitter, handler: StreamHandler,
                            up: UpstreamResponse, first: bytes, pace: float | None, writes: _Writes) -> bytes:
        """Relay events as they arrive; returns the final bytes when the upstream's body ended
        with them, so that they leave with the end of the response."""
        content = up.content
        clock = asyncio.get_running_loop().time
        chunk = first or await content.readany()
        while chunk:
            data, events = self._events_out(splitter, handler, chunk)
            if data:
                if content.is_eof() and not pace:
                    return data  # nothing more can come: finish in the same write
                writes.since = clock()  # seen by _WriteDeadlines if the write waits on the client
                await response.write(data)
                writes.since = 0.0
                writes.sent = data
                if pace:
                    await asyncio.sleep(events / pace)
            chunk = await content.readany()
        return b""

    async def _relay_stream(
        self, request: web.Request, ctx: RequestContext, route: RouteSpec, up: UpstreamResponse
    ) -> web.StreamResponse:
        # Events that arrived with the upstream's headers go out with the client's headers, in one
        # write; when none did (the model is still thinking), the headers go out at once.
        first = up.content.read_nowait()
        response_class = _HeadersWithFirstEvents if first else web.StreamResponse
        response = response_class(status=200, headers=self._response_headers(ctx, up))
        handler = self.adapter.stream_handler(route, ctx.request, ctx.usage, ctx.shaping)
        splitter = SseSplitter()
        pace = ctx.pace_tokens_per_s
        active = self._metrics.active_streams
        deadlines = self._write_deadlines
        writes = deadlines.watch(request.transport) if deadlines is not None else _Writes(None)
        streams = self._streams
        active.inc()
        try:
            streams.add(up.content)
            await response.prepare(request)
            last = b""  # written with the end of the response, in one write
            try:
                last = await self._relay_events(response, splitter, handler, up, first, pace, writes)
                tail = splitter.tail()
                if tail.strip():
                    # A last event without its blank line: shaped and accounted like any other,
                    # and relayed as unterminated as it came (a client may discard it, per SSE).
                    shaped = handler.on_event(tail.rstrip(b"\r\n"))
                    if shaped is not None:
                        last += shaped
            except (
                TimeoutError,
                aiohttp.ClientPayloadError,
                aiohttp.ClientOSError,
                aiohttp.ServerDisconnectedError,
                SseOverflow,
            ) as exc:
                # The upstream failed after the first byte: end the stream in the API's grammar.
                failure = _failure(exc)
                self._metrics.upstream_errors.labels(failure.kind).inc()
                ctx.audit["stream_error"] = failure.kind
                last += errors.stream_error_event(route, failure.decision, writes.sent)
            except GatewayShutdown:
                # The grace of a stopping gateway ran out (OpenStreams.end_all): the same ending,
                # retryable. Recorded as the cut it is, like a client gone away (status 499,
                # client_disconnected), and settled as an abandoned stream, as before the gateway
                # said why.
                ctx.client_disconnected = True
                ctx.audit["stream_error"] = "shutdown"
                last += errors.stream_error_event(route, SHUTTING_DOWN, writes.sent)
            writes.since = asyncio.get_running_loop().time()  # the end waits on the client too
            await response.write_eof(last)
            writes.since = 0.0
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            ctx.client_disconnected = True
        except asyncio.CancelledError:
            ctx.client_disconnected = True
            raise
        finally:
            streams.discard(up.content)
            if deadlines is not None:
                deadlines.forget(writes)
            if writes.timed_out:
                # The client read nothing for client_write_timeout: it is gone as far as the
                # gateway is concerned (its connection was aborted; the upstream one closes
                # as this handler leaves the upstream's context).
                ctx.client_disconnected = True
                ctx.audit["client_write_timeout"] = True
                self._write_timeouts.inc()
            handler.finish()
            if not ctx.usage.complete and not ctx.usage.input_tokens:
                # Cut short before the upstream reported usage: the prompt was still consumed.
                ctx.usage.input_tokens = ctx.request.input_tokens_estimate
            active.dec()
        return response
