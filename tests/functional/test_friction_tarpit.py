"""A tarpit slows a client down but never holds its concurrency slot after the client left:
a disconnect during the first-byte delay or during paced streaming ends the request at once,
releases the slot, and settles the ``cap_tokens`` reservation to what was produced."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp

from gateway.stages.friction import FrictionStage
from gateway.upstream.mock_server import MockOptions, serve_mock
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway

POLICY = """\
version: 1
rules:
  - id: one-at-a-time
    when: {field: principal.authenticated, equals: true}
    quota:
      limits:
        - {name: conc, kind: concurrency, limit: 1, key: [principal.account]}
  - id: slow-down
    when: {field: principal.authenticated, equals: true}
    friction:
      tarpit: {first_byte_delay: %s, tokens_per_second: 2}
      cap_tokens: {limit: 100000, per: 1h}
"""
HEADERS = {"Authorization": f"Bearer {CLIENT_KEY}"}


def body(stream: bool) -> dict[str, Any]:
    return {"model": "m", "stream": stream, "max_tokens": 500,
            "messages": [{"role": "user", "content": "hi"}]}


def start(tmp_path: Path, upstream_url: str, delay: str) -> AbstractAsyncContextManager[RunningGateway]:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "rules.yaml").write_text(POLICY % delay)
    extra = f"policies: {{dir: {policies}, watch: false}}\n"
    config = gateway_yaml(upstream_url, tmp_path, extra, audit_log=tmp_path / "audit.jsonl")
    return run_gateway(config, tmp_path)


async def friction_audits(gw: RunningGateway) -> list[dict[str, Any]]:
    return [r["extra"]["friction"] for r in await gw.audit_records()  # type: ignore[index]
            if "friction" in r.get("extra", {})]  # type: ignore[operator]


def friction_stage(gw: RunningGateway) -> FrictionStage:
    return next(s for s in gw.runtime.features.stages if isinstance(s, FrictionStage))


async def settled(gw: RunningGateway) -> None:
    stage = friction_stage(gw)
    async with asyncio.timeout(2.0):
        while stage.pending:  # settled in the pipeline's finally
            await asyncio.sleep(0.005)


async def test_a_client_leaving_during_the_first_byte_delay_frees_its_slot(tmp_path: Path) -> None:
    async with serve_mock(MockOptions(chunks=4)) as upstream, start(tmp_path, upstream.url, "30s") as gw:
        async with aiohttp.ClientSession() as s:
            with_timeout = aiohttp.ClientTimeout(total=0.3)
            left_at = time.monotonic()
            try:
                async with s.post(gw.url + "/v1/chat/completions", json=body(False), headers=HEADERS,
                                  timeout=with_timeout) as r:
                    await r.read()
                raise AssertionError("the tarpit did not hold the first byte")
            except TimeoutError:
                pass  # the client gave up and closed its connection
        await settled(gw)
        # The slot is free again well before the 30 s delay would have ended: a second request is
        # admitted by the concurrency limit (and tarpitted in turn: it is only checked for a 429).
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(gw.url + "/v1/chat/completions", json=body(False), headers=HEADERS,
                                  timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                    raise AssertionError(f"answered {r.status} instead of being tarpitted")
            except TimeoutError:
                pass
        await settled(gw)
        assert time.monotonic() - left_at < 5.0
        audits = await friction_audits(gw)
        assert not upstream.state.requests  # the delay comes before the upstream is asked
    assert [a["tarpit"]["delay"] for a in audits] == [30.0, 30.0]
    # Nothing was generated: the caps' reservations were refunded in full.
    assert all(a["cap_tokens"]["settled"] == 0 for a in audits), audits


async def test_a_client_leaving_a_paced_stream_frees_its_slot_and_pays_what_was_produced(
        tmp_path: Path) -> None:
    async with serve_mock(MockOptions(chunks=40)) as upstream, start(tmp_path, upstream.url, "0s") as gw:
        async with aiohttp.ClientSession() as s:
            r = await s.post(gw.url + "/v1/chat/completions", json=body(True), headers=HEADERS)
            assert r.status == 200
            await r.content.readline()  # flowing, at 2 events a second: 20 s for the whole answer
            r.close()
        left_at = time.monotonic()
        await settled(gw)
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", json=body(False), headers=HEADERS) as r:
                assert r.status == 200  # the slot was released, not held for the rest of the stream
        assert time.monotonic() - left_at < 5.0
        audits = await friction_audits(gw)
    paced = audits[0]
    assert paced["tarpit"]["rate"] == 2.0
    # Charged the prompt and the few events streamed, not the 500 max_tokens reserved.
    assert 0 < paced["cap_tokens"]["settled"] < paced["cap_tokens"]["reserved"]
