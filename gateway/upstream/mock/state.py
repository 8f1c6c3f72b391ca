"""What the mock upstream saw: recent requests and stream outcomes, for tests and benchmarks.

Owned by one application object (``app[MOCK_STATE]``), never module-level, so two mock servers
in one test process do not share counters.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

StreamOutcome = Literal["active", "completed", "cancelled", "failed"]


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as received. Header names are lower-cased; repeated headers are joined with
    ``", "``. ``body`` is the parsed JSON (``None`` when absent or not JSON)."""

    seq: int
    request_id: str
    received_at: float  # time.time()
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    body_bytes: int


@dataclass(slots=True)
class StreamRecord:
    """Life of one streamed response. Times are ``time.monotonic()`` (CLOCK_MONOTONIC, so they
    compare across processes on one Linux host) plus ``ended_wall`` for humans."""

    request_id: str
    path: str
    started: float
    ended: float | None = None
    ended_wall: float | None = None
    outcome: StreamOutcome = "active"
    frames_sent: int = 0


@dataclass(slots=True)
class MockState:
    """Counters and recent history. Mutated only from the event loop that serves the app."""

    history: int = 256
    requests: deque[RecordedRequest] = field(init=False)
    streams: deque[StreamRecord] = field(init=False)
    requests_total: int = 0
    requests_cancelled: int = 0  # non-streamed requests whose client went away (e.g. ``hang``)
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0  # the client went away mid-stream
    streams_failed: int = 0  # an injected mid-stream fault ended the stream
    active_streams: int = 0
    cancel_times: deque[float] = field(init=False)  # monotonic time of each stream cancellation
    _changed: asyncio.Event | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.requests = deque(maxlen=self.history)
        self.streams = deque(maxlen=self.history)
        self.cancel_times = deque(maxlen=self.history)

    # -- recording -------------------------------------------------------------------------
    def next_request_id(self) -> tuple[int, str]:
        self.requests_total += 1
        return self.requests_total, f"req_mock_{self.requests_total:08d}"

    def record_request(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        self._notify()

    def stream_started(self, request_id: str, path: str) -> StreamRecord:
        record = StreamRecord(request_id=request_id, path=path, started=time.monotonic())
        self.streams.append(record)
        self.streams_started += 1
        self.active_streams += 1
        self._notify()
        return record

    def stream_finished(self, record: StreamRecord, outcome: StreamOutcome) -> None:
        if record.outcome != "active":  # a stream ends once, whichever path noticed first
            return
        record.outcome = outcome
        record.ended = time.monotonic()
        record.ended_wall = time.time()
        self.active_streams -= 1
        if outcome == "completed":
            self.streams_completed += 1
        elif outcome == "cancelled":
            self.streams_cancelled += 1
            self.cancel_times.append(record.ended)
        else:
            self.streams_failed += 1
        self._notify()

    def request_cancelled(self) -> None:
        self.requests_cancelled += 1
        self._notify()

    def reset(self) -> None:
        """Forget history and zero the counters (active streams keep running and are still
        counted in ``active_streams``)."""
        active = self.active_streams
        self.requests.clear()
        self.streams.clear()
        self.cancel_times.clear()
        self.requests_total = self.requests_cancelled = 0
        self.streams_started = self.streams_completed = 0
        self.streams_cancelled = self.streams_failed = 0
        self.active_streams = active
        self._notify()

    # -- reading ---------------------------------------------------------------------------
    @property
    def last_request(self) -> RecordedRequest | None:
        return self.requests[-1] if self.requests else None

    def stats(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "requests_cancelled": self.requests_cancelled,
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "streams_cancelled": self.streams_cancelled,
            "streams_failed": self.streams_failed,
            "active_streams": self.active_streams,
            "cancel_times": list(self.cancel_times),
            "streams": [asdict(s) for s in self.streams],
        }

    def requests_json(self, limit: int | None = None) -> list[dict[str, Any]]:
        items = list(self.requests)
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return [asdict(r) for r in items]

    async def wait_for(self, predicate: Callable[[MockState], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate(self)`` holds, woken by every state change (no polling sleeps).

        Raises ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while not predicate(self):
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()

    def _notify(self) -> None:
        event, self._changed = self._changed, None
        if event is not None:
            event.set()
