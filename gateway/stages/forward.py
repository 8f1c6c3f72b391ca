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
upstream fails after the first byte, and when the gateway stops (:class:`OpenStreams`). A request
still waiting on its upstream when the gateway stops, whose client has had nothing of its response
yet, is answered a retryable 503 instead (:class:`WaitingRequests`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from multidict import CIMultiDict

from gateway import errors
from gateway.apis.base import ApiAdapter, RouteSpec, StreamHandler
from gateway.apis.sse import SseOverflow, SseSplitter, encode_event
from gateway.context import Decision, RequestContext
from gateway.headers import client_response_headers, upstream_request_headers
from gateway.metrics import Metrics
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


class GatewayShutdown(Exception):
    """The gateway is stopping and the grace ran out: the stream ends now (see :class:`OpenStreams`)."""


# Retry-After: another replica serves the retry (the SDKs reconnect, and the balancer stopped
# sending here during the drain), so a second is enough; it only applies to the 503 answer, a
# stream's error event carries no headers.
SHUTTING_DOWN = Decision(status=503, error_type="unavailable",
                         message="The gateway is shutting down; retry the request.", retryable=True,
                         headers={"Retry-After": "1"})


class OpenStreams:
    """The streams being relayed, so that a stopping gateway can end those still running when its
    grace runs out with an error event in their API's grammar (``SHUTTING_DOWN``: retryable, the
    gateway's doing), instead of only cutting their connections.

    Ending a stream fails its upstream body with :class:`GatewayShutdown`, as the pool's read
    timeout fails a silent one: the relay wakes from its read, and ends the response through the
    path of an upstream failure. A relay blocked on a client that reads nothing is not woken; the
    server aborts its connection once its short notice is over. A stream starting after that
    (its upstream answered during the notice) is ended at once. Costs a set insertion and removal
    per stream."""

    __slots__ = ("_open", "_ended")

    def __init__(self) -> None:
        self._open: set[aiohttp.StreamReader] = set()
        self._ended = False

    def add(self, body: aiohttp.StreamReader) -> None:
        self._open.add(body)
        if self._ended:
            _end(body)

    def discard(self, body: aiohttp.StreamReader) -> None:
        self._open.discard(body)

    def end_all(self) -> int:
        """End every stream being relayed, and those to come; returns how many were running."""
        self._ended = True
        for body in self._open:
            _end(body)
        return len(self._open)


def _end(body: aiohttp.StreamReader) -> None:
    if body.exception() is None:  # else it already fails, and its relay ends with that error
        body.set_exception(GatewayShutdown())


class WaitingRequests:
    """The requests whose client has had nothing of their response yet while the forwarder waits
    on their upstream (for the response head, or for a whole body it buffers, or in the tarpit's
    delay), so that a stopping gateway whose grace runs out answers them ``SHUTTING_DOWN``, a
    retryable 503 in their API's shape, instead of resetting their connections: an SDK would
    retry a reset too, but other clients, and the logs, would see a crash.

    Ending them cancels each one's handler task, as a client disconnect does (aiohttp's
    handler_cancellation): leaving the upstream's context closes the upstream connection, so the
    model stops generating. The forwarder then recognises the cancellation as the gateway's own
    (:meth:`cut`) and answers instead of giving up. A request reaching the forwarder afterwards
    (during the notice) is answered at once, without asking its upstream. A request leaves the
    set when its stream starts (:class:`OpenStreams` ends it then). Costs a set insertion and
    removal per request."""

    __slots__ = ("_waiting", "_cut", "_ended")

    def __init__(self) -> None:
        self._waiting: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()  # filled only at the cut
        self._ended = False

    def add(self, task: asyncio.Task[Any]) -> bool:
        """Register ``task`` as waiting; False when the gateway already ended the waits (the
        request is to be answered at once)."""
        if self._ended:
            return False
        self._waiting.add(task)
        return True

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._waiting.discard(task)

    def cut(self, task: asyncio.Task[Any]) -> bool:
        """For ``task``, being cancelled: whether :meth:`end_all` alone cancelled it. Its
        cancellation request is then withdrawn and the request is to be answered; False when the
        task was not cut, or when another cancellation stands besides (its client went away too),
        which must go on."""
        return task in self._cut and task.uncancel() == 0

    def end_all(self) -> int:
        """Cancel every wait, and refuse those to come; returns how many were waiting."""
        self._ended = True
        for task in self._waiting:
            if task.cancel():
                self._cut.add(task)
        return len(self._cut)


# The last sequence number in relayed Responses events (upstream JSON may have spaces).
_SEQUENCE_NUMBER = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


def stream_error_event(route: RouteSpec, decision: Decision, sent: bytes = b"") -> bytes:
    """``decision`` as the event that ends a stream already started (blank line included), in the
    grammar of ``route``'s API; ``sent`` is the last bytes relayed before it."""
    if route.name != "responses":
        return errors.sse_error_event(route.api, decision)
    # The Responses API's ``error`` event. Its fields as documented at the top level (the SDK's
    # ResponseErrorEvent), numbered after the last event relayed, and the error object nested as
    # the live API sends it too: an "error" key is what makes the openai SDK raise APIError rather
    # than yield an event a client loop may ignore before it finds its stream ended.
    error = errors.error_payload(route.api, decision)["error"]
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
    its response; recorded for the audit trail and for settling (QuotaStage refunds it)."""
    ctx.audit["shutdown"] = "upstream_cancelled" if ctx.upstream_started is not None else "not_forwarded"
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
                ctx.upstream_started = None  # the model never saw it: settling charges nothing
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
            return await self._relay_body(ctx, route, up)

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
        self, ctx: RequestContext, route: RouteSpec, up: UpstreamResponse
    ) -> web.Response:
        # A declared length bounds the body as read, unless it was compressed: then it bounds
        # only the compressed bytes, and the decoded ones are counted as they come.
        if up.content_length is not None and "Content-Encoding" not in up.headers:
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
                last += stream_error_event(route, failure.decision, writes.sent)
            except GatewayShutdown:
                # The grace of a stopping gateway ran out (OpenStreams.end_all): the same ending,
                # retryable. Recorded as the cut it is, like a client gone away (status 499,
                # client_disconnected), and settled as an abandoned stream, as before the gateway
                # said why.
                ctx.client_disconnected = True
                ctx.audit["stream_error"] = "shutdown"
                last += stream_error_event(route, SHUTTING_DOWN, writes.sent)
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
