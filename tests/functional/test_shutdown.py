"""Stopping a running gateway as a rolling deploy does (``shutdown.drain_delay`` and ``grace``):
readiness red while it keeps serving with ``Connection: close``, then the listener closes, streams
in flight finish, and the process exits 0; signals and the ``--workers`` supervisor. What happens
to requests still running when the grace runs out: test_shutdown_cut.py."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from gateway.server import SAME_SIGNAL_WINDOW, StopSignals
from tests.support.redis_servers import RedisServer
from tests.support.stopping import (
    DENY,
    SLACK,
    chat,
    connect,
    events_of,
    exit_code_within,
    get,
    refused,
    running,
    stream,
    wait_ready,
)


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
