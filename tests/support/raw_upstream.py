"""A model upstream written against the socket, for tests of what a client does with a buggy,
slow or hostile upstream: each test's ``respond`` writes the exact bytes it needs.

``async with raw_upstreams() as start`` gives ``await start(respond)``, which runs one on a free
loopback port; all of them are stopped when the block ends. ``respond(exchange)`` is called for
each request read (head and body) and returns whether to serve the connection on; the server
drains what it wrote and reads the next request, or closes the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass
class Exchange:
    """One request the raw upstream read: its number overall and its connection's number (both
    from 1), and the connection's streams to answer on."""

    n: int
    conn: int
    head: bytes
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def method(self) -> bytes:
        return self.head.split(b" ", 1)[0]


Respond = Callable[[Exchange], Awaitable[bool]]  # returns whether to serve the connection on


class RawUpstream:
    """An HTTP/1.1 server that reads requests and leaves the answers to ``respond``. It counts
    connections (overall, open now, most open at once), keeps the requests it read, and counts
    the connections its client closed (EOF seen while waiting for a request)."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[Exchange] = []
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.closed_by_client = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    def stop_accepting(self) -> None:
        """Close the listening socket: no new connections; the open ones are served on."""
        assert self._server is not None
        self._server.close()

    async def close(self) -> None:
        """Stop accepting and end every connection's handler."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        conn = self.connections
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                exchange = Exchange(len(self.requests) + 1, conn, head, body, reader, writer)
                self.requests.append(exchange)
                if not await self.respond(exchange):
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # cancelled: the test is over
        finally:
            self.open_now -= 1
            self._tasks.discard(task)
            writer.close()


RawFactory = Callable[[Respond], Awaitable[RawUpstream]]


@asynccontextmanager
async def raw_upstreams() -> AsyncIterator[RawFactory]:
    """``start(respond)`` runs a raw upstream until the block ends (a fixture's body)."""
    started: list[RawUpstream] = []

    async def start(respond: Respond) -> RawUpstream:
        upstream = RawUpstream(respond)
        await upstream.start()
        started.append(upstream)
        return upstream

    try:
        yield start
    finally:
        for upstream in started:
            await upstream.close()


async def wait_for_eof(ex: Exchange) -> bool:
    """Hold the connection until the client closes it (what a model does mid-generation)."""
    try:
        while await ex.reader.read(1024):
            pass
    except ConnectionError:
        pass
    return False


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)
