"""Three real gateway processes sharing one real Redis: a single-key limit of N admits exactly N.

Each gateway is ``python -m gateway run`` with its own built-in mock upstream; the quota lives
only in Redis (Lua check-and-charge with Redis time), so 500 concurrent requests spread over
the three processes must produce exactly N successes, whatever the interleaving.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.gateway import CLIENT_KEY, write_keys_file
from tests.support.processes import wait_ready
from tests.support.redis_servers import RedisServer, free_port, start_server

pytestmark = [pytest.mark.redis, pytest.mark.slow]

LIMIT = 37
REQUESTS = 500
GATEWAYS = 3
REPO = Path(__file__).resolve().parents[2]

POLICY = f"""\
version: 1
rules:
  - id: shared-hourly
    quota:
      limits:
        - {{name: rph, kind: requests, limit: {LIMIT}, per: 1h, burst: {LIMIT}}}
"""


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def shared_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_server(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def gateways(shared_redis: RedisServer, tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-quota.yaml").write_text(POLICY)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "listen: {host: 127.0.0.1, port: 0}\n"
        "admin: {enabled: false}\n"
        "mock_upstream: {enabled: true, port: 0, chunks: 4}\n"
        f"identity: {{keys_file: {write_keys_file(tmp_path)}}}\n"
        f"policies: {{dir: {policies}, watch: false}}\n"
        "store:\n"
        "  backend: redis\n"
        f"  redis: {{url: '{shared_redis.url}', key_prefix: 'tgtest:'}}\n"
        # A loaded CI box must not turn this into a deadline test; a store failure fails closed
        # (503), so it could never pass as an over-admission.
        "  deadline: 5s\n"
        f"quota: {{on_store_failure: closed, replicas: {GATEWAYS}}}\n"
        "logging: {access_log: null, audit_log: null, level: WARNING}\n"
    )
    started: list[GatewayProcess] = []
    try:
        for i in range(GATEWAYS):
            port = free_port()
            log = tmp_path / f"gateway{i}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gateway", "run", "--config", str(config), "--port", str(port)],
                    cwd=REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            started.append(GatewayProcess(f"http://127.0.0.1:{port}", proc, log))
        yield started
    finally:
        for gw in started:
            gw.stop()


async def test_shared_redis_admits_exactly_the_limit(
    gateways: list[GatewayProcess], shared_redis: RedisServer
) -> None:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(wait_ready(gw.url, gw.proc, output=gw.log.read_text) for gw in gateways))
        start = asyncio.Event()

        async def one(i: int) -> tuple[int, int]:
            gw = gateways[i % GATEWAYS]
            await start.wait()  # release all at once: maximum contention on the one key
            async with session.post(
                f"{gw.url}/v1/chat/completions",
                json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            ) as resp:
                body = await resp.read()
                assert resp.status in (200, 429), (resp.status, body[:300])
                if resp.status == 429:
                    assert resp.headers["x-should-retry"] != "false" and "Retry-After" in resp.headers
                return i % GATEWAYS, resp.status

        tasks = [asyncio.create_task(one(i)) for i in range(REQUESTS)]
        await asyncio.sleep(0)
        start.set()
        results = await asyncio.gather(*tasks)

    statuses = collections.Counter(status for _, status in results)
    assert statuses == {200: LIMIT, 429: REQUESTS - LIMIT}
    # Every gateway took part in the race (each saw denials) — the limit was not split per replica.
    per_gateway = collections.Counter(i for i, status in results if status == 429)
    assert len(per_gateway) == GATEWAYS
    # The quota state is in Redis, under the configured prefix.
    client = aioredis.Redis.from_url(shared_redis.url)
    try:
        keys = [key async for key in client.scan_iter(match="tgtest:*")]
    finally:
        await client.aclose()
    assert keys, "no quota key in Redis"
