"""The gateway with its quotas in a real 3-primary Redis Cluster, driven by the official OpenAI
SDK: limits whose keys hash to different slots are enforced together, the rate-limit headers
follow them, and readiness and metrics show how the store reaches the cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from prometheus_client import generate_latest

from gateway.upstream.mock_server import MockServer
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway
from tests.support.redis_servers import start_cluster

pytestmark = [pytest.mark.redis, pytest.mark.cluster]

POLICY = """\
version: 1
rules:
  - id: per-account
    quota:
      limits:
        - {name: rpm, kind: requests, limit: 4, per: 1m, burst: 4, key: [principal.account]}
        - {name: tpd, kind: total_tokens, limit: 1000000, per: 1d, key: [principal.org]}
        - {name: rpm-net, kind: requests, limit: 100, per: 1m, burst: 100, key: [client.ip_prefix]}
"""


@pytest.fixture
async def gw(mock_upstream: MockServer, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    cluster = start_cluster(tmp_path / "cluster")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "quota.yaml").write_text(POLICY)
    nodes = ", ".join(cluster.urls)
    extra = (f"policies: {{dir: {policies}, watch: false}}\n"
             f"store: {{backend: redis, redis: {{cluster_nodes: [{nodes}]}}, deadline: 2s}}\n")
    try:
        async with run_gateway(gateway_yaml(mock_upstream.url, tmp_path, extra), tmp_path) as running:
            yield running
    finally:
        cluster.stop()


async def test_quotas_in_a_redis_cluster(gw: RunningGateway) -> None:
    remaining: list[str] = []
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
        for _ in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": "Hello there"}])
            remaining.append(raw.headers["x-ratelimit-remaining-requests"])
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 1_000_000
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="gpt-test",
                                                 messages=[{"role": "user", "content": "Hi"}])
    assert remaining == ["3", "2", "1", "0"]
    assert refused.value.status_code == 429 and refused.value.response.headers["retry-after"]
    detail = gw.runtime.readiness()["quota"]
    assert detail["backend"] == "redis" and detail["errors"] == 0
    cluster = detail["redis"]["cluster"]
    assert cluster["cold_nodes"] == [] and cluster["connections"] >= 2 and cluster["redirects"] == 0
    metrics = generate_latest(gw.runtime.metrics.registry).decode()
    assert "tollgate_store_cluster_redirects_total 0.0" in metrics
