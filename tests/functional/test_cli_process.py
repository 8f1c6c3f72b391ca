"""The ``gateway`` command as an operator runs it: refusals at start, SIGHUP reload, SIGTERM drain,
and ``--workers N`` sharing one port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.gateway import CLIENT_KEY, write_keys_file
from tests.support.processes import wait_ready
from tests.support.redis_servers import RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
ALLOW_ALL = "version: 1\nrules:\n  - id: small-n\n    when: {field: request.n, gt: 8}\n    deny: true\n"
DENY_ALL = (
    "version: 1\nrules:\n  - id: closed\n    when: {field: request.route, equals: chat.completions}\n"
    "    deny: true\n"
)


def gateway(*args: str, cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "gateway", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=out)


def config(tmp: Path, port: int, extra: str = "") -> Path:
    (tmp / "pol").mkdir(exist_ok=True)
    (tmp / "pol" / "rules.yaml").write_text(ALLOW_ALL)
    path = tmp / "gateway.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        "admin: {enabled: false}\n"
        "mock_upstream: {enabled: true, port: 0}\n"
        f"identity: {{keys_file: {write_keys_file(tmp)}}}\n"
        "policies: {dir: pol, watch: false}\n"
        "logging: {access_log: null, audit_log: audit.jsonl}\n" + extra
    )
    return path


async def chat(url: str) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s, s.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {CLIENT_KEY}"}
    ) as r:
        return r.status


def test_invalid_config_is_refused_with_file_line_and_expectation(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  host: 127.0.0.1\n  prot: 8080\nupstreams:\n  - base_url: ftp://x\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{path}:3:3: listen.prot: unknown key 'prot'; did you mean 'port'?" in proc.stderr
    assert f"{path}:5:15: upstreams[0].base_url: expected an http:// or https:// URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_invalid_policy_at_start_exits_non_zero(tmp_path: Path) -> None:
    path = config(tmp_path, free_port())
    (tmp_path / "pol" / "rules.yaml").write_text("version: 1\nrules:\n  - id: r\n    when: {feild: x}\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "rules.yaml:4:" in proc.stderr and "feild" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_emptied_policy_directory_refuses_to_start(tmp_path: Path) -> None:
    """No policy file would otherwise start the gateway allowing every request."""
    path = config(tmp_path, free_port())
    (tmp_path / "pol" / "rules.yaml").unlink()
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{tmp_path / 'pol'}:1:1: no policy files (*.yaml, *.yml), expected at least one" in proc.stderr
    assert "Traceback" not in proc.stderr


PORT = "expected a port number 0-65535, got"
DELAY = "expected milliseconds from 0 to 3600000, got"


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--config", "g.yaml", "--port", "65536"], f"argument --port: {PORT} 65536"),
    (["run", "--config", "g.yaml", "--port", "-1"], f"argument --port: {PORT} -1"),
    (["run", "--config", "g.yaml", "--workers", "0"],
     "argument --workers: expected a positive number of worker processes, got 0"),
    (["mock-upstream", "--port", "99999"], f"argument --port: {PORT} 99999"),
    (["mock-upstream", "--chunks", "100001"],
     "argument --chunks: expected a number of chunks from 0 to 100000, got 100001"),
    (["mock-upstream", "--chunk-delay-ms", "-5"], f"argument --chunk-delay-ms: {DELAY} -5"),
    (["mock-upstream", "--chunk-delay-ms", "inf"], f"argument --chunk-delay-ms: {DELAY} inf"),
    (["policy", "test", "pol", "--min-coverage", "101"],
     "argument --min-coverage: expected a percentage from 0 to 100, got 101"),
])
def test_out_of_range_flags_are_usage_errors(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """In process: argparse refuses them before anything starts (exit code 2, like a bad config)."""
    from gateway.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_in_range_flags_parse() -> None:
    from gateway.cli import build_parser

    run = build_parser().parse_args(["run", "--config", "g.yaml", "--port", "0", "--workers", "4"])
    assert (run.port, run.workers) == (0, 4)
    mock = build_parser().parse_args(["mock-upstream", "--port", "65535", "--chunks", "0",
                                      "--chunk-delay-ms", "3600000"])
    assert (mock.port, mock.chunks, mock.chunk_delay_ms) == (65535, 0, 3600000.0)


def test_workers_with_the_memory_store_are_refused(tmp_path: Path) -> None:
    path = config(tmp_path, free_port())
    proc = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(path), "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "TOLLGATE_CHALLENGE_SECRET"})
    assert proc.returncode == 2
    assert "--workers 2 with the memory store" in proc.stderr
    assert "risk.store.backend: memory" in proc.stderr
    assert "needs a shared proof-of-work secret" in proc.stderr


async def test_sighup_reloads_and_sigterm_drains_with_every_audit_record(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = gateway("run", "--config", str(config(tmp_path, port)), cwd=REPO, log=tmp_path / "gw.log")
    try:
        await wait_ready(url, proc)
        statuses = await asyncio.gather(*(chat(url) for _ in range(20)))
        assert statuses == [200] * 20
        (tmp_path / "pol" / "rules.yaml").write_text(DENY_ALL)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while await chat(url) == 200:
            assert time.monotonic() < deadline, "SIGHUP did not reload the policies"
            await asyncio.sleep(0.05)
        assert await chat(url) == 403
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    allowed = [r for r in records if r["decision"] == "allow"]
    denied = [r for r in records if r["decision"] == "deny"]
    assert len(allowed) >= 20 and len(denied) >= 2  # nothing lost on SIGTERM
    assert {r["rule_id"] for r in denied} == {"closed"}


@pytest.mark.redis
async def test_workers_share_the_port_and_stop_together(tmp_path: Path, redis_server: RedisServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = (f"store: {{backend: redis, redis: {{url: '{redis_server.url}'}}}}\n"
             f"risk: {{store: {{backend: redis, url: '{redis_server.url}'}}}}\n")
    monkeypatch.setenv("TOLLGATE_CHALLENGE_SECRET", "shared-secret-for-the-test")
    proc = gateway("run", "--config", str(config(tmp_path, port, extra)), "--workers", "2", cwd=REPO,
                   log=tmp_path / "gw.log")
    try:
        await wait_ready(url, proc)
        statuses = await asyncio.gather(*(chat(url) for _ in range(40)))
        assert statuses == [200] * 40
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
