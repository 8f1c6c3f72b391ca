"""The risk signal store on a real Redis through the whole gateway: behind mode (the default)
answers known accounts locally, its writes reach Redis, and its counters are in the status and
the metrics; inline mode awaits Redis on every request."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from gateway.risk.redis_sigstore import RedisSignalStore
from gateway.risk.sigstore import AccountState, AccountTouch
from gateway.upstream.mock_server import MockServer
from tests.conftest import GatewayFactory
from tests.support.gateway import CLIENT_ACCOUNT, CLIENT_KEY
from tests.support.gateway import admin_listener as admin
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis


async def _chat(client: openai.AsyncOpenAI, i: int) -> None:
    text = f"Question {i}: what is {i} + {i}? Think step by step."
    reply = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
    assert reply.choices[0].message.content


@pytest.mark.parametrize("mode", ["behind", "inline"])
async def test_risk_signals_on_redis_through_the_gateway(mode: str, redis_server: RedisServer,
                                                          mock_upstream: MockServer,
                                                          start_gateway: GatewayFactory) -> None:
    prefix = f"t:{mode}:"
    store = f"{{backend: redis, url: '{redis_server.url}', prefix: '{prefix}', mode: {mode}}}"
    extra = f"risk: {{store: {store}}}\n"
    async with start_gateway(mock_upstream.url, extra) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
        for i in range(12):
            await _chat(client, i)
        await client.close()
        async with admin(gw) as url, aiohttp.ClientSession() as s:
            async with s.get(url + "/admin/status") as r:
                risk = (await r.json())["risk"]
            async with s.get(url + "/metrics") as r:
                metrics = await r.text()
        assert risk["store_errors"] == 0
        if mode == "behind":
            # The first request of the account was awaited; the others were answered locally.
            assert risk["inline_batches"] >= 1 and risk["local_batches"] >= 10
            assert risk["flush_errors"] == 0 and risk["mirrored"] > 0
            assert "tollgate_risk_signal_local_batches_total" in metrics
            assert "tollgate_risk_signal_flush_errors_total 0.0" in metrics
        else:
            assert "local_batches" not in risk
            assert "tollgate_risk_signal_local_batches_total" not in metrics
    # The gateway has stopped (queued writes drained): every request reached Redis.
    # (built off the loop: it reads its script file, which the blocking-call check forbids on it)
    reader = await asyncio.to_thread(RedisSignalStore.from_url, redis_server.url, prefix=prefix, deadline=2.0)
    try:
        touch = AccountTouch(f"a:{CLIENT_ACCOUNT}", (0.0, 0.0, 0.0, 0.0), "", 3600.0, 86400.0)
        probe = await reader.batch([touch])
        state = probe.results[0]
        assert isinstance(state, AccountState)
        assert state.counts[0] == pytest.approx(12.0, rel=0.01)  # decayed request count, 1 h half-life
    finally:
        await reader.close()
