"""Sending one mock response: delays, injected faults, SSE pacing and stream bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from .call import Call
from .options import MID_BODY_FAULTS, Control, MockOptions
from .state import MockState, StreamRecord
from .wire import Family, Frame, dumps, error_body, stream_error_frame

_BAD_JSON: Final[dict[Family, bytes]] = {
    "openai": b'data: {"id": "chatcmpl-broken", "choices": [{"delta": \n\n',
    "anthropic": b'event: content_block_delta\ndata: {"type": "content_block_delta", "ind\n\n',
}


def id_header(family: Family, request_id: str) -> dict[str, str]:
    return {"request-id" if family == "anthropic" else "x-request-id": request_id}


def error_response(
    family: Family, status: int, message: str, request_id: str, **headers: str
) -> web.Response:
    return web.Response(
        status=status,
        body=dumps(error_body(family, status, message, request_id)),
        content_type="application/json",
        headers={**id_header(family, request_id), **headers},
    )


def reset_connection(request: web.BaseRequest) -> None:
    """Abort with a TCP RST (SO_LINGER 0), which is what "connection reset by peer" looks like."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Without linger 0 the peer sees a clean FIN; the reset is the point of this fault, but
        # a transport that refuses the option still gets aborted below.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request being answered, with everything the delivery needs."""

    request: web.Request
    state: MockState
    options: MockOptions
    call: Call
    control: Control
    family: Family

    def error(self, status: int, message: str, **headers: str) -> web.Response:
        return error_response(self.family, status, message, self.call.request_id, **headers)

    async def _before_headers(self) -> web.Response | None:
        """First-byte delay and the faults that strike before the status line."""
        fault, delay = self.control.fault, self.control.first_byte_delay
        if fault == "slow-headers" and not delay:
            delay = self.options.slow_headers_seconds
        try:
            if delay:
                await asyncio.sleep(delay)
            if fault == "hang":
                await asyncio.sleep(self.options.hang_seconds)
                return self.error(500, "mock: hang expired")
        except asyncio.CancelledError:  # the client gave up before any byte was sent
            self.state.request_cancelled()
            raise
        if fault == "status-500":
            return self.error(500, "mock: injected server error")
        if fault == "status-429":
            return self.error(429, "mock: injected rate limit", **{"retry-after": "1"})
        return None

    async def send_body(self, payload: bytes) -> web.StreamResponse:
        """A non-streamed JSON answer (faults cut or corrupt it half-way)."""
        early = await self._before_headers()
        if early is not None:
            return early
        fault, half = self.control.fault, len(payload) // 2
        headers = id_header(self.family, self.call.request_id)
        if fault == "bad-json":
            return web.Response(body=payload[:half], content_type="application/json", headers=headers)
        if fault == "error-mid-stream":
            return self.error(500, "mock: injected server error")
        if fault not in ("reset-mid-stream", "stall-mid-stream"):
            return web.Response(body=payload, content_type="application/json", headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_type = "application/json"
        resp.content_length = len(payload)
        await resp.prepare(self.request)
        await resp.write(payload[:half])
        if fault == "reset-mid-stream":
            reset_connection(self.request)
            return resp
        try:
            await asyncio.sleep(self.options.hang_seconds)
        except asyncio.CancelledError:
            self.state.request_cancelled()
            raise
        await resp.write(payload[half:])
        return resp

    async def send_stream(self, frames: list[Frame]) -> web.StreamResponse:
        """SSE frames, paced by the chunk delay; records how the stream ended."""
        early = await self._before_headers()
        if early is not None:
            return early
        resp = web.StreamResponse(
            headers={"cache-control": "no-cache", **id_header(self.family, self.call.request_id)}
        )
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        record = self.state.stream_started(self.call.request_id, self.request.path)
        try:
            await resp.prepare(self.request)
            if await self._write_frames(resp, frames, record):
                await resp.write_eof()
                self.state.stream_finished(record, "completed")
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            self.state.stream_finished(record, "cancelled")
            raise
        except ConnectionResetError:  # the client went away and the next write noticed
            self.state.stream_finished(record, "cancelled")
        return resp

    async def _write_frames(
        self, resp: web.StreamResponse, frames: list[Frame], record: StreamRecord
    ) -> bool:
        """Write the frames; False when an injected fault ended the stream early."""
        fault, delay = self.control.fault, self.control.chunk_delay
        fault_at = sum(1 for _, paced in frames if paced) // 2 if fault in MID_BODY_FAULTS else -1
        paced_seen = 0
        for payload, paced in frames:
            if paced:
                if paced_seen == fault_at and not await self._mid_stream_fault(resp, record):
                    return False
                paced_seen += 1
                if delay:
                    await asyncio.sleep(delay)
            if payload:
                await resp.write(payload)
            record.frames_sent += 1
        return True

    async def _mid_stream_fault(self, resp: web.StreamResponse, record: StreamRecord) -> bool:
        """Apply the mid-stream fault; True when the stream carries on afterwards."""
        fault = self.control.fault
        if fault == "bad-json":  # a corrupt event, then the rest of the stream as usual
            await resp.write(_BAD_JSON[self.family])
            return True
        if fault == "error-mid-stream":  # the provider's own in-stream error event (overloaded / 500)
            status = 529 if self.family == "anthropic" else 500
            await resp.write(
                stream_error_frame(self.family, status, "mock: injected stream error", self.call.request_id)
            )
            await resp.write_eof()
        elif fault == "reset-mid-stream":
            reset_connection(self.request)
        else:  # stall-mid-stream: headers and half the events, then silence
            await asyncio.sleep(self.options.hang_seconds)
        self.state.stream_finished(record, "failed")
        return False
