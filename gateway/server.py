"""Serve one worker: the proxy listener, the admin listener, signals and graceful shutdown.

Stopping (SIGTERM or SIGINT) goes through three phases, so that a rolling deploy drops nothing:

1. **drain** (``shutdown.drain_delay``): readiness turns red at once, but the proxy keeps accepting
   and serving, because a load balancer (a Kubernetes Service, an ingress) goes on sending for a
   few seconds after the signal. Every response now carries ``Connection: close``, so keep-alive
   clients reconnect, to another replica once the balancer has caught up. A second signal ends
   the drain early.
2. **grace** (``shutdown.grace``): the proxy listener closes (new connections are refused), idle
   connections are closed, and the requests in flight, streams included, have until the end of
   the grace to finish.
3. **cut**: streams still running end with an error event in their API's grammar (the gateway is
   shutting down, retry), which the official SDKs raise as an API error rather than a broken
   stream; requests still waiting on their upstream (no response head yet: a slow model, a long
   prompt), whose client has nothing yet, are answered a retryable 503 in their API's shape with
   ``Retry-After`` and ``Connection: close``. Both have ``CUT_NOTICE`` to be sent, then every
   connection still open is aborted (a client that reads nothing gets nothing and holds nothing
   up). Either way the upstream request is closed, so the model stops generating. A cut stream is
   settled as an abandoned one (access log status 499, ``client_disconnected``); a request
   answered 503 got nothing from the model, so its reservations are refunded in full (status 503,
   audit ``shutdown``). Then the components stop (stores flushed, logs written) and the process
   exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.admin import create_admin_app
from gateway.app import RUNTIME, Runtime, create_app
from gateway.settings import Settings
from gateway.stages.draining import OpenStreams, WaitingRequests

log = logging.getLogger(__name__)

# Handlers cut at the end of the grace still settle usage (a store call each, shielded from the
# cut) before the components they use are stopped: aiohttp waits this long for each (and as long
# again for one it then has to cancel).
SETTLE_AFTER_CUT = 5.0
# Streams still running when the grace ends get this long to send their shutdown error event and
# end, and requests waiting on their upstream to close it, settle and answer 503: ample for a
# client that reads (a few hundred bytes, a store call to settle), short enough that a client
# reading nothing, whose connection is then aborted, barely delays the stop.
CUT_NOTICE = 0.5
# Deliveries of a stop signal this close to the first are the same request, not an operator
# asking to hurry: a terminal's Ctrl-C, or systemd's KillMode=control-group, signals the workers
# directly as well as through the supervisor that forwards it.
SAME_SIGNAL_WINDOW = 0.5

RequestFactory = Callable[[RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter,
                           "asyncio.Task[None]"], BaseRequest]


class StopSignals:
    """The first stop signal starts the shutdown; a later one (not a duplicate delivery of the
    first) ends the drain delay early."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._first: float | None = None
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()

    def received(self) -> None:
        now = self._clock()
        if self._first is None:
            self._first = now
            self.requested.set()
        elif now - self._first >= SAME_SIGNAL_WINDOW:
            self.hurry.set()


def closing_requests(factory: RequestFactory) -> RequestFactory:
    """``factory`` making requests that ask for the connection to close after their response, as
    a client's ``Connection: close`` would: aiohttp then answers with ``Connection: close`` and
    closes the connection once the response (a stream included) has ended."""

    def make(message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler,
             writer: AbstractStreamWriter, task: asyncio.Task[None]) -> BaseRequest:
        return factory(message._replace(should_close=True), payload, protocol, writer, task)

    return make


def close_after_next_response(server: web.Server) -> None:
    """From now on every request, on current and future connections alike, gets its response with
    ``Connection: close`` and its connection closed after it.

    Nothing is added to the request path: aiohttp's request factory is swapped, on the server for
    connections to come, and on each open connection, which took its own reference when it was
    accepted (a private attribute: should aiohttp rename it, an open connection is instead closed
    after its current response, or at once when idle, which ``test_shutdown`` would report)."""
    server.request_factory = closing_requests(server.request_factory)
    for conn in server.connections:
        if not hasattr(conn, "_request_factory"):
            conn.close()
        elif conn._request_factory is not None:  # None: the connection is already closed
            conn._request_factory = closing_requests(conn._request_factory)


