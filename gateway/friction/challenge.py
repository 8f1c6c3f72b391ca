"""Stateless HMAC-signed proof-of-work challenges, bound to a principal, with replay refusal.

Token: ``v1.<expires>.<difficulty>.<salt>.<mac>`` where ``mac`` is a truncated HMAC-SHA256 over
the version, principal, expiry, difficulty and salt: the gateway keeps nothing per challenge.
Solution (header ``x-tollgate-solution``): ``<token>.<counter>`` such that
``sha256(solution)`` starts with ``difficulty`` zero bits. Verification is constant-time on the
MAC; a solution is accepted once (``Store.set_if_absent`` on its salt until it expires).
Checking (:meth:`ChallengeIssuer.check`, no I/O) and spending (the replay guard) are separate so
that a caller can spend a solution only once nothing else will refuse the request it came with.
Expected client work: 2^difficulty hashes (difficulty 16 ≈ 65k hashes, ~0.1 s in CPython).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

SOLUTION_HEADER = "x-tollgate-solution"
SCHEME = "Tollgate-PoW"
ALGORITHM = "sha256-leading-zero-bits"
_VERSION = "v1"
_MAC_CHARS = 22  # 128 bits of base64url
# ASCII digits only and bounded: str.isdigit() accepts "²" (which int() refuses) and an
# unbounded digit run can exceed int()'s string limit, both of which used to raise.
_SOLUTION = re.compile(rf"{_VERSION}\.(\d{{1,12}})\.(\d{{1,3}})\.([A-Za-z0-9_-]{{16}})"
                       rf"\.([A-Za-z0-9_-]{{{_MAC_CHARS}}})\.(\d{{1,20}})", re.ASCII)


class Verdict(StrEnum):
    OK = "ok"
    MALFORMED = "malformed"
    BAD_MAC = "bad_mac"  # forged, or issued to another principal
    EXPIRED = "expired"
    TOO_EASY = "too_easy"  # solves a lower difficulty than now required
    UNSOLVED = "unsolved"
    REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class Checked:
    """The stateless verdict on a solution. When it is ``OK`` the solution still has to be spent:
    ``set_if_absent(replay_key, ttl)``, False meaning someone spent it first (``REPLAYED``)."""

    verdict: Verdict
    replay_key: str = ""
    ttl: float = 0.0  # seconds until the challenge expires: the guard must outlive it


@dataclass(frozen=True, slots=True)
class Challenge:
    token: str
    difficulty: int
    expires: int

    def header(self) -> str:
        return (f'{SCHEME} challenge="{self.token}", difficulty={self.difficulty}, '
                f'algorithm="{ALGORITHM}", expires={self.expires}, header="{SOLUTION_HEADER}"')

    def body(self) -> dict[str, object]:
        return {"kind": "pow", "token": self.token, "difficulty": self.difficulty, "algorithm": ALGORITHM,
                "expires": self.expires, "header": SOLUTION_HEADER}


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def difficulty_for(score: float, low: int, high: int) -> int:
    """``from_risk``: low at score 0.5 or less, rising linearly to high at score 1.0."""
    frac = min(1.0, max(0.0, (score - 0.5) / 0.5))
    return low + round((high - low) * frac)


class ChallengeIssuer:
    """Issues and verifies challenges with one secret (share it between replicas)."""

    def __init__(self, secret: bytes, ttl: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        # Without a configured secret each process makes its own: challenges then only verify on
        # the replica that issued them (documented; configure risk.challenge.secret_env).
        self._secret = secret or os.urandom(32)
        self._ttl = ttl
        self._clock = clock

    def _mac(self, principal: str, expires: int, difficulty: int, salt: str) -> str:
        msg = f"{_VERSION}|{principal}|{expires}|{difficulty}|{salt}".encode()
        digest = hmac.new(self._secret, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode()[:_MAC_CHARS]

    def issue(self, principal: str, difficulty: int) -> Challenge:
        expires = int(self._clock() + self._ttl)
        salt = base64.urlsafe_b64encode(os.urandom(12)).decode()
        mac = self._mac(principal, expires, difficulty, salt)
        return Challenge(f"{_VERSION}.{expires}.{difficulty}.{salt}.{mac}", difficulty, expires)

    def check(self, solution: str, principal: str, required: int) -> Checked:
        """Everything about a solution that needs no store: form, MAC, expiry, difficulty, work."""
        parsed = _SOLUTION.fullmatch(solution.strip())
        if parsed is None:
            return Checked(Verdict.MALFORMED)
        exp_text, diff_text, salt, mac, _counter = parsed.groups()
        expires, difficulty = int(exp_text), int(diff_text)
        if not hmac.compare_digest(self._mac(principal, expires, difficulty, salt), mac):
            return Checked(Verdict.BAD_MAC)
        now = self._clock()
        if expires <= now:
            return Checked(Verdict.EXPIRED)
        if difficulty < required:
            return Checked(Verdict.TOO_EASY)
        if leading_zero_bits(hashlib.sha256(solution.strip().encode()).digest()) < difficulty:
            return Checked(Verdict.UNSOLVED)
        return Checked(Verdict.OK, f"pow:{salt}", max(1.0, expires - now))

    async def verify(self, solution: str, principal: str, required: int,
                     replay_guard: Callable[[str, float], Awaitable[bool]]) -> Verdict:
        """Check a solution and spend it at once; ``replay_guard(key, ttl)`` is
        ``Store.set_if_absent``. (The friction stage checks first and spends last instead.)"""
        checked = self.check(solution, principal, required)
        if checked.verdict is not Verdict.OK:
            return checked.verdict
        if not await replay_guard(checked.replay_key, checked.ttl):
            return Verdict.REPLAYED
        return Verdict.OK


def solve(token: str, difficulty: int, max_iterations: int = 1 << 32) -> str:
    """Find a counter for ``token`` (the client side; also in :mod:`gateway.client`)."""
    prefix = hashlib.sha256(f"{token}.".encode())
    for counter in range(max_iterations):
        h = prefix.copy()
        h.update(str(counter).encode())
        if leading_zero_bits(h.digest()) >= difficulty:
            return f"{token}.{counter}"
    raise ValueError("no solution found within max_iterations")
