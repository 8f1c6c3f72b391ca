"""Stopping a running gateway as a rolling deploy does (``shutdown.drain_delay`` and ``grace``):
readiness red while it keeps serving with ``Connection: close``, then the listener closes, streams
in flight finish (or are cut at the end of the grace), and the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.server import SAME_SIGNAL_WINDOW, StopSignals
from tests.support.gateway import CLIENT_KEY, write_keys_file
from tests.support.redis_servers import RedisServer, free_port

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
async def running(tmp: Path, shutdown: str, extra: str = "", workers: int = 1) -> AsyncIterator[Gateway]:
    (tmp / "pol").mkdir(exist_ok=True)
    (tmp / "pol" / "rules.yaml").write_text(ALLOW)
    port, admin_port = free_port(), free_port(following=workers - 1)  # an admin port per worker
    path = tmp / "gateway.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"admin: {{enabled: true, port: {admin_port}}}\n"
        "mock_upstream: {enabled: true, port: 0, chunks: 4}\n"
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
    url = url or gw.url
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert gw.proc.poll() is None, f"gateway exited with {gw.proc.returncode}:\n{gw.stderr()}"
            try:
                async with s.get(url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"gateway did not become ready at {url}:\n{gw.stderr()}")


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


async def test_sigterm_drains_with_connection_close_then_finishes_streams_and_exits_0(tmp_path: Path) -> None:
    drain, grace = 1.0, 2.0
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}") as gw:
        whole = await events_of(gw.url, 20)
        kept = await connect(gw)
        before = await kept.get("/healthz")
        assert before["status"] == "HTTP/1.1 200 OK" and "connection" not in before  # keep-alive
        async with stream(gw.url, 20, 100) as slow:  # 2 s: past the drain, within the grace
            gw.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            # Draining: readiness red at once, on both listeners, with the reason.
            await asyncio.sleep(0.2)
            status, body, connection = await get(gw.url + "/readyz")
            assert (status, body["ready"], body["not_ready"]) == (503, False, {"shutdown": "draining"})
            assert connection == "close"
            status, body, _ = await get(gw.admin_url + "/readyz")
            assert (status, body["not_ready"]) == (503, {"shutdown": "draining"})
            # New connections are still served, and told to go elsewhere afterwards.
            assert await chat(gw.url) == (200, "close")
            # So is a keep-alive connection opened before the signal: answered, then closed.
            after = await kept.get("/healthz")
            assert after["status"] == "HTTP/1.1 200 OK" and after["connection"] == "close"
            assert await kept.closed_by_server()
            kept.close()
            assert time.monotonic() - sent < drain, "the checks above must run within the drain"
            # After the drain the listener is closed: new connections are refused.
            while not await refused(gw):
                assert time.monotonic() - sent < drain + 0.5, "still accepting after the drain delay"
                await asyncio.sleep(0.05)
            assert time.monotonic() - sent >= drain - 0.1
            status, body, _ = await get(gw.admin_url + "/readyz")
            assert (status, body["not_ready"]) == (503, {"shutdown": "finishing"})
            # The stream that was running goes on to its end, intact.
            rest = await slow.read()
            assert rest.endswith(b"data: [DONE]\n\n")
            assert 1 + rest.count(b"\n\n") == whole
        assert exit_code_within(gw, sent + drain + grace + SLACK - time.monotonic()) == 0
    assert "cut" not in gw.stderr()
    records = gw.access_records()
    assert [r["status"] for r in records] == [200, 200, 200]  # the two streams and the drain's request
    assert not any(r.get("client_disconnected") for r in records)


async def test_a_stream_longer_than_the_grace_is_cut_and_settled_and_the_process_exits_0(
        tmp_path: Path) -> None:
    drain, grace = 0.5, 1.0
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}") as gw:
        async with stream(gw.url, 200, 100) as endless:  # 20 s
            gw.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            with pytest.raises(aiohttp.ClientPayloadError):
                await endless.read()
            cut_after = time.monotonic() - sent
        assert drain + grace - 0.1 <= cut_after < drain + grace + 1.0
        assert exit_code_within(gw, sent + drain + grace + SLACK - time.monotonic()) == 0
    assert "cut 1 requests still running" in gw.stderr()
    cut = gw.access_records()[-1]
    # Settled as an abandoned stream: what was relayed, and the prompt it consumed.
    assert cut["status"] == 499 and cut["client_disconnected"] is True
    assert cut["input_tokens"] > 0 and cut["output_tokens"] > 0


async def test_a_second_sigterm_ends_the_drain_and_sighup_reloads_during_it(tmp_path: Path) -> None:
    async with running(tmp_path, "{drain_delay: 20s, grace: 5s}") as gw:
        gw.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        (tmp_path / "pol" / "rules.yaml").write_text(DENY)
        gw.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while (answer := await chat(gw.url)) != (403, "close"):
            assert answer == (200, "close") and time.monotonic() < deadline, "SIGHUP did not reload"
            await asyncio.sleep(0.05)
        await asyncio.sleep(SAME_SIGNAL_WINDOW)
        idle = await connect(gw)  # a balancer's pooled connection: open, sending nothing
        assert gw.proc.poll() is None
        gw.proc.send_signal(signal.SIGTERM)
        hurried = time.monotonic()
        # Closed when the listener closes: an idle connection does not hold the grace.
        assert await idle.closed_by_server()
        idle.close()
        assert exit_code_within(gw, SLACK) == 0
        assert time.monotonic() - hurried < SLACK
    assert "a second signal ended the drain early" in gw.stderr()


def test_a_signal_delivered_twice_at_once_is_one_stop_request() -> None:
    """Ctrl-C reaches the workers from the terminal and through the supervisor: not a hurry."""
    now = [100.0]
    stop = StopSignals(lambda: now[0])
    stop.received()
    now[0] += SAME_SIGNAL_WINDOW / 10
    stop.received()
    assert stop.requested.is_set() and not stop.hurry.is_set()
    now[0] += SAME_SIGNAL_WINDOW
    stop.received()
    assert stop.hurry.is_set()


@pytest.mark.redis
async def test_workers_drain_and_finish_streams_before_the_supervisor_exits_0(
        tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_CHALLENGE_SECRET", "shared-secret-for-the-test")
    extra = (f"store: {{backend: redis, redis: {{url: '{redis_server.url}'}}}}\n"
             f"risk: {{store: {{backend: redis, url: '{redis_server.url}'}}}}\n")
    drain, grace = 1.0, 3.0
    async with running(tmp_path, f"{{drain_delay: {drain}s, grace: {grace}s}}", extra, workers=2) as gw:
        await wait_ready(gw, url=gw.admin_url_of(1))  # both workers serve (admin port + worker index)
        async with stream(gw.url, 20, 100) as slow:  # 2 s
            gw.proc.send_signal(signal.SIGTERM)  # to the supervisor, which forwards it
            sent = time.monotonic()
            await asyncio.sleep(0.2)
            assert await chat(gw.url) == (200, "close")
            assert (await slow.read()).endswith(b"data: [DONE]\n\n")
        assert await refused(gw)
        assert exit_code_within(gw, sent + drain + grace + SLACK - time.monotonic()) == 0
