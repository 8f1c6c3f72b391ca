"""Incremental Server-Sent Events framing.

The relay forwards whole events as soon as they are complete, so the parser only splits bytes on
event boundaries and never holds more than one partial event (bounded by ``max_event_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass


class SseOverflow(Exception):
    """An upstream event grew beyond the configured bound without ending."""


@dataclass(slots=True)
class SseEvent:
    """One event: its raw bytes (as received, boundary included), name and data payload."""

    raw: bytes
    event: str | None
    data: bytes

    @classmethod
    def parse(cls, raw: bytes) -> SseEvent:
        event: str | None = None
        data_lines: list[bytes] = []
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                data_lines.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace")
        return cls(raw, event, b"\n".join(data_lines))

    @staticmethod
    def encode(data: bytes, event: str | None = None) -> bytes:
        head = f"event: {event}\n".encode() if event else b""
        return head + b"data: " + data + b"\n\n"


class SseSplitter:
    """Feeds arbitrary chunks, yields complete events (normalised to ``\\n`` line ends)."""

    __slots__ = ("_buffer", "_max")

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[SseEvent]:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        events: list[SseEvent] = []
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            events.append(SseEvent.parse(buffer[start:end + 2]))
            start = end + 2
        self._buffer = buffer[start:]
        if len(self._buffer) > self._max:
            raise SseOverflow(f"SSE event larger than {self._max} bytes")
        return events

    def tail(self) -> bytes:
        """Whatever partial event is left when the stream ends."""
        rest, self._buffer = self._buffer, b""
        return rest
