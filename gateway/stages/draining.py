"""What a stopping gateway does to the requests still in flight when its grace runs out.

Each is answered in its API's grammar rather than having its connection reset, which the SDKs
report as a connection error and logs show as a crash: a stream being relayed ends with an error
event (:class:`OpenStreams`), a request whose client has had nothing yet gets a retryable 503
(:class:`WaitingRequests`). Both say ``SHUTTING_DOWN``: retry, another replica serves it.
gateway/server.py calls ``end_all`` on both at the cut; gateway/stages/forward.py registers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from gateway.context import Decision


class GatewayShutdown(Exception):
    """The gateway is stopping and the grace ran out: the stream ends now (see :class:`OpenStreams`)."""


# Retry-After: another replica serves the retry (the SDKs reconnect, and the balancer stopped
# sending here during the drain), so a second is enough; it only applies to the 503 answer, a
# stream's error event carries no headers.
SHUTTING_DOWN = Decision(status=503, error_type="unavailable",
                         message="The gateway is shutting down; retry the request.", retryable=True,
                         headers={"Retry-After": "1"})


class OpenStreams:
    """The streams being relayed, so that a stopping gateway can end those still running when its
    grace runs out with an error event in their API's grammar (``SHUTTING_DOWN``: retryable, the
    gateway's doing), instead of only cutting their connections.

    Ending a stream fails its upstream body with :class:`GatewayShutdown`, as the pool's read
    timeout fails a silent one: the relay wakes from its read, and ends the response through the
    path of an upstream failure. A relay blocked on a client that reads nothing is not woken; the
    server aborts its connection once its short notice is over. A stream starting after that
    (its upstream answered during the notice) is ended at once. Costs a set insertion and removal
    per stream."""

    __slots__ = ("_open", "_ended")

    def __init__(self) -> None:
        self._open: set[aiohttp.StreamReader] = set()
        self._ended = False

    def add(self, body: aiohttp.StreamReader) -> None:
        self._open.add(body)
        if self._ended:
            _end(body)

    def discard(self, body: aiohttp.StreamReader) -> None:
        self._open.discard(body)

    def end_all(self) -> int:
        """End every stream being relayed, and those to come; returns how many were running."""
        self._ended = True
        for body in self._open:
            _end(body)
        return len(self._open)


def _end(body: aiohttp.StreamReader) -> None:
    if body.exception() is None:  # else it already fails, and its relay ends with that error
        body.set_exception(GatewayShutdown())


class WaitingRequests:
    """The requests whose client has had nothing of their response yet while the forwarder waits
    on their upstream (for the response head, or for a whole body it buffers, or in the tarpit's
    delay), so that a stopping gateway whose grace runs out answers them ``SHUTTING_DOWN``, a
    retryable 503 in their API's shape, instead of resetting their connections: an SDK would
    retry a reset too, but other clients, and the logs, would see a crash.

    Ending them cancels each one's handler task, as a client disconnect does (aiohttp's
    handler_cancellation): leaving the upstream's context closes the upstream connection, so the
    model stops generating. The forwarder then recognises the cancellation as the gateway's own
    (:meth:`cut`) and answers instead of giving up. A request reaching the forwarder afterwards
    (during the notice) is answered at once, without asking its upstream. A request leaves the
    set when its stream starts (:class:`OpenStreams` ends it then). Costs a set insertion and
    removal per request."""

    __slots__ = ("_waiting", "_cut", "_ended")

    def __init__(self) -> None:
        self._waiting: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()  # filled only at the cut
        self._ended = False

    def add(self, task: asyncio.Task[Any]) -> bool:
        """Register ``task`` as waiting; False when the gateway already ended the waits (the
        request is to be answered at once)."""
        if self._ended:
            return False
        self._waiting.add(task)
        return True

    def discard(self, task: asyncio.Task[Any]) -> None:
        self._waiting.discard(task)

    def cut(self, task: asyncio.Task[Any]) -> bool:
        """For ``task``, being cancelled: whether :meth:`end_all` alone cancelled it. Its
        cancellation request is then withdrawn and the request is to be answered; False when the
        task was not cut, or when another cancellation stands besides (its client went away too),
        which must go on."""
        return task in self._cut and task.uncancel() == 0

    def end_all(self) -> int:
        """Cancel every wait, and refuse those to come; returns how many were waiting."""
        self._ended = True
        for task in self._waiting:
            if task.cancel():
                self._cut.add(task)
        return len(self._cut)
