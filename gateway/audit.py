"""Decision audit: one JSON record per request, written off the request path.

Sinks buffer records in memory and a background task writes them in a worker thread, so the
event loop never waits on disk. ``close()`` writes whatever is buffered: the app calls it on
shutdown (aiohttp runs cleanup contexts on SIGTERM), so no record is lost on a graceful stop.
Records never contain prompt or completion text.

Lines follow gateway/logfile.py: one record, one line; client-chosen strings capped; records
that could not be written counted, never raised.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import threading
from typing import Any, Protocol, TextIO

from gateway.context import RequestContext
from gateway.logfile import (
    LineWriter,
    RecordLosses,
    client_request_id,
    client_text,
    line_or_loss,
)
from gateway.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Defence in depth: stage notes must not carry content, but if one does it is dropped here.
_CONTENT_KEYS = frozenset({"body", "prompt", "messages", "input", "content", "completion", "text",
                           "system", "output"})


class AuditSink(Protocol):
    """Receives one decision record per request.

    ``emit`` is called on the request path: it must be fast and must never raise. ``close``
    flushes everything emitted so far.
    """

    def emit(self, record: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class _BufferedLineSink:
    """Shared buffering: JSON-encode on emit, write batches from a worker thread."""

    def __init__(self, writer: LineWriter, losses: RecordLosses, flush_interval: float = 1.0,
                 max_buffer: int = 10_000, fsync: bool = False) -> None:
        self.losses = losses
        self._writer = writer
        self._lines: list[str] = []
        self._interval = flush_interval
        self._max_buffer = max_buffer
        self._fsync = fsync
        self._flush_lock = threading.Lock()  # batches leave in order, even when flushes overlap
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.emitted = 0

    @property
    def dropped(self) -> int:
        """Records lost so far, whatever the reason (see ``losses.counts``)."""
        return self.losses.total

    def emit(self, record: dict[str, Any]) -> None:
        if self._closed:
            self.losses.count("closed")
            return
        line = line_or_loss(record, self.losses)
        if line is None:
            return
        if len(self._lines) >= self._max_buffer:
            # The writer cannot keep up (disk full or stalled): shed load rather than grow memory.
            self.losses.count("queue_full")
            return
        self._lines.append(line)
        self.emitted += 1
        if self._task is None:
            self._start()

    def _start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (CLI, tests): records wait for flush()/close()
        self._task = loop.create_task(self._run(), name=f"audit-{type(self).__name__}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> None:
        """Write buffered records now (in a worker thread)."""
        if self._lines:
            await asyncio.to_thread(self.flush_sync)

    def flush_sync(self) -> None:
        """Blocking flush, for shutdown paths without an event loop. Never raises."""
        with self._flush_lock:
            self._write_buffered()

    def _write_buffered(self) -> None:
        """Write what is buffered (the caller holds ``_flush_lock``: batches leave in order)."""
        lines, self._lines = self._lines, []
        if lines:
            self._writer.write("\n".join(lines) + "\n", self._fsync)

    async def reopen(self) -> None:
        """Write what is buffered, then reopen the file (log rotation; SIGHUP, admin reload)."""
        await asyncio.to_thread(self._reopen_sync)

    def _reopen_sync(self) -> None:
        with self._flush_lock:
            self._write_buffered()
            self._writer.reopen()

    async def close(self) -> None:
        self._closed = True
        await cancel_and_wait(self._task)
        self._task = None
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self.flush_sync()
        self._writer.close()
        self.losses.report()


class JsonlFileSink(_BufferedLineSink):
    """Appends JSON lines to ``path`` (append mode: ``copytruncate`` rotation is safe; after a
    rotation by rename, SIGHUP or ``POST /admin/reload`` reopens the path)."""

    def __init__(self, path: str | os.PathLike[str], flush_interval: float = 1.0,
                 max_buffer: int = 10_000, fsync: bool = False) -> None:
        self.path = os.fspath(path)
        losses = RecordLosses("audit")
        super().__init__(LineWriter(losses, path=self.path), losses, flush_interval, max_buffer, fsync)

    def open(self) -> None:
        """Open the file now (blocking: at start-up); raises OSError when it cannot be appended
        to. Without this call the file is opened by the first write."""
        self._writer.open()


class StdoutSink(_BufferedLineSink):
    """JSON lines on standard output (containers ship stdout to the log pipeline)."""

    def __init__(self, stream: TextIO | None = None, flush_interval: float = 1.0) -> None:
        losses = RecordLosses("audit")
        super().__init__(LineWriter(losses, stream=stream), losses, flush_interval)


class _UtcMillis:
    """ISO 8601 UTC timestamps with milliseconds; the seconds part is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, wall_time: float) -> str:
        second = int(wall_time)
        micros = round((wall_time - second) * 1_000_000)  # as datetime.fromtimestamp rounds
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        if second != self._second:
            self._second = second
            self._prefix = dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micros // 1000:03d}+00:00"


utc_millis = _UtcMillis()


def build_audit_record(ctx: RequestContext) -> dict[str, Any]:
    """The audit record of one finished request. Never includes prompt or completion text.

    ``request_id`` is the gateway's own; what the client sent as ``X-Request-Id`` is only
    ``client_request_id``. Strings a client or a token issuer chose are capped (client_text).
    """
    outcome = ctx.outcome
    principal, client, usage = ctx.principal, ctx.client, ctx.usage
    decision = ctx.decision
    record: dict[str, Any] = {
        "ts": utc_millis(ctx.wall_time),
        "request_id": ctx.request_id,
        "client_request_id": client_request_id(ctx),
        "principal": {"authenticated": principal.authenticated, "source": principal.source,
                      "issuer": client_text(principal.issuer), "account": client_text(principal.account),
                      "org": client_text(principal.org), "tier": client_text(principal.tier),
                      "key_id": client_text(principal.key_id)},
        "client": {"ip": str(client.ip) if client.ip else None, "country": client.country,
                   "asn": client.asn},
        "api": str(ctx.request.api), "route": ctx.request.route, "model": client_text(ctx.request.model),
        "stream": ctx.request.stream,
        "decision": "deny" if decision is not None else "allow",
        "status": ctx.status or (decision.status if decision else None),
        "error_type": decision.error_type if decision else None,
        "rule_id": decision.rule_id if decision else None,
        "policy_decision": getattr(outcome, "decision", None),
        "matched_rules": list(getattr(outcome, "matched", [])),
        "shadow": [{"rule": h.rule_id, "would": h.would} for h in getattr(outcome, "shadow", [])],
        "would_decide": getattr(outcome, "would_decide", None),
        "policy_revision": ctx.policy_revision,
        "tokens": {"input": usage.input_tokens, "output": usage.output_tokens,
                   "reasoning": usage.reasoning_tokens, "cache_read": usage.cache_read_tokens,
                   "cache_write": usage.cache_write_tokens, "complete": usage.complete},
        "tags": sorted(ctx.tags),
        "upstream_status": ctx.upstream_status,
        "duration_ms": round((ctx.finished - ctx.started) * 1000, 3) if ctx.finished else None,
        "client_disconnected": ctx.client_disconnected,
    }
    extra = {k: v for k, v in ctx.audit.items() if k.lower() not in _CONTENT_KEYS}
    if extra:
        record["extra"] = extra
    return record
