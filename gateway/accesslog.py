"""One structured JSON line per request, buffered off the hot path. Never prompt text."""

from __future__ import annotations

import asyncio
import sys
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

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def start(self) -> None:
        if self._target is None:
            return
        if self._target == "-":
            self._stream = sys.stdout
        else:
            self._stream = open(self._target, "a", encoding="utf-8")  # noqa: SIM115 - long-lived
            self._owns_stream = True
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
        line = orjson.dumps(record).decode()
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= self._max:
            self.flush()

    def flush(self) -> None:
        if not self._buffer or self._stream is None:
            return
        data = "\n".join(self._buffer) + "\n"
        self._buffer.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except OSError:
            pass  # a full disk must not take the request path down; lines are dropped

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.flush()

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self.flush()
        if self._owns_stream and self._stream is not None:
            self._stream.close()
        self._stream = None
