"""Shared pieces of the load benchmarks: a raw keep-alive HTTP/1.1 client, /proc CPU and memory
accounting, and process helpers. Used by bench/load.py and bench/reload_under_load.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PROMPT = "Say hello to the benchmark in a few words."
TICK = 1.0 / os.sysconf("SC_CLK_TCK")


# -- the raw client ----------------------------------------------------------------------------
class Conn(asyncio.Protocol):
    """One keep-alive connection; ``request`` writes pre-encoded bytes and awaits the last byte."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[tuple[int, bool]] | None = None
        self.first: asyncio.Future[None] | None = None  # set when the first body bytes arrive
        self._reset()

    def _reset(self) -> None:
        self.buf.clear()
        self.status = 0
        self.body_start = -1
        self.length = -1  # -1: chunked, else Content-Length
        self.pos = 0  # chunked parse position

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.done, self.first):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection lost"))

    def _finish(self) -> None:
        assert self.done is not None
        self.done.set_result((self.status, b"[DONE]" in self.buf))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done is None or self.done.done():
            return
        if self.body_start < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            self.body_start = self.pos = end + 4
            at = head.find(b"\ncontent-length:")
            if at >= 0:
                eol = head.find(b"\r", at + 1)
                self.length = int(head[at + 16 : eol if eol > 0 else None])
            elif b"transfer-encoding: chunked" not in head:
                self.length = 0
        if self.first is not None and not self.first.done() and len(self.buf) > self.body_start:
            self.first.set_result(None)
        if self.length >= 0:
            if len(self.buf) >= self.body_start + self.length:
                self._finish()
            return
        while True:  # chunked: walk the complete chunks received so far
            eol = self.buf.find(b"\r\n", self.pos)
            if eol < 0:
                return
            size = int(self.buf[self.pos : eol].split(b";")[0], 16)
            if size == 0:
                if len(self.buf) >= eol + 4:
                    self._finish()
                return
            if len(self.buf) < eol + size + 4:
                return
            self.pos = eol + size + 4

    async def request(self, payload: bytes, want_first: bool = False) -> tuple[int, bool]:
        """Send one request; returns (status, saw ``[DONE]``)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._reset()
        self.done = loop.create_future()
        self.first = loop.create_future() if want_first else None
        self.transport.write(payload)
        return await self.done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(port: int) -> Conn:
    transport, conn = await asyncio.get_running_loop().create_connection(Conn, "127.0.0.1", port)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def request_bytes(port: int, stream: bool, extra: dict[str, str]) -> bytes:
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}], "stream": stream}
    ).encode()
    headers = {
        "Host": f"127.0.0.1:{port}",
        "Content-Type": "application/json",
        "Authorization": os.environ.get("BENCH_AUTH", "Bearer tg_bench_key_0001"),  # bench/bench-keys.yaml
        "Content-Length": str(len(body)),
        **extra,
    }
    head = "POST /v1/chat/completions HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


# -- /proc accounting --------------------------------------------------------------------------
def process_tree(pid: int) -> Iterator[int]:
    """``pid`` and its descendants (a gateway with --workers forks children)."""
    yield pid
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tids:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            yield from process_tree(int(child))


def cpu_seconds(pid: int) -> float:
    ticks = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of stat(5)
    return ticks * TICK


def rss_kib(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in lines if line.startswith("VmRSS:"))
    return total


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Target:
    name: str
    port: int
    pid: int  # the process whose CPU and memory are measured


async def ready(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = await connect(port)
            try:
                status, _ = await asyncio.wait_for(conn.request(request_bytes(port, False, {})), 5)
            finally:
                conn.close()
            if status == 200:
                return True
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.2)
    return False


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Output goes to a file: the gateway's access log costs here what it costs in production.
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
