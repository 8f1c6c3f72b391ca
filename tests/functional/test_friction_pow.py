"""A proof-of-work challenge raised by a friction policy, solved by gateway.client, and served.

The app's stages are replaced by exactly the ones under test (the wiring of the risk and friction
sections lands separately), with a one-line identity stage standing in for API keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import openai
import pytest
from aiohttp import web

from gateway.app import RUNTIME, create_app
from gateway.client import PowTransport, solve_challenge
from gateway.context import Decision, RequestContext
from gateway.policy.compile import Source, compile_sources
from gateway.policy.evaluate import Snapshot
from gateway.risk.settings import ChallengeSettings, RiskSettings
from gateway.risk.sigstore import MemorySignalStore
from gateway.settings import parse_settings
from gateway.stages.friction import FrictionStage
from gateway.stages.match import MatchStage
from gateway.stages.risk import RiskStage
from gateway.store.memory import MemoryStore
from gateway.upstream.mock_server import MockServer

POLICY = """\
version: 1
rules:
  - id: pow-everyone
    description: Every chat request solves a small proof of work.
    when: {field: request.route, equals: chat.completions}
    friction: {challenge: {kind: pow, difficulty: 8}}
"""


class Holder:
    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot


async def identify(ctx: RequestContext) -> Decision | None:
    ctx.principal.authenticated = True
    ctx.principal.account = "acct-functional"
    return None


@contextlib.asynccontextmanager
async def friction_gateway(upstream: str, tmp: Path) -> AsyncIterator[str]:
    settings = parse_settings(
        f"listen: {{host: 127.0.0.1, port: 0}}\nadmin: {{enabled: false}}\n"
        f"upstreams:\n  - name: mock\n    base_url: {upstream}\n"
        f"logging:\n  access_log: {tmp / 'access.jsonl'}\n  audit_log: null\n", str(tmp / "gw.yaml"))
    snapshot, issues = compile_sources([Source("friction.yaml", POLICY)])
    assert snapshot is not None, issues
    signals = MemorySignalStore()
    app = create_app(settings)
    # Replace whatever the config wired with exactly the stages under test.
    app[RUNTIME].features.stages[:] = ([
        identify, RiskStage(RiskSettings(), signals), MatchStage(Holder(snapshot)),
        FrictionStage(signals, MemoryStore(), ChallengeSettings(secret=b"f" * 32)),
    ])
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


MESSAGES = [{"role": "user", "content": "Let's think step by step: what is 2 + 2?"}]


async def test_challenge_is_raised_then_solved_by_hand(mock_upstream: MockServer, tmp_path: Path) -> None:
    async with friction_gateway(mock_upstream.url, tmp_path) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=2) as client:
            with pytest.raises(openai.AuthenticationError) as caught:
                await client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
            response = caught.value.response
            assert response.headers["x-should-retry"] == "false"
            assert response.headers["www-authenticate"].startswith("Tollgate-PoW ")
            body = response.json()
            assert body["error"]["code"] == "challenge_required"
            assert body["error"]["challenge"]["difficulty"] == 8
            solution = solve_challenge(body)
            result = await client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-tollgate-solution": solution})  # type: ignore[arg-type]
            assert result.choices[0].message.content
            with pytest.raises(openai.AuthenticationError):  # a solution is good once
                await client.chat.completions.create(
                    model="m", messages=MESSAGES, extra_headers={"x-tollgate-solution": solution})  # type: ignore[arg-type]
    assert len(mock_upstream.state.requests) == 1


async def test_pow_transport_solves_transparently(mock_upstream: MockServer, tmp_path: Path) -> None:
    async with friction_gateway(mock_upstream.url, tmp_path) as url:
        http = httpx2.AsyncClient(transport=PowTransport())
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0,
                                      http_client=http) as client:
            result = await client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
            assert result.choices[0].message.content
            stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            chunks = [chunk async for chunk in stream]
            assert chunks