async def _finish_within(server: web.Server, timeout: float) -> None:
    """aiohttp's own per-connection shutdown (each connection closed once its response ends),
    bounded here: its timeout applies twice (to the response, then again to the handler it
    cancels), so a stream would outlive ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            await server.shutdown(timeout)
    except TimeoutError:
        pass


async def _finish_or_cut(server: web.Server, grace: float, streams: OpenStreams,
                         waiting: WaitingRequests) -> tuple[int, int, int]:
    """Close idle connections, give the others up to ``grace`` to finish their responses (each is
    closed after its own), end the streams still running with their shutdown error event, answer
    the requests still waiting on their upstream with a 503, then abort the connections still
    open; returns how many requests were cut, how many of them were streams told why, and how
    many were answered 503."""
    await asyncio.sleep(0)  # connections accepted just before the listener closed get set up
    server.pre_shutdown()  # idle connections stop waiting for a next request
    await _finish_within(server, grace)
    cut = sum(1 for conn in server.connections if conn.transport is not None)
    told = streams.end_all() if cut else 0
    # Their upstream requests are cancelled (closed) at once; each answers once it has settled.
    answered = waiting.end_all() if cut else 0
    if told or answered:
        # Each relay writes its event and ends its response, and each waiting request its 503,
        # whose connection then closes. Not waited for past the notice: a client that reads
        # nothing is cut below like any other request.
        await _finish_within(server, CUT_NOTICE)
    for conn in server.connections:  # only those not closed by now
        transport = conn.transport
        if transport is not None:
            # As when a client goes away: aiohttp cancels the handler (handler_cancellation), the
            # forwarder closes the upstream request and the pipeline settles usage.
            transport.abort()
    return cut, told, answered


async def _drain(runtime: Runtime, server: web.Server, stop: StopSignals, delay: float,
                 worker_index: int) -> None:
    """Readiness red and ``Connection: close`` on every response, for ``delay`` or until a second
    stop signal; the listener keeps accepting meanwhile."""
    runtime.features.not_ready["shutdown"] = lambda: "draining"
    close_after_next_response(server)
    if delay <= 0:
        return
    log.info("worker %d draining for %gs: readiness is red, every response closes its connection "
             "(a second SIGTERM ends the drain early)", worker_index, delay)
    try:
        await asyncio.wait_for(stop.hurry.wait(), delay)
    except TimeoutError:
        return
    log.info("worker %d: a second signal ended the drain early", worker_index)


async def serve(settings: Settings, worker_index: int = 0, started: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain and stop (see the module docstring); SIGHUP reloads
    policies, keys and geo databases, during the drain too."""
    loop = asyncio.get_running_loop()
    # From the start: a stop asked for while the components start is honoured (drained) once they
    # have, rather than killing a half-started worker (or, as PID 1, being ignored).
    stop = StopSignals(loop.time)
    loop.add_signal_handler(signal.SIGTERM, stop.received)
    loop.add_signal_handler(signal.SIGINT, stop.received)
    app = create_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream request promptly instead of at the next write. shutdown_timeout only bounds the
    # settling of handlers cut at the end of the grace: the grace itself is _finish_or_cut's.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=SETTLE_AFTER_CUT)
    await runner.setup()
    runtime = app[RUNTIME]
    reuse = settings.workers > 1
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, reuse_port=reuse or None,
                       backlog=1024)
    await site.start()
    admin_runner: web.AppRunner | None = None
    if settings.admin.enabled:
        admin_runner = web.AppRunner(create_admin_app(runtime), access_log=None)
        await admin_runner.setup()
        # One admin port per worker, so each worker's metrics and status can be scraped.
        await web.TCPSite(admin_runner, settings.admin.host,
                          settings.admin.port + worker_index if settings.admin.port else 0).start()
    log.info("worker %d listening on %s", worker_index, ", ".join(str(a) for a in runner.addresses))

    reload_tasks: set[asyncio.Task[None]] = set()
    stopping = False

    def on_hup() -> None:
        if stopping:  # the components are being stopped: nothing left to reload
            log.info("worker %d: SIGHUP ignored while stopping", worker_index)
            return
        task = loop.create_task(runtime.features.reload())
        reload_tasks.add(task)
        task.add_done_callback(reload_tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    # Everything allocated so far (settings, compiled policies, key sets, readers) lives as long as
    # the process: moving it out of the collector's generations keeps GC pauses proportional to
    # per-request garbage only.
    gc.collect()
    gc.freeze()
    # The request path makes almost no reference cycles (checked with gc.DEBUG_SAVEALL), so young
    # collections mostly re-scan the objects of requests in flight: collect far less often.
    gc.set_threshold(100_000, 50, 100)
    if started is not None:
        started.set()
    await stop.requested.wait()
    log.info("worker %d stopping: readiness is red", worker_index)

    server = runner.server
    assert server is not None  # set up above, cleaned up below
    await _drain(runtime, server, stop, settings.shutdown.drain_delay, worker_index)
    await site.stop()  # new connections are refused from here on
    runtime.features.not_ready["shutdown"] = lambda: "finishing"
    grace = settings.shutdown.grace
    log.info("worker %d stopped accepting; waiting up to %gs for %d open connections",
             worker_index, grace, len(server.connections))
    cut, told, answered = await _finish_or_cut(server, grace, runtime.streams, runtime.waiting)
    if cut:
        log.warning("worker %d: the grace of %gs ran out: cut %d requests still running (%d streams "
                    "ended with a shutdown error event, where their client was reading; %d requests "
                    "waiting on their upstream answered 503)", worker_index, grace, cut, told, answered)
    stopping = True
    if reload_tasks:
        await asyncio.gather(*reload_tasks, return_exceptions=True)
    # The admin listener served readiness (red) and metrics through the drain and the grace.
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()  # settles cut handlers, then stops the components
    log.info("worker %d stopped", worker_index)
    return 0
