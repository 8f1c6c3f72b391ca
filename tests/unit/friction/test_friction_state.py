"""Sticky friction is reversible and its reversal audited: listed with why, cleared per account
(all, one rule, reverification only) by a named operator, each clear kept in the account's
history. The same cases run on the memory store, on Redis, and on Redis behind the local mirror
(the production default), where a clear must also reach the risk stage's next read."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.friction.model import FrictionAction, Reverify, Tarpit
from gateway.friction.state import HISTORY_TTL, FrictionState, friction_admin_routes
from gateway.risk.behind import BehindSignalStore
from gateway.risk.redis_sigstore import RedisSignalStore
from gateway.risk.sigstore import (
    AccountTouch,
    BatchResult,
    MemorySignalStore,
    Op,
    SignalStore,
    StateGet,
    StatePut,
)
from gateway.store.base import StoreError
from tests.support.redis_servers import RedisServer
from tests.unit.risk.helpers import FakeClock

RV = FrictionAction(reverify=Reverify("https://verify.example"))
SLOW = FrictionAction(tarpit=Tarpit(2.0), ttl=3600.0)
WHY = {"request_id": "req-1", "risk": {"score": 0.93, "cluster_score": 0.5, "cluster_id": "c1"}}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("behind", marks=pytest.mark.redis)])
async def signals(request: pytest.FixtureRequest) -> AsyncIterator[SignalStore]:
    if request.param == "memory":
        yield MemorySignalStore(FakeClock())
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    redis = RedisSignalStore.from_url(server.url, prefix=f"t:{request.node.name}:", deadline=2.0)
    store: SignalStore = BehindSignalStore(redis) if request.param == "behind" else redis
    yield store
    await store.close()


async def test_saved_friction_is_listed_with_why(signals: SignalStore) -> None:
    state = FrictionState(signals, FakeClock(1_700_000_000.0))
    await state.save("acct", "rv", RV, WHY)
    await state.save("acct", "slow", SLOW, WHY)
    listing = await state.listing("acct")
    assert set(listing["friction"]) == {"rv", "slow"} and listing["history"] == []
    slow = listing["friction"]["slow"]
    assert slow["since"] == 1_700_000_000 and slow["expires"] == 1_700_003_600
    assert slow["request_id"] == "req-1" and slow["risk"]["score"] == 0.93
    assert FrictionAction.from_json(slow["action"]) == SLOW
    assert listing["friction"]["rv"]["expires"] == 1_700_000_000 + 30 * 86400  # reverify default


async def test_clear_one_rule_then_reverify_then_all_each_in_the_history(signals: SignalStore) -> None:
    clock = FakeClock(1_700_000_000.0)
    state = FrictionState(signals, clock)
    other = FrictionAction(tarpit=Tarpit(1.0), ttl=60.0)
    for rule, action in (("rv", RV), ("slow", SLOW), ("other", other)):
        await state.save("acct", rule, action, WHY)
    await state.save("bystander", "rv", RV)

    one = await state.clear("acct", "alice", "ticket 1", rule="slow")
    assert list(one["cleared"]) == ["slow"] and one["scope"] == "rule" and one["rule"] == "slow"
    assert one["cleared"]["slow"]["request_id"] == "req-1"  # the clear keeps why it was there
    clock.now += 1
    rv = await state.clear("acct", "bob", reverify_only=True)
    assert list(rv["cleared"]) == ["rv"] and rv["scope"] == "reverify" and rv["reason"] is None
    assert set(await state.load("acct")) == {"other"}
    clock.now += 1
    rest = await state.clear("acct", "carol", "released")
    assert list(rest["cleared"]) == ["other"] and rest["scope"] == "all"
    assert await state.load("acct") == {}
    assert set(await state.load("bystander")) == {"rv"}  # per account

    history = (await state.listing("acct"))["history"]
    assert [(e["by"], e["scope"], sorted(e["cleared"])) for e in history] == [
        ("carol", "all", ["other"]), ("bob", "reverify", ["rv"]), ("alice", "rule", ["slow"])]
    assert [e["ts"] for e in history] == [1_700_000_002, 1_700_000_001, 1_700_000_000]
    assert all(e["account"] == "acct" and e["event"] == "friction_cleared" for e in history)


async def test_clearing_nothing_is_still_recorded(signals: SignalStore) -> None:
    state = FrictionState(signals)
    event = await state.clear("nobody", "alice", "checked", rule="missing")
    assert event["cleared"] == {}
    assert [e["by"] for e in await state.history("nobody")] == ["alice"]


async def test_unreadable_records_are_listed_and_cleared(signals: SignalStore) -> None:
    state = FrictionState(signals)
    await signals.batch([StatePut("fr:acct", "broken", "{not json", 60.0)])
    assert await state.load("acct") == {}  # never applied...
    assert (await state.listing("acct"))["unreadable"] == {"broken": "{not json"}  # ...but visible
    event = await state.clear("acct", "alice")
    assert event["cleared"] == {"broken": {"unreadable": "{not json"}}
    assert "unreadable" not in await state.listing("acct")


async def test_a_clear_reaches_the_risk_stage_read_of_the_same_replica(signals: SignalStore) -> None:
    """The risk stage reads ``fr:{account}`` in its batch (answered from the mirror in behind
    mode): after a clear through the same store it must read nothing."""
    state = FrictionState(signals)
    batch: list[Op] = [AccountTouch("a:acct", (1.0,), "", 3600.0, 86400.0), StateGet("fr:acct")]
    await signals.batch(batch)
    await state.save("acct", "rv", RV)
    for _ in range(2):  # inline after the write, then (behind) from the mirror
        assert set((await signals.batch(batch)).results[1]) == {"rv"}
    await state.clear("acct", "alice")
    for _ in range(2):
        assert (await signals.batch(batch)).results[1] == {}
    if isinstance(signals, BehindSignalStore):
        assert signals.local_batches == 2  # the mirror answered, and did not keep the cleared state


def test_history_outlives_the_state_it_records() -> None:
    assert HISTORY_TTL >= 90 * 86400.0  # the longest sticky ttl the policy accepts


class _Down:
    async def batch(self, ops: Sequence[Op]) -> BatchResult:
        raise StoreError("down")

    async def close(self) -> None:
        return None


@pytest.fixture
async def admin_url() -> AsyncIterator[tuple[str, FrictionState, FakeClock]]:
    clock = FakeClock()
    state = FrictionState(MemorySignalStore(clock), clock)
    app = web.Application()
    for method, path, handler, _mutating in (friction_admin_routes(state)
                                             + friction_admin_routes(FrictionState(_Down()), "/down")):
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", state, clock
    finally:
        await runner.cleanup()


async def test_admin_routes_list_and_clear_with_an_operator(
        admin_url: tuple[str, FrictionState, FakeClock]) -> None:
    url, state, clock = admin_url
    await state.save("acct", "rv", RV, WHY)
    await state.save("acct", "slow", SLOW, WHY)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/admin/friction/acct") as r:
            body: dict[str, Any] = await r.json()
        assert r.status == 200 and set(body["friction"]) == {"rv", "slow"}
        assert body["friction"]["rv"]["risk"]["score"] == 0.93
        async with s.delete(f"{url}/admin/friction/acct") as r:  # who clears?
            assert r.status == 400 and "by=" in await r.text()
        async with s.delete(f"{url}/admin/friction/acct?by=%20") as r:
            assert r.status == 400
        async with s.delete(f"{url}/admin/friction/acct/reverify",
                            headers={"X-Tollgate-Operator": "bob", "X-Tollgate-Reason": "phone check"}) as r:
            body = await r.json()
        assert r.status == 200 and body["cleared"] == ["rv"]
        assert body["event"]["by"] == "bob" and body["event"]["reason"] == "phone check"
        clock.now += 1
        async with s.delete(f"{url}/admin/friction/acct", params={"by": "alice", "rule": "slow"}) as r:
            assert (await r.json())["cleared"] == ["slow"]
        async with s.get(f"{url}/admin/friction/acct") as r:
            body = await r.json()
        assert body["friction"] == {}
        assert [(e["by"], e["scope"]) for e in body["history"]] == [("alice", "rule"), ("bob", "reverify")]
        async with s.delete(f"{url}/admin/friction/acct", params={"by": "x", "reason": "r" * 501}) as r:
            assert r.status == 400
        async with s.get(f"{url}/down/acct") as r:
            assert r.status == 503
        async with s.delete(f"{url}/down/acct", params={"by": "alice"}) as r:
            assert r.status == 503 and "unavailable" in json.dumps(await r.json())
