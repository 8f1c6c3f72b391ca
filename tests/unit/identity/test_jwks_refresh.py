"""The refresh timer (``JwksRefresher``): key sets stay current whether tokens arrive or not, an
identity provider's outage shows as a growing age and climbing failures while the last good keys
work on until ``jwks_max_stale``, retries back off from the cooldown to the ttl, intervals are
jittered, and stopping leaves nothing running. Time is a FakeClock moved by FakeSleep."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.identity.config import JwtConfig
from gateway.identity.jwks import JwksFile, JwksRefresher, JwksUrl, KeySource
from gateway.identity.jwt import InvalidToken, JwtVerifier
from tests.unit.identity.test_jwt import issuer_config
from tests.unit.identity.tokens import ISSUER, FakeClock, FakeSleep, JwksServer, claims, public_jwk, sign

ALLOWED = frozenset({"RS256"})
TTL, COOLDOWN, MAX_STALE = 600.0, 30.0, 3600.0


def middle() -> float:
    """A ``rand`` drawing the middle of the jitter range: every interval exactly as configured."""
    return 0.5


def url_source(server: TestServer, clock: FakeClock, **kwargs: Any) -> JwksUrl:
    options: dict[str, Any] = {"ttl": TTL, "cooldown": COOLDOWN, "max_stale": MAX_STALE} | kwargs
    return JwksUrl(str(server.make_url("/jwks.json")), ALLOWED, clock=clock, **options)


@contextlib.asynccontextmanager
async def refreshing(source: KeySource, clock: FakeClock, rand: Callable[[], float] = middle,
                     settle: bool = True) -> AsyncIterator[FakeSleep]:
    """A refresher of ``source`` running for the block; ``settle``: its start-up fetch done first."""
    sleep = FakeSleep(clock)
    refresher = JwksRefresher([source], sleep=sleep, rand=rand)
    refresher.start()
    try:
        if settle:
            await sleep.asleep()
        yield sleep
    finally:
        await refresher.stop()


def verifier(source: KeySource, sleep: FakeSleep, rand: Callable[[], float] = middle) -> JwtVerifier:
    config = JwtConfig(issuers=(issuer_config(algorithms=("RS256",)),))
    return JwtVerifier(config, sources={ISSUER: source}, sleep=sleep, rand=rand)


class Provider(KeySource):
    """An identity provider in process: serves ``doc`` unless ``down``, notes when it was asked,
    and can hold a fetch until ``gate`` opens."""

    def __init__(self, jwk: dict[str, Any], clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(ALLOWED, clock=clock, **{"ttl": TTL, "cooldown": COOLDOWN, "max_stale": MAX_STALE}
                         | kwargs)
        self.doc: dict[str, Any] = {"keys": [jwk]}
        self.down = False
        self.gate: asyncio.Event | None = None
        self.asked_at: list[float] = []
        self.refresh_calls = 0

    async def _fetch(self) -> bytes:
        self.asked_at.append(self._clock())
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise OSError("connection refused")
        return json.dumps(self.doc).encode()

    async def refresh(self) -> bool:
        self.refresh_calls += 1
        return await super().refresh()


def intervals(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]


async def test_an_idle_issuer_is_refreshed_on_the_timer_without_any_token(
        jwks_server: tuple[JwksServer, TestServer], rsa_key: Any, clock: FakeClock) -> None:
    state, server = jwks_server
    sleep = FakeSleep(clock)
    source = url_source(server, clock)
    v = verifier(source, sleep)
    v.start()
    try:
        await sleep.asleep()  # the start-up fetch is done; the timer waits for the next one
        assert state.hits == 1
        for hour in range(1, 6):  # five hours without a single token: five times max_stale
            await sleep.advance(3600)
            assert state.hits == 1 + 6 * hour  # every ttl, over real HTTP
            fresh = source.freshness()
            assert not fresh.stale and fresh.age == 0.0 and fresh.stale_in == MAX_STALE
        # The first token after the quiet spell finds current keys: no fetch, no wait.
        assert (await v.authenticate(sign(rsa_key, claims()))).account == "acct-1"
        assert state.hits == 31 and source.failures == 0
    finally:
        await v.close()


async def test_an_outage_ages_the_keys_counts_failures_and_they_work_until_max_stale_then_recover(
        jwks_server: tuple[JwksServer, TestServer], rsa_key: Any, clock: FakeClock) -> None:
    state, server = jwks_server
    sleep = FakeSleep(clock)
    source = url_source(server, clock)
    v = verifier(source, sleep)
    token = sign(rsa_key, claims())
    v.start()
    try:
        await sleep.asleep()
        assert (await v.authenticate(token)).account == "acct-1"
        state.fail = True  # the provider goes down, and no token arrives to notice
        ages, failures = [], []
        for _ in range(6):
            await sleep.advance(600)
            fresh = source.freshness()
            assert fresh.age is not None and not fresh.stale
            ages.append(fresh.age)
            failures.append(source.failures)
            assert (await v.authenticate(token)).account == "acct-1"  # the last good keys work on
        assert ages == [600, 1200, 1800, 2400, 3000, 3600]  # from the last success: 0 s left
        # Retried at +30, +60, +120, +240, +480, then every ttl: failures keep climbing.
        assert failures == [1, 5, 6, 7, 8, 9] and state.hits == 1 + 9
        assert source.freshness().stale_in == 0.0

        await sleep.advance(1)  # past max_stale: refused, the cached token too
        assert source.freshness().stale
        with pytest.raises(InvalidToken, match="no key for kid"):
            await v.authenticate(token)  # (its own fetch attempt fails as well)
        assert source.failures == 10  # the token's own attempt

        state.fail = False  # the provider is back: the timer's next retry, not a token, finds it
        await sleep.advance(600)
        fresh = source.freshness()
        assert not fresh.stale and fresh.age is not None and fresh.age < 600
        assert source.failures == 10
        assert (await v.authenticate(token)).account == "acct-1"
    finally:
        await v.close()


async def test_retries_back_off_from_the_cooldown_to_the_ttl_and_success_resumes_the_ttl(
        rsa_key: Any, clock: FakeClock) -> None:
    provider = Provider(public_jwk(rsa_key, "k1"), clock)
    async with refreshing(provider, clock) as sleep:
        provider.down = True
        await sleep.advance(600 + 30 + 60 + 120 + 240 + 480 + 600 + 600)
        provider.down = False
        await sleep.advance(600 + 600)
        assert intervals(provider.asked_at) == [600, 30, 60, 120, 240, 480, 600, 600, 600, 600]
        assert (provider.failures, provider.failing, provider.ok) == (8, 0, True)


@pytest.mark.parametrize("ttl, cooldown, expected", [
    (600.0, 30.0, (540.0, 660.0)),
    (0.0, 5.0, (5.0, 5.0)),  # a ttl below the cooldown never makes the timer spin
])
async def test_refresh_intervals_are_jittered_within_ten_percent_never_under_the_cooldown(
        rsa_key: Any, clock: FakeClock, ttl: float, cooldown: float, expected: tuple[float, float]) -> None:
    provider = Provider(public_jwk(rsa_key, "k1"), clock, ttl=ttl, cooldown=cooldown)
    async with refreshing(provider, clock, random.Random(7).random) as sleep:
        await sleep.advance(100 * expected[1])
        found = intervals(provider.asked_at)
        assert len(found) >= 99
        low, high = expected
        assert all(low <= i <= high for i in found)
        if ttl > cooldown:  # spread over the range, not bunched: replicas drift apart
            assert max(found) - min(found) > 0.8 * (high - low)


async def test_jittered_retries_stay_between_the_cooldown_and_the_jittered_ttl(
        rsa_key: Any, clock: FakeClock) -> None:
    provider = Provider(public_jwk(rsa_key, "k1"), clock)
    provider.down = True
    async with refreshing(provider, clock, random.Random(11).random, settle=False) as sleep:
        await sleep.advance(20 * TTL)
        found = intervals(provider.asked_at)
        assert len(found) >= 19 and all(COOLDOWN <= i <= 1.1 * TTL for i in found)
        assert found[0] == COOLDOWN  # the first retry: one cooldown after the start-up fetch
        capped = found[6:]  # from the sixth retry on: 30 s · 2⁶ is past the ttl
        assert all(0.9 * TTL <= i <= 1.1 * TTL for i in capped)
        assert max(capped) - min(capped) > 0.1 * TTL  # jittered at the cap too, not all on it


async def test_verifying_a_token_never_starts_a_refresh(rsa_key: Any, clock: FakeClock) -> None:
    provider = Provider(public_jwk(rsa_key, "k1"), clock)
    assert await provider.get("k1") is not None and provider.fetches == 1
    clock.advance(3 * TTL)  # long past the ttl, within max_stale: the timer's business
    for _ in range(100):
        assert await provider.get("k1") is not None
    assert provider.fetches == 1


async def test_the_timer_joins_a_fetch_in_flight_instead_of_starting_another(
        rsa_key: Any, other_rsa_key: Any, clock: FakeClock) -> None:
    provider = Provider(public_jwk(rsa_key, "k1"), clock)
    async with refreshing(provider, clock) as sleep:
        await sleep.advance(590)
        provider.doc["keys"].append(public_jwk(other_rsa_key, "k2"))
        provider.gate = asyncio.Event()  # the provider is slow to answer
        token = asyncio.create_task(provider.get("k2"))  # a token names the new kid: a fetch starts
        async with asyncio.timeout(5):
            while len(provider.asked_at) < 2:
                await asyncio.sleep(0)
        advancing = asyncio.create_task(sleep.advance(20))  # the timer comes due meanwhile
        async with asyncio.timeout(5):
            while provider.refresh_calls == 0:
                await asyncio.sleep(0)
        provider.gate.set()
        await advancing
        assert await token is not None
        assert len(provider.asked_at) == 2  # start-up, and the one fetch both shared
        await sleep.advance(600)  # counted from the end of that fetch, at +600
        assert intervals(provider.asked_at) == [590, 610]


async def test_a_tokens_successful_fetch_resets_the_timer_and_a_failed_one_does_not(
        rsa_key: Any, other_rsa_key: Any, clock: FakeClock) -> None:
    provider = Provider(public_jwk(rsa_key, "k1"), clock)
    async with refreshing(provider, clock) as sleep:
        await sleep.advance(300)
        provider.doc["keys"].append(public_jwk(other_rsa_key, "k2"))
        assert await provider.get("k2") is not None  # fetched for the token at +300
        await sleep.advance(600)  # the timer's turn moved to +900
        assert intervals(provider.asked_at) == [300, 600]

        await sleep.advance(300)
        provider.down = True
        assert await provider.get("k3") is None  # a token's fetch fails at +1200...
        provider.down = False
        await sleep.advance(300)  # ...the timer still refreshes at +1500 as planned
        assert intervals(provider.asked_at) == [300, 600, 300, 300]
        assert provider.ok and provider.freshness().age == 0.0


async def test_a_jwks_file_is_checked_on_the_timer_and_read_only_when_it_changed(
        tmp_path: Path, rsa_key: Any, other_rsa_key: Any, clock: FakeClock) -> None:
    path = tmp_path / "jwks.json"

    def publish(*jwks: dict[str, Any], age: float) -> None:
        path.write_text(json.dumps({"keys": list(jwks)}))
        then = time.time_ns() - int(age * 1e9)  # written a while ago (see JwksFile._read)
        os.utime(path, ns=(then, then))

    publish(public_jwk(rsa_key, "k1"), age=3600)
    source = JwksFile(path, ALLOWED, clock=clock, ttl=TTL, cooldown=COOLDOWN, max_stale=MAX_STALE)
    async with refreshing(source, clock) as sleep:
        await sleep.advance(3 * TTL)
        # Checked every ttl (a stat: still there, unchanged), so the set stays fresh, read once.
        assert (source.fetches, source.reads, source.failures) == (4, 1, 0)
        assert source.freshness().age == 0.0

        publish(public_jwk(other_rsa_key, "k2"), age=60)  # k1 withdrawn, k2 published
        await sleep.advance(TTL)
        assert source.reads == 2 and source.revision == 1
        assert await source.get("k2") is not None and await source.get("k1") is None

        path.unlink()
        await sleep.advance(TTL)
        assert source.failures == 1 and await source.get("k2") is not None  # the last good keys
        await source.close()


async def test_a_bug_in_one_fetch_does_not_stop_the_timer(
        rsa_key: Any, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    class Buggy(Provider):
        async def _fetch(self) -> bytes:
            if len(self.asked_at) == 1:
                self.asked_at.append(self._clock())
                raise RuntimeError("bug")
            return await super()._fetch()

    provider = Buggy(public_jwk(rsa_key, "k1"), clock)
    async with refreshing(provider, clock) as sleep:
        with caplog.at_level(logging.ERROR, "gateway.identity.jwks"):
            await sleep.advance(TTL)
        assert [r.message for r in caplog.records] == [f"JWKS refresh of {provider} failed unexpectedly"]
        await sleep.advance(TTL)  # the next round as usual
        assert intervals(provider.asked_at) == [TTL, TTL] and provider.ok


def jwks_tasks() -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("jwks"))


def other_tasks() -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def test_stop_cancels_the_timer_and_any_fetch_leaving_no_task(
        rsa_key: Any, clock: FakeClock) -> None:
    provider = Provider(public_jwk(rsa_key, "k1"), clock)
    sleep = FakeSleep(clock)
    v = verifier(provider, sleep)
    v.start()
    await sleep.asleep()
    provider.gate = asyncio.Event()  # a fetch hangs at the provider when the gateway stops
    advancing = asyncio.create_task(sleep.advance(TTL))
    async with asyncio.timeout(5):
        while provider.refresh_calls == 0:
            await asyncio.sleep(0)
    assert jwks_tasks() == [f"jwks-refresh {provider}", "jwks-refresh-timer"]
    await v.close()
    assert jwks_tasks() == [] and not v.refresher.running
    advancing.cancel()  # the test's own: waiting for a timer that will not sleep again
    with pytest.raises(asyncio.CancelledError):
        await advancing
    assert other_tasks() == set()  # nor anything the timer had started


async def test_the_identity_service_runs_one_timer_from_start_to_close(
        tmp_path: Path, rsa_key: Any) -> None:
    from gateway.identity.config import IdentityConfig
    from gateway.identity.service import IdentityService

    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1")]}))
    issuers = tuple(issuer_config(issuer=f"https://idp{i}.example.com/", jwks_file=path,
                                  account_prefix=f"{i}:") for i in range(3))
    service = IdentityService(IdentityConfig(jwt=JwtConfig(issuers=issuers)))
    await service.start()
    try:
        assert service.jwt is not None and service.jwt.refresher.running
        assert jwks_tasks().count("jwks-refresh-timer") == 1  # one for the service, not per issuer
        for source in service.jwt.sources().values():
            await source.join()  # the start-up fetch, in the background
            assert source.fetches == 1 and source.ok
    finally:
        await service.close()
    assert other_tasks() == set()
