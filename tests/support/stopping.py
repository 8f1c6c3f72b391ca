"""A gateway process (``gateway run``) started and stopped by the shutdown tests: its start-up,
requests, streams and raw connections while it drains, and how it exits."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import processes
from tests.support.gateway import CLIENT_KEY, write_keys_file
from tests.support.redis_servers import free_port

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
ALLOW = "version: 1\nrules:\n  - id: big-n\n    when: {field: request.n, gt: 8}\n    deny: true\n"
DENY = ("version: 1\nrules:\n  - id: closed\n    when: {field: request.route, equals: chat.completions}\n"
        "    deny: true\n")
# Process start-up and teardown (interpreter, imports, components) on a loaded CI machine.
SLACK = 2.0


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, admin_port: int, tmp: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.admin_port = admin_port
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.tmp = tmp

    def admin_url_of(self, worker: int) -> str:
        return f"http://127.0.0.1:{self.admin_port + worker}"

    def access_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.tmp / "access.jsonl").read_text().splitlines() if line]

    def stderr(self) -> str:
        return (self.tmp / "gw.log").read_text()


@asynccontextmanager
async def running(tmp: Path, shutdown: str, extra: str = "", workers: int = 1,
                  upstream: str | None = None) -> AsyncIterator[Gateway]:
    """A gateway process; its upstream is the mock it starts itself, or the one at ``upstream``
    (a mock in the test's process, whose state the test reads)."""
    (tmp / "pol").mkdir(exist_ok=True)
    (tmp / "pol" / "rules.yaml").write_text(ALLOW)
    port, admin_port = free_port(), free_port(following=workers - 1)  # an admin port per worker
    path = tmp / "gateway.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{enabled: true, port: {admin_port}}}\n"
        + (f"upstreams: [{{name: mock, base_url: '{upstream}'}}]\n" if upstream else
           "mock_upstream: {enabled: true, port: 0, chunks: 4}\n") +
        f"identity: {{keys_file: {write_keys_file(tmp)}}}\n"
        "policies: {dir: pol, watch: false}\n"
        "logging: {access_log: access.jsonl, audit_log: null}\n"
        f"shutdown: {shutdown}\n" + extra
    )
    with (tmp / "gw.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(path),
                                 "--workers", str(workers)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    gw = Gateway(proc, port, admin_port, tmp)
    try:
        await wait_ready(gw)
        yield gw
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def wait_ready(gw: Gateway, timeout: float = 30.0, url: str | None = None) -> None:
    await processes.wait_ready(url or gw.url, gw.proc, timeout, gw.stderr)


def chat_body(stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def chat(url: str) -> tuple[int, str | None]:
    """A request on a new connection: its status and its Connection header."""
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=chat_body(), headers=AUTH) as r:
        await r.read()
        return r.status, r.headers.get("Connection")


async def get(url: str) -> tuple[int, dict[str, Any], str | None]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json(), r.headers.get("Connection")


@asynccontextmanager
async def stream(url: str, chunks: int, delay_ms: int) -> AsyncIterator[aiohttp.ClientResponse]:
    """A streamed chat completion whose first event has arrived."""
    headers = {**AUTH, "x-mock-chunks": str(chunks), "x-mock-chunk-delay-ms": str(delay_ms)}
    async with aiohttp.ClientSession() as s, s.post(url + CHAT, json=chat_body(stream=True),
                                                    headers=headers) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
        yield r


def sse_events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event]


def sse_json(event: bytes) -> dict[str, Any]:
    """The data of an event (one ``data:`` line, as the gateway writes them)."""
    data = next(line for line in event.split(b"\n") if line.startswith(b"data: "))
    value = json.loads(data[6:])
    assert isinstance(value, dict)
    return value


async def error_ending(stream: AsyncIterable[Any]) -> Exception:
    """What an SDK stream raises once it has been read to its end; it must raise."""
    try:
        async for _ in stream:
            pass
    except Exception as exc:
        return exc
    raise AssertionError("the stream ended without an error")


async def events_of(url: str, chunks: int) -> int:
    """How many events a whole stream of ``chunks`` deltas has."""
    async with stream(url, chunks, 0) as r:
        return 1 + (await r.read()).count(b"\n\n")


class RawConnection:
    """One keep-alive HTTP/1.1 connection, to see what happens to it exactly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, path: str) -> dict[str, str]:
        """The response's status line and headers (lower-cased names); the body is read."""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode()
        status, *lines = head.strip().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        await self.reader.readexactly(int(headers["content-length"]))
        return {"status": status, **headers}

    async def closed_by_server(self) -> bool:
        return await asyncio.wait_for(self.reader.read(), 5) == b""

    def close(self) -> None:
        self.writer.close()


async def connect(gw: Gateway) -> RawConnection:
    return RawConnection(*await asyncio.open_connection("127.0.0.1", gw.port))


async def refused(gw: Gateway) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def exit_code_within(gw: Gateway, seconds: float) -> int:
    try:
        return gw.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {seconds:g}s:\n{gw.stderr()}") from None


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)
