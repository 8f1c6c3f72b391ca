"""When ``RespProtocol.send`` writes: at once on an idle connection, batched per event-loop
iteration while replies are pending, the prelude's commands always first (no Redis needed: a
transport that records its writes)."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.store.resp import RespProtocol, pack


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))


class OnePrelude:
    def __init__(self, packed: bytes) -> None:
        self.queue: list[tuple[bytes, asyncio.Future[Any]]] = [
            (packed, asyncio.get_running_loop().create_future())]

    def take(self) -> list[tuple[bytes, asyncio.Future[Any]]]:
        queue, self.queue = self.queue, []
        return queue

    def lost(self) -> None:
        pass


def connected(prelude: OnePrelude | None = None) -> tuple[RespProtocol, Recorder]:
    proto, transport = RespProtocol(deadline=1.0), Recorder()
    proto.connection_made(transport)
    proto.prelude = prelude
    return proto, transport


async def test_idle_connection_writes_at_once_then_batches_while_a_reply_is_pending() -> None:
    proto, transport = connected()
    first = proto.send(pack("PING"))
    assert transport.writes == [pack("PING")]  # no event-loop iteration in between
    second, third = proto.send(pack("ECHO", "a")), proto.send(pack("ECHO", "b"))
    assert len(transport.writes) == 1  # a reply is pending: buffered for one write
    await asyncio.sleep(0)
    assert transport.writes[1:] == [pack("ECHO", "a") + pack("ECHO", "b")]
    proto.data_received(b"+PONG\r\n$1\r\na\r\n$1\r\nb\r\n")
    assert (first.result(), second.result(), third.result()) == (b"PONG", b"a", b"b")
    assert not proto.waiting
    proto.send(pack("PING"))  # idle again
    assert transport.writes[-1] == pack("PING")


async def test_prelude_goes_ahead_of_an_immediate_write() -> None:
    prelude = OnePrelude(pack("ECHO", "reconcile"))
    reconcile = prelude.queue[0][1]
    proto, transport = connected(prelude)
    call = proto.send(pack("PING"))
    assert transport.writes == [pack("ECHO", "reconcile") + pack("PING")]
    proto.data_received(b"$9\r\nreconcile\r\n+PONG\r\n")
    assert reconcile.result() == b"reconcile" and call.result() == b"PONG"
