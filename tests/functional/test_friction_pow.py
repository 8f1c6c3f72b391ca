"""Friction through the real wiring (keys, risk, policy, quota, friction stages from config):
a proof-of-work challenge raised and solved by gateway.client, degraded outputs that the official
SDKs still parse, and a tarpit."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from gateway.client import SOLUTION_HEADER, PowSyncTransport, PowTransport, solve_challenge
from gateway.upstream.mock_server import MockServer
from tests.conftest import GatewayFactory
from tests.functional.test_friction_tarpit import settled
from tests.support.gateway import CLIENT_KEY, RunningGateway, gateway_yaml, run_gateway

POW = """\
version: 1
rules:
  - id: pow-everyone
    description: Every chat request solves a small proof of work.
    when: {field: request.route, equals: chat.completions}
    friction: {challenge: {kind: pow, difficulty: 8}}
"""
POW_AND_CAP = """\
version: 1
rules:
  - id: pow-and-cap
    when: {field: request.route, equals: chat.completions}
    friction:
      challenge: {kind: pow, difficulty: 8}
      cap_tokens: {limit: 1500, per: 1h}
"""
# A window short enough for the SDK to retry the 429 (it gives up on a Retry-After over 2 minutes).
POW_AND_SHORT_CAP = POW_AND_CAP.replace("per: 1h", "per: 1s")
DEGRADE = """\
version: 1
rules:
  - id: degrade-openai
    when: {field: request.route, equals: chat.completions}
    friction:
      degrade: {strip_logprobs: true, strip_reasoning: true, force_n1: true, cap_max_tokens: 64}
  - id: degrade-anthropic
    when: {field: request.route, equals: messages}
    friction:
      degrade: {strip_reasoning: true}
"""
TARPIT = """\
version: 1
rules:
  - id: slow-everyone
    when: {field: principal.authenticated, equals: true}
    friction: {tarpit: {first_byte_delay: 300ms}}
