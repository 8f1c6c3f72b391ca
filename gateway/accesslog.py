"""One structured JSON line per request, buffered off the hot path. Never prompt text."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import IO, Any

import orjson

from gateway.context import RequestContext
from gateway.tasks import cancel_and_wait


class AccessLog:
    """Appends JSON lines to a buffer flushed every ``interval`` seconds or when it grows."""

    def __init__(self, target: str | None, interval: float = 0.5, max_buffer: int = 256 * 1024) -> None:
        self._target = target
        self._stream: IO[str] | None = None
        self._owns_stream = False
        self._buffer: list[str] = []
        self._size = 0
        self._interval = interval
        self._max = max_buffer
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._lock = threading.Lock()
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        return self._target is not None

    async def start(self) -> None:
        if self._target is None:
            return
        if self._target == "-":
            self._stream = sys.stdout
        else:
            self._stream = await asyncio.to_thread(open, self._target, "a", encoding="utf-8")
            self._owns_stream = True
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._flush_loop(), name="access-log")

    def log(self, ctx: RequestContext) -> None:
        if self._stream is None:
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
            "account": ctx.principal.account,
            "model": ctx.request.model,
            "stream": ctx.request.stream,
            "input_tokens": ctx.usage.input_tokens,
            "output_tokens": ctx.usage.output_tokens,
        }
        if ctx.upstream_ttfb is not None and ctx.upstream_started is not None:
            record["upstream_ttfb_ms"] = round((ctx.upstream_ttfb - ctx.upstream_started) * 1000, 3)
        if ctx.upstream_status is not None:
            record["upstream_status"] = ctx.upstream_status
        if ctx.client_disconnected:
            record["client_disconnected"] = True
        if ctx.decision is not None and ctx.decision.rule_id:
            record["rule_id"] = ctx.decision.rule_id
        if self._size >= self._max * 8:
            # The writer is stuck (a blocked pipe, a full disk): shed lines rather than grow memory.
            self.dropped += 1
            return
        line = orjson.dumps(record).decode()
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= self._max and self._wake is not None:
            self._wake.set()

    def _take(self) -> str:
        data = "\n".join(self._buffer) + "\n" if self._buffer else ""
        self._buffer = []
        self._size = 0
        return data

    def _write(self, data: str) -> None:
        """Blocking write; runs in a worker thread so a slow stdout never stalls the event loop."""
        stream = self._stream
        if not data or stream is None:
            return
        with self._lock:
            try:
                stream.write(data)
                stream.flush()
            except (OSError, ValueError):
                self.dropped += data.count("\n")  # a closed or full sink must not break requests

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

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self.flush()
        if self._owns_stream and self._stream is not None:
            self._stream.close()
        self._stream = None
