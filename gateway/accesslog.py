"""One structured JSON line per request, buffered off the hot path. Never prompt text.

Lines follow gateway/logfile.py: one record is always one line, strings a
client chose are capped, and a record that cannot be written is counted (``losses``) and logged
rate-limited, never raised into the request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.context import RequestContext
from gateway.logfile import (
    LineWriter,
    RecordLosses,
    client_request_id,
    client_text,
    line_or_loss,
    unwritable,
)
from gateway.tasks import cancel_and_wait
from gateway.yamlsource import ConfigError, Issue


class AccessLog:
    """Appends JSON lines to a buffer flushed every ``interval`` seconds or when it grows."""

    def __init__(self, target: str | None, interval: float = 0.5, max_buffer: int = 256 * 1024) -> None:
        self._target = target
        self.losses = RecordLosses("access")
        self._writer: LineWriter | None = None
        self._buffer: list[str] = []
        self._size = 0
        self._interval = interval
        self._max = max_buffer
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self._target is not None

    @property
    def dropped(self) -> int:
        """Lines lost so far, whatever the reason (see ``losses.counts``)."""
        return self.losses.total

    async def start(self) -> None:
        """Open the target; raises ConfigError naming ``logging.access_log`` when it cannot be
        opened for appending (the wiring checks it with the config file's position first)."""
        if self._target is None:
            return
        if self._target == "-":
            self._writer = LineWriter(self.losses)
        else:
            writer = LineWriter(self.losses, path=self._target)
            try:
                await asyncio.to_thread(writer.open)
            except OSError as exc:
                raise ConfigError([Issue(None, "logging.access_log", unwritable(self._target, exc))]) from exc
            self._writer = writer
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._flush_loop(), name="access-log")

    def log(self, ctx: RequestContext) -> None:
        """Hot path: build and encode the line; never raises."""
        if self._writer is None:
            if self._closed:
                self.losses.count("closed")
            return
        now = ctx.finished or ctx.started
        record: dict[str, Any] = {
            "ts": round(ctx.wall_time, 3),
            "request_id": ctx.request_id,
            "method": ctx.request.method,
            "route": ctx.request.route,
            "status": ctx.status,
            "duration_ms": round((now - ctx.started) * 1000, 3),
            "client_ip": str(ctx.client.ip) if ctx.client.ip else None,
            "account": client_text(ctx.principal.account),
            "model": client_text(ctx.request.model),
            "stream": ctx.request.stream,
            "input_tokens": ctx.usage.input_tokens,
            "output_tokens": ctx.usage.output_tokens,
        }
        client_id = client_request_id(ctx)
        if client_id is not None:
            record["client_request_id"] = client_id
        if ctx.upstream_ttfb is not None and ctx.upstream_started is not None:
            record["upstream_ttfb_ms"] = round((ctx.upstream_ttfb - ctx.upstream_started) * 1000, 3)
        if ctx.upstream_status is not None:
            record["upstream_status"] = ctx.upstream_status
        if ctx.client_disconnected:
            record["client_disconnected"] = True
        decision = ctx.decision
        if decision is not None:  # the gateway answered itself: why, in its neutral error kinds
            record["error"] = decision.error_type
            if decision.rule_id:
                record["rule_id"] = decision.rule_id
        if self._size >= self._max * 8:
            # The writer is stuck (a blocked pipe, a full disk): shed lines rather than grow memory.
            self.losses.count("queue_full")
            return
        line = line_or_loss(record, self.losses)
        if line is None:
            return
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= self._max and self._wake is not None:
            self._wake.set()

    def _take(self) -> str:
        """The buffered lines, taken on the event loop's thread (where ``log`` appends)."""
        data = "\n".join(self._buffer) + "\n" if self._buffer else ""
        self._buffer = []
        self._size = 0
        return data

    def _write(self, data: str) -> None:
        """Blocking write; runs in a worker thread so a slow stdout never stalls the event loop."""
        writer = self._writer
        if data and writer is not None:
            writer.write(data)

    def flush(self) -> None:
        """Write what is buffered now (blocking: for shutdown)."""
        self._write(self._take())

    async def flush_now(self) -> None:
        """Write what is buffered now, from a worker thread."""
        await asyncio.to_thread(self._write, self._take())

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
            except TimeoutError:
                pass
            self._wake.clear()
            await asyncio.to_thread(self._write, self._take())

    async def reopen(self) -> None:
        """Write what is buffered to the file in use, then reopen the path (log rotation by
        rename: SIGHUP or ``POST /admin/reload``)."""
        await asyncio.to_thread(self._reopen_sync, self._take())  # the buffer is the loop's

    def _reopen_sync(self, data: str) -> None:
        self._write(data)
        if self._writer is not None:
            self._writer.reopen()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._closed = True
        self.losses.report()

