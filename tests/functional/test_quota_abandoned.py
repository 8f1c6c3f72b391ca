"""A client that gives up while its request's quota charge waits on Redis: the gateway drops the
request (aiohttp cancels the handler), Redis runs the charge once it answers, and the gateway
gives back what it reserved: the token budget and the concurrency slot are whole again. Driven by
the official OpenAI SDK against a real redis-server paused with CLIENT PAUSE."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from prometheus_client import generate_latest

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis

POLICY = """\
version: 1
rules:
  - id: per-account
    quota:
      limits:
        - {name: tpd, kind: total_tokens, limit: 100000, per: 1d, key: [principal.account]}
        - {name: conc, kind: concurrency, limit: 1, key: [principal.account]}
"""


@pytest.fixture
async def gw(mock_upstream: MockServer, redis_server: RedisServer,
             tmp_path: Path) -> AsyncIterator[RunningGateway]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "quota.yaml").write_text(POLICY)
    extra = (f"policies: {{dir: {policies}, watch: false}}\n"
             f"store: {{backend: redis, redis: {{url: '{redis_server.url}'}}, deadline: 2s}}\n")
    async with run_gateway(gateway_yaml(mock_upstream.url, tmp_path, extra), tmp_path) as running:
        yield running


async def test_a_client_that_gives_up_during_the_charge_pays_nothing(
        gw: RunningGateway, redis_server: RedisServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
        first = await client.chat.completions.with_raw_response.create(
            model="gpt-test", max_tokens=5000, messages=[{"role": "user", "content": "Hello"}])
        full = int(first.headers["x-ratelimit-remaining-tokens"])
        subprocess.run(["redis-cli", "-p", str(redis_server.port), "client", "pause", "600", "all"],
                       check=True, capture_output=True)
        with pytest.raises(openai.APITimeoutError):  # the client walks away mid-charge
            await client.chat.completions.create(
                model="gpt-test", max_tokens=5000, messages=[{"role": "user", "content": "Hello"}],
                timeout=0.2)
        async with asyncio.timeout(5):
            while gw.runtime.readiness()["quota"]["redis"]["abandoned_refunds"] < 1:
                await asyncio.sleep(0.02)
        # Redis charged 5,000+ reserved tokens and the only concurrency slot after the client had
        # gone; both were given back, so the next request fits and sees only the first's usage.
        after = await client.chat.completions.with_raw_response.create(
            model="gpt-test", max_tokens=10, messages=[{"role": "user", "content": "Hello"}])
    assert after.http_response.status_code == 200
    reserved_now = full - int(after.headers["x-ratelimit-remaining-tokens"])
    assert reserved_now < 100, (full, after.headers["x-ratelimit-remaining-tokens"])
    records = await gw.access_records()
    assert [r["status"] for r in records] == [200, 499, 200]
    stats = gw.runtime.readiness()["quota"]["redis"]
    assert stats["abandoned_refunds"] == 1 and stats["abandoned_unknown"] == 0
    metrics = generate_latest(gw.runtime.metrics.registry).decode()
    assert "tollgate_store_abandoned_charges_refunded_total 1.0" in metrics
