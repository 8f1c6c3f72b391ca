"""Serve one worker: the proxy listener, the admin listener, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal

from aiohttp import web

from gateway.admin import create_admin_app
from gateway.app import RUNTIME, create_app
from gateway.settings import Settings

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 30.0


async def serve(settings: Settings, worker_index: int = 0, started: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads policies, keys and geo databases."""
    app = create_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream request promptly instead of at the next write.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=SHUTDOWN_GRACE)
    await runner.setup()
    runtime = app[RUNTIME]
    reuse = settings.workers > 1
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, reuse_port=reuse or None,
                       backlog=1024, shutdown_timeout=SHUTDOWN_GRACE)
    await site.start()
    admin_runner: web.AppRunner | None = None
    if settings.admin.enabled:
        admin_runner = web.AppRunner(create_admin_app(runtime), access_log=None)
        await admin_runner.setup()
        # One admin port per worker, so each worker's metrics and status can be scraped.
        await web.TCPSite(admin_runner, settings.admin.host,
                          settings.admin.port + worker_index if settings.admin.port else 0).start()
    log.info("worker %d listening on %s", worker_index, ", ".join(str(a) for a in runner.addresses))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reload_tasks: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
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
    await stop.wait()
    log.info("worker %d shutting down: finishing in-flight requests", worker_index)
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()
    return 0
