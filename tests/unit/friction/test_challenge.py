from __future__ import annotations

import hashlib

import pytest

from gateway.client import parse_challenge, solve_challenge
from gateway.friction.challenge import ChallengeIssuer, Verdict, difficulty_for, leading_zero_bits, solve
from gateway.store.memory import MemoryStore
from tests.unit.risk.helpers import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def issuer(clock: FakeClock) -> ChallengeIssuer:
    return ChallengeIssuer(b"k" * 32, ttl=60.0, clock=clock)


async def test_issue_solve_verify_once(issuer: ChallengeIssuer, clock: FakeClock) -> None:
    guard = MemoryStore(clock).set_if_absent
    ch = issuer.issue("acct1", 8)
    solution = solve_challenge(ch.header())
    assert solution == solve(ch.token, 8) and parse_challenge(ch.body()) == (ch.token, 8)
    assert await issuer.verify(solution, "acct1", 8, guard) is Verdict.OK
    assert await issuer.verify(solution, "acct1", 8, guard) is Verdict.REPLAYED


async def test_check_spends_nothing_and_names_the_guard_to_spend(
        issuer: ChallengeIssuer, clock: FakeClock) -> None:
    guard = MemoryStore(clock).set_if_absent
    ch = issuer.issue("acct1", 6)
    solution = solve(ch.token, 6)
    first, again = issuer.check(solution, "acct1", 6), issuer.check(solution, "acct1", 6)
    assert first == again and first.verdict is Verdict.OK
    assert first.replay_key == f"pow:{ch.token.split('.')[3]}" and first.ttl == 60.0
    assert await issuer.verify(solution, "acct1", 6, guard) is Verdict.OK  # not spent by check
    assert await issuer.verify(solution, "acct1", 6, guard) is Verdict.REPLAYED
    assert issuer.check(solution, "acct2", 6).verdict is Verdict.BAD_MAC
    assert issuer.check(solution, "acct2", 6).replay_key == ""  # nothing to spend


async def test_refusals(issuer: ChallengeIssuer, clock: FakeClock) -> None:
    guard = MemoryStore(clock).set_if_absent
    ch = issuer.issue("acct1", 6)
    solution = solve(ch.token, 6)
    assert await issuer.verify(solution, "acct2", 6, guard) is Verdict.BAD_MAC
    assert await issuer.verify(solution, "acct1", 10, guard) is Verdict.TOO_EASY
    assert await issuer.verify("garbage", "acct1", 6, guard) is Verdict.MALFORMED
    forged = solution.replace(".6.", ".1.", 1)
    assert await issuer.verify(forged, "acct1", 1, guard) is Verdict.BAD_MAC
    unsolved = next(c for c in (f"{ch.token}.{i}" for i in range(1000))
                    if leading_zero_bits(hashlib.sha256(c.encode()).digest()) < 6)
    assert await issuer.verify(unsolved, "acct1", 6, guard) is Verdict.UNSOLVED
    clock.now += 61
    assert await issuer.verify(solution, "acct1", 6, guard) is Verdict.EXPIRED
    other = ChallengeIssuer(b"x" * 32, clock=clock)
    assert await other.verify(solve(issuer.issue("acct1", 4).token, 4), "acct1", 4, guard) is Verdict.BAD_MAC


async def test_malformed_solutions_are_refused(issuer: ChallengeIssuer, clock: FakeClock) -> None:
    guard = MemoryStore(clock).set_if_absent
    token = issuer.issue("acct1", 4).token
    solution = solve(token, 4)
    version, expires, difficulty, salt, mac, counter = solution.split(".")
    variants = [
        f"{version}.{expires}.\u00b2.{salt}.{mac}.{counter}",  # "²".isdigit() is True, int("²") raises
        f"{version}.{'9' * 5000}.{difficulty}.{salt}.{mac}.{counter}",  # past int()'s digit limit
        f"{version}.{expires}.{difficulty}.{salt}.{mac}.\u0661",  # Arabic-Indic digit one
        f"{version}.{expires}.{difficulty}.{salt[:-1]}.{mac}.{counter}",
        f"{solution}.1",
    ]
    for variant in variants:
        assert await issuer.verify(variant, "acct1", 4, guard) is Verdict.MALFORMED, variant
    assert await issuer.verify(f"  {solution} ", "acct1", 4, guard) is Verdict.OK


def test_difficulty_rises_with_risk() -> None:
    assert difficulty_for(0.3, 10, 20) == 10
    assert difficulty_for(0.75, 10, 20) == 15
    assert difficulty_for(1.0, 10, 20) == 20
