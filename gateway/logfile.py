"""JSON-lines log files shared by the access log and the audit log.

One record is always one line, whatever its strings hold (:func:`json_line`); strings a client
chose are capped (:func:`client_text`); a record that cannot be written is counted by reason and
logged rate-limited, never raised into the request (:class:`RecordLosses`); files are appended
unbuffered from a worker thread and reopened on request, so rename-based log rotation works
(:class:`LineWriter`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from gateway.context import RequestContext

log = logging.getLogger(__name__)

# What str.splitlines() (and JavaScript, and some log shippers) treat as a line break but JSON
# encoders may leave raw: orjson escapes U+0000-U+001F itself, not NEL, LS or PS. Outside strings
# JSON is ASCII, so escaping them in the encoded text changes no value.
_LINE_BREAKS = str.maketrans({c: f"\\u{c:04x}" for c in (0x0b, 0x0c, 0x1c, 0x1d, 0x1e, 0x85,
                                                         0x2028, 0x2029)})

MAX_CLIENT_TEXT = 256  # longest client-chosen string written into a record (model, ids, claims)
MAX_CLIENT_REQUEST_ID = 128

LOSS_REASONS = ("write_error", "queue_full", "unserialisable", "closed")


def json_line(record: dict[str, Any]) -> str:
    """``record`` as one line of JSON (no newline), safe for line-oriented readers.

    Raises TypeError only for a value that cannot be serialised even once its strings are cleaned.
    """
    try:
        text = orjson.dumps(record, default=str).decode()
    except TypeError:  # a lone surrogate (undecodable header bytes, a JSON "\\ud800" escape)
        text = orjson.dumps(_scrub(record), default=str).decode()
    return text if text.isascii() else text.translate(_LINE_BREAKS)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def client_text(value: object, limit: int = MAX_CLIENT_TEXT) -> str | None:
    """A client-chosen value as it may be written into a record: text of at most ``limit``
    characters plus a visible marker when cut, with undecodable characters shown escaped."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = f"{text[:limit]}...[truncated {len(text) - limit} chars]"
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def client_request_id(ctx: RequestContext) -> str | None:
    """The ``X-Request-Id`` the client sent, for the records only: never the gateway's own id."""
    return client_text(ctx.request.headers.get("x-request-id"), MAX_CLIENT_REQUEST_ID)


def unwritable(path: str, exc: OSError) -> str:
    """The start-up message for a log file that cannot be opened for appending."""
    return f"cannot open {path} for appending: {exc.strerror or exc}"


class RecordLosses:
    """Records a log could not write: counted by reason, reported to a metric when bound, and
    logged at most once per ``interval`` seconds (a full disk must not flood the process log).

    ``count`` is called from the event loop and from writer threads; it never raises.
    """

    def __init__(self, log_name: str, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log_name = log_name
        self.counts: dict[str, int] = {}
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._unreported = 0
        self._last_reason = ""
        self._last_report: float | None = None
        self._metric: Callable[[str, int], None] | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def bind(self, metric: Callable[[str, int], None]) -> None:
        """Report every loss to ``metric(reason, n)`` (bind once); each reason's series starts at
        zero, so an alert on its increase works before the first loss."""
        for reason in LOSS_REASONS:
            metric(reason, 0)
        for reason, n in self.counts.items():
            metric(reason, n)
        self._metric = metric

    def count(self, reason: str, n: int = 1, error: BaseException | None = None) -> None:
        if n <= 0:
            return
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + n
            self._unreported += n
            self._last_reason = f"{reason}: {error}" if error is not None else reason
            now = self._clock()
            due = self._last_report is None or now - self._last_report >= self._interval
            if due:
                self._last_report = now
        if self._metric is not None:
            self._metric(reason, n)
        if due:
            self.report()

    def report(self) -> None:
        """Log the losses not reported yet (also called on close, so none goes unmentioned)."""
        with self._lock:
            lost, self._unreported = self._unreported, 0
            why = self._last_reason
        if lost:
            log.error("%s log: %d records lost (last: %s); see tollgate_log_records_lost_total",
                      self.log_name, lost, why)


def line_or_loss(record: dict[str, Any], losses: RecordLosses) -> str | None:
    """``record`` as one JSON line, or None after counting it as ``unserialisable``."""
    try:
        return json_line(record)
    except TypeError as exc:
        losses.count("unserialisable", 1, exc)
        return None


class LineWriter:
    """Writes batches of lines to a file (appending) or a text stream, from a worker thread.

    A file is written unbuffered, one ``write`` per batch until done: a failed write loses only
    the lines it did not finish (counted), a line cut short is ended before the next batch so it
    cannot merge with the next record, and nothing half-written stays in a buffer to reappear.
    """

    def __init__(self, losses: RecordLosses, path: str | None = None,
                 stream: TextIO | None = None) -> None:
        self._path = path  # None: ``stream``, or standard output as it is when written
        self._stream = stream
        self._file: Any = None  # io.FileIO once opened
        self._torn = False
        self._closed = False
        self._lock = threading.Lock()  # a periodic flush and close may overlap in threads
        self._losses = losses

    def open(self) -> None:
        """Open the file now (blocking); raises OSError when it cannot be opened for appending."""
        with self._lock:
            self._open()

    def _open(self) -> None:
        if self._file is None and self._path is not None:
            self._file = open(self._path, "ab", buffering=0)  # kept open between batches

    def reopen(self) -> None:
        """Close the file so that the next batch opens ``path`` anew (blocking). After rotation
        by rename the old name keeps what was written and the path gets a new file; a
        ``copytruncate`` rotation needs no reopen (the file is opened for appending)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._torn = False  # a line cut short belongs to the old file

    def write(self, data: str, fsync: bool = False) -> None:
        """Write whole lines (each ending with a newline); never raises."""
        if not data:
            return
        with self._lock:
            if self._closed:
                self._losses.count("closed", data.count("\n"))
            elif self._path is None:
                self._write_stream(data)
            else:
                self._write_file(data.encode("utf-8"), fsync)

    def _write_stream(self, data: str) -> None:
        stream = self._stream or sys.stdout
        try:
            stream.write(data)
            stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            self._losses.count("write_error", data.count("\n"), exc)

    def _write_file(self, data: bytes, fsync: bool) -> None:
        prefix = 1 if self._torn else 0
        if prefix:
            data = b"\n" + data
        done = 0
        try:
            self._open()
            while done < len(data):
                done += self._file.write(memoryview(data)[done:])
            if fsync:
                os.fsync(self._file.fileno())
        except (OSError, ValueError) as exc:
            self._losses.count("write_error", data.count(b"\n", max(done, prefix)), exc)
            if done:
                self._torn = data[done - 1] != 0x0A
            return
        self._torn = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None
