"""Incremental Server-Sent Events framing.

The relay forwards whole events as soon as they are complete, so the splitter only cuts bytes on
event boundaries and never holds more than one partial event (bounded by ``max_event_bytes``).
Events stay raw bytes: most are relayed untouched, and a handler parses the few it needs
(usage-bearing ones, or all of them when shaping), which keeps the per-event cost to a few
byte searches.
"""

from __future__ import annotations

from typing import Any

import orjson


class SseOverflow(Exception):
    """An upstream event grew beyond the configured bound without ending."""


def event_name(raw: bytes) -> bytes | None:
    """The ``event:`` field of a raw event (None when it has none)."""
    if not raw.startswith(b"event:"):
        start = raw.find(b"\nevent:")
        if start < 0:
            return None
        start += 1
    else:
        start = 0
    end = raw.find(b"\n", start)
    return raw[start + 6:end if end >= 0 else None].strip()


def json_object(data: bytes) -> dict[str, Any] | None:
    """An event's data as a JSON object; None when it is not one (cut, corrupt, or another type)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def event_data(raw: bytes) -> bytes:
    """The joined ``data:`` lines of a raw event."""
    if raw.startswith(b"data: ") and b"\n" not in raw:
        return raw[6:]  # the common single-line case
    lines = []
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines)


def encode_event(data: bytes, event: bytes | str | None = None) -> bytes:
    """An event without its blank-line terminator (the relay adds it)."""
    if event is None:
        return b"data: " + data
    name = event.encode() if isinstance(event, str) else event
    return b"event: " + name + b"\ndata: " + data


class SseSplitter:
    """Feeds arbitrary chunks, returns complete raw events without their blank-line terminator
    (line ends normalised to ``\\n``)."""

    __slots__ = ("_buffer", "_max", "_skip_lf")

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buffer = b""
        self._max = max_event_bytes
        self._skip_lf = False  # the last chunk ended on a CR already taken as a line end

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]  # the second half of that CRLF
        buffer = self._buffer + chunk if self._buffer else chunk
        carry = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):
                buffer = buffer[:-1].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                if buffer.endswith(b"\n"):
                    # The CR ends a blank line whether a LF follows or not: the event is complete
                    # now. Holding it back would leave the last event of a CR-framed stream to
                    # the tail, which the relay sends without the handler seeing it.
                    buffer += b"\n"
                    self._skip_lf = True
                else:
                    carry = b"\r"  # maybe the first half of a CRLF: decide with the next chunk
            else:
                buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = buffer.split(b"\n\n")
        rest = events.pop()
        if len(rest) > self._max:
            raise SseOverflow(f"SSE event larger than {self._max} bytes")
        self._buffer = rest + carry
        return events

    @property
    def pending(self) -> bool:
        """True while part of an event is held back waiting for its end."""
        return bool(self._buffer)

    def tail(self) -> bytes:
        """Whatever partial event is left when the stream ends."""
        rest, self._buffer, self._skip_lf = self._buffer, b"", False
        return rest