"""
PROMPT = "Let's think step by step: what is 2 + 2?"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
# The same message: each SDK types it as its own TypedDict, and neither accepts the other's.
ANT_MESSAGES: list[MessageParam] = [{"role": "user", "content": PROMPT}]


def policy_yaml(tmp: Path, text: str) -> str:
    directory = tmp / "pol"
    directory.mkdir(exist_ok=True)
    (directory / "rules.yaml").write_text(text)
    return f"policies: {{dir: {directory}, watch: false}}\n"


def oa(url: str, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, **kw)  # type: ignore[arg-type]


async def test_challenge_is_raised_then_solved_by_hand(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLLGATE_CHALLENGE_SECRET", "s" * 32)
    async with (
        start_gateway(mock_upstream.url, policy_yaml(tmp_path, POW)) as gw,
        oa(gw.url, max_retries=2) as c,
    ):
        with pytest.raises(openai.AuthenticationError) as caught:
            await c.chat.completions.create(model="m", messages=MESSAGES)
        response = caught.value.response
        assert response.headers["x-should-retry"] == "false"  # the SDK did not retry blindly
        assert response.headers["www-authenticate"].startswith("Tollgate-PoW ")
        body = response.json()
        assert body["error"]["code"] == "challenge_required"
        assert body["error"]["challenge"]["difficulty"] == 8
        solution = solve_challenge(body)
        result = await c.chat.completions.create(
            model="m", messages=MESSAGES, extra_headers={"x-tollgate-solution": solution}
        )
        assert result.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):  # a solution is good once
            await c.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"x-tollgate-solution": solution}
            )
        records = await gw.access_records()
    assert len(mock_upstream.state.requests) == 1
    assert [r["status"] for r in records] == [401, 200, 401]


async def challenged(c: openai.AsyncOpenAI) -> str:
    """A solution to the challenge a request without one is answered with."""
    with pytest.raises(openai.AuthenticationError) as caught:
        await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000)
    return solve_challenge(caught.value.response.json())


async def test_a_solution_refused_by_the_token_cap_is_accepted_once_the_cap_allows(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """The solution is spent only once nothing in the friction stage refuses the request: a 429
    from cap_tokens leaves it good for the retry, and it is still accepted only once."""
    async with (
        start_gateway(mock_upstream.url, policy_yaml(tmp_path, POW_AND_CAP)) as gw,
        oa(gw.url, max_retries=0) as c,
    ):
        # A stream held open reserves 1,000 output tokens (+ its input) of the 1,500 until it ends.
        slow = {"x-mock-chunks": "500", "x-mock-chunk-delay-ms": "20"}
        held = await c.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=1000, stream=True,
            extra_headers={"x-tollgate-solution": await challenged(c), **slow})
        solution = await challenged(c)
        with_solution = {"x-tollgate-solution": solution}
        with pytest.raises(openai.RateLimitError) as caught:
            await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000,
                                            extra_headers=with_solution)
        assert int(caught.value.response.headers["retry-after"]) >= 1
        await held.close()  # the client leaves: it pays what was streamed, the rest is refunded
        await settled(gw)
        result = await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000,
                                                 extra_headers=with_solution)
        assert result.choices[0].message.content
        with pytest.raises(openai.AuthenticationError) as replayed:  # and still good only once
            await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000,
                                            extra_headers=with_solution)
        assert replayed.value.response.json()["error"]["code"] == "challenge_required"
        await settled(gw)  # the replay's cap reservation, refunded
        records = await gw.access_records()
    assert len(mock_upstream.state.requests) == 2
    assert [r["status"] for r in records] == [401, 401, 429, 499, 200, 401]


async def test_pow_transport_solves_transparently(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    async with start_gateway(mock_upstream.url, policy_yaml(tmp_path, POW)) as gw:
        http = httpx2.AsyncClient(transport=PowTransport())
        async with oa(gw.url, max_retries=0, http_client=http) as c:
            result = await c.chat.completions.create(model="m", messages=MESSAGES)
            assert result.choices[0].message.content
            stream = await c.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            assert [chunk async for chunk in stream]


def pow_verdicts(records: list[dict[str, object]]) -> list[str]:
    """The friction stage's word on each request's proof of work, oldest first (audit records)."""
    frictions = [r["extra"].get("friction", {}) for r in records  # type: ignore[attr-defined]
                 if "request_id" in r and isinstance(r.get("extra"), dict)]
    return [f["pow"] for f in frictions if "pow" in f]


async def hold_the_cap(c: openai.AsyncOpenAI) -> openai.AsyncStream[Any]:
    """A stream held open, reserving 1,000 output tokens (+ its input) of POW_AND_CAP's 1,500
    until it is closed."""
    slow = {"x-mock-chunks": "500", "x-mock-chunk-delay-ms": "20"}
    return await c.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=1000, stream=True,
        extra_headers={"x-tollgate-solution": await challenged(c), **slow})


@pytest.fixture
def transport() -> PowTransport:
    # Made outside the event loop: the first HTTP transport imports httpcore2, which reads files.
    return PowTransport()


async def test_pow_transport_reuses_its_solution_when_the_sdk_retries_a_cap_429(
    mock_upstream: MockServer, tmp_path: Path, transport: PowTransport
) -> None:
    """The SDK retries the cap's 429 with its original request (no solution); the transport puts
    the unspent solution back on it, so the request is admitted without a second solve."""
    config = gateway_yaml(mock_upstream.url, tmp_path, policy_yaml(tmp_path, POW_AND_SHORT_CAP),
                          audit_log=tmp_path / "audit.jsonl")
    async with (
        run_gateway(config, tmp_path) as gw,
        oa(gw.url, max_retries=0) as by_hand,
        oa(gw.url, max_retries=4, http_client=httpx2.AsyncClient(transport=transport)) as c,
    ):
        held = await hold_the_cap(by_hand)
        retried = asyncio.create_task(
            c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1000))
        async with asyncio.timeout(10):  # the transport solved, then the cap refused
            while 429 not in [r["status"] for r in await gw.access_records()]:
                await asyncio.sleep(0.01)
        assert transport.solved == 1
        await held.close()
        await settled(gw)
        result = await retried  # the SDK's own retry, after the cap's Retry-After
        assert result.choices[0].message.content
        assert transport.solved == 1  # the retry carried the same solution
        # Admitted: the solution is spent and forgotten; the next request gets a challenge of its
        # own instead of trying a spent solution first (which the audit would show as replayed).
        await c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
        assert transport.solved == 2
        records = await gw.audit_records()
    verdicts = pow_verdicts(records)  # in the order requests ended (the held stream's comes late)
    # Three challenges in all: the held stream's (solved by hand), the refused request's and the
    # follow-up's. The retry brought the first solution back (unspent at the 429, ok after it;
    # "unspent" twice if a retry came before the cap allowed), never a spent one (replayed).
    assert verdicts.count("issued") == 3 and verdicts.count("ok") == 3, verdicts
    assert verdicts.count("unspent") in (1, 2) and len(verdicts) in (7, 8), verdicts
    assert verdicts[-2:] == ["issued", "ok"], verdicts
    assert len(mock_upstream.state.requests) == 3


class Tap(httpx2.BaseTransport):
    """A real HTTP transport that also notes the solution each request it sends carries."""

    def __init__(self) -> None:
        self.inner = httpx2.HTTPTransport()
        self.sent: list[str | None] = []

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        self.sent.append(request.headers.get(SOLUTION_HEADER))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def tap() -> Tap:
    return Tap()  # outside the event loop, as the transport fixture above


async def test_pow_sync_transport_forgets_a_solution_the_gateway_spent_elsewhere(
    mock_upstream: MockServer, tmp_path: Path, tap: Tap
) -> None:
    """The blocking twin, through the sync openai SDK (in a thread): a solution kept after a 429
    that someone else then spends is answered with a new challenge, solved, and not tried again."""
    transport = PowSyncTransport(inner=tap)
    async with start_gateway_with(mock_upstream, tmp_path) as gw, oa(gw.url, max_retries=0) as by_hand:
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0,
                           http_client=httpx2.Client(transport=transport)) as sync:

            def ask(max_tokens: int) -> str | None:
                answer = sync.chat.completions.create(model="m", messages=MESSAGES, max_tokens=max_tokens)
                return answer.choices[0].message.content

            held = await hold_the_cap(by_hand)
            with pytest.raises(openai.RateLimitError):
                await asyncio.to_thread(ask, 1000)
            assert transport.solved == 1
            kept = tap.sent[-1]
            assert kept is not None and tap.sent == [None, kept]
            await held.close()
            await settled(gw)
            spent = await by_hand.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10,
                                                          extra_headers={SOLUTION_HEADER: kept})
            assert spent.choices[0].message.content
            assert await asyncio.to_thread(ask, 10)  # tried the kept one: replayed, so solved anew
            assert transport.solved == 2 and tap.sent[2] == kept and tap.sent[3] not in (None, kept)
            assert await asyncio.to_thread(ask, 10)  # that one was spent on admission: none put on
            assert transport.solved == 3 and tap.sent[4] is None
        records = await gw.audit_records()
    assert pow_verdicts(records) == ["issued",  # the held stream's challenge
                                     "issued", "unspent",  # the cap refused: kept
                                     "ok",  # the held stream, ended
                                     "ok",  # spent by hand
                                     "replayed", "ok",  # tried, challenged again, solved
                                     "issued", "ok"]


async def test_degrade_edits_the_request_and_strips_the_response(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    async with start_gateway(mock_upstream.url, policy_yaml(tmp_path, DEGRADE)) as gw:
        async with oa(gw.url, max_retries=0) as c:
            result = await c.chat.completions.create(
                model="m", messages=MESSAGES, logprobs=True, top_logprobs=3, n=3, max_tokens=1000
            )
        sent = mock_upstream.state.requests[-1].body
        assert "logprobs" not in sent and "top_logprobs" not in sent
        assert sent["n"] == 1 and sent["max_tokens"] == 64
        assert len(result.choices) == 1 and result.choices[0].logprobs is None
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0) as a:
            async with a.messages.stream(
                model="claude-mock",
                max_tokens=2000,
                thinking={"type": "enabled", "budget_tokens": 1024},
                messages=ANT_MESSAGES,
            ) as stream:
                final = await stream.get_final_message()
    # The upstream did think (a thinking block came first); the gateway dropped it and renumbered
    # the rest, and the SDK rebuilt the message from the relayed events without complaint.
    assert mock_upstream.state.requests[-1].body["thinking"]["type"] == "enabled"
    assert [block.type for block in final.content] == ["text"]
    assert final.content[0].text  # type: ignore[union-attr]


async def test_tarpit_delays_the_first_byte(
    mock_upstream: MockServer, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    async with start_gateway(mock_upstream.url, policy_yaml(tmp_path, TARPIT)) as gw, oa(gw.url) as c:
        started = time.monotonic()
        await c.chat.completions.create(model="m", messages=MESSAGES)
        assert time.monotonic() - started >= 0.3


async def test_pow_sync_transport_never_sends_a_solution_past_its_expiry(
    mock_upstream: MockServer, tmp_path: Path, tap: Tap
) -> None:
    """A kept solution whose challenge has expired by the transport's clock stays home: the
    gateway would only answer it with a new challenge."""
    now = [time.time()]
    transport = PowSyncTransport(inner=tap, clock=lambda: now[0])
    async with (
        start_gateway_with(mock_upstream, tmp_path) as gw,
        oa(gw.url, max_retries=0) as by_hand,
    ):
        with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0,
                           http_client=httpx2.Client(transport=transport)) as sync:
            held = await hold_the_cap(by_hand)
            with pytest.raises(openai.RateLimitError):
                await asyncio.to_thread(sync.chat.completions.create, model="m", messages=MESSAGES,
                                        max_tokens=1000)
            await held.close()
            await settled(gw)
            now[0] += 300  # risk.challenge.ttl, the default: the token's expiry has passed
            result = await asyncio.to_thread(sync.chat.completions.create, model="m", messages=MESSAGES,
                                             max_tokens=10)
            assert result.choices[0].message.content
    assert transport.solved == 2 and tap.sent[0] is None and tap.sent[2] is None  # nothing put on


def start_gateway_with(mock: MockServer, tmp: Path) -> AbstractAsyncContextManager[RunningGateway]:
    """The gateway with POW_AND_CAP and an audit log."""
    config = gateway_yaml(mock.url, tmp, policy_yaml(tmp, POW_AND_CAP), audit_log=tmp / "audit.jsonl")
    return run_gateway(config, tmp)
