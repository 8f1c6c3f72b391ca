"""Client-side helpers for Tollgate challenges, usable with the official SDKs.

The OpenAI and Anthropic SDKs installed here send requests through ``httpx2``; wrap their
transport so a proof-of-work challenge is solved and the request retried transparently::

    import httpx2, openai
    from gateway.client import PowTransport

    client = openai.AsyncOpenAI(base_url="https://gateway.example/v1", api_key=KEY,
                                http_client=httpx2.AsyncClient(transport=PowTransport()))

``PowSyncTransport`` does the same for ``openai.OpenAI`` / ``anthropic.Anthropic``.

A solution the gateway has not spent is remembered and reused. The gateway spends a solution only
when it admits the request (a ``cap_tokens`` or quota 429 leaves it good until the challenge
expires), but an SDK that retries that 429 resends its original request, without the header:
the transport puts the remembered solution on it (and on any later request that brings none)
instead of paying for a new challenge. What is safe to reuse: a solution is bound to the
principal the gateway saw (the API key's account) and expires with its challenge, so it is
remembered with the request's origin and credentials (``authorization``, ``x-api-key``,
``api-key``; kept as a digest) and its expiry, and only put on a request with the same ones that
leaves before the expiry (minus ``expiry_margin``, for the trip and the clocks' skew). It is
forgotten once a request carrying it gets a 2xx (the gateway spent it), or a new challenge
(spent, replayed, expired or now too easy); after any other answer, or a request that failed in
transit, it is kept: if the gateway had spent it after all, the next request carrying it gets a
challenge, which the transport solves as it would have anyway (one round trip, no extra work).
One solution is remembered per transport, the latest, and it is on at most one request at a time
(taken while the request is out): two requests never race with it. ``solved`` counts the
challenges a transport has solved.

Without the wrapper, an SDK raises ``AuthenticationError`` (status 401) whose body carries
``error.challenge``; solve it with :func:`solve_challenge` (or ``gateway solve TOKEN``) and
resend with the header ``x-tollgate-solution: <solution>`` (``extra_headers=`` in the SDKs).
Reverification challenges (403) need a human and are never retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx2

SOLUTION_HEADER = "x-tollgate-solution"
_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]+))')
# Request headers that carry the credentials the gateway names the principal by.
_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key")


def _leading_zero_bits(digest: bytes) -> int:
    return len(digest) * 8 - int.from_bytes(digest, "big").bit_length()


def parse_challenge(challenge: str | Mapping[str, Any]) -> tuple[str, int]:
    """(token, difficulty) from a ``WWW-Authenticate: Tollgate-PoW ...`` value, an error body's
    ``challenge`` object, or a bare token (its difficulty is part of it)."""
    if isinstance(challenge, Mapping):
        inner = challenge.get("error", challenge)
        inner = inner.get("challenge", inner) if isinstance(inner, Mapping) else inner
        return str(inner["token"]), int(inner["difficulty"])
    text = challenge.strip()
    if text.startswith("Tollgate-PoW"):
        params = {m.group(1): m.group(2) if m.group(2) is not None else m.group(3)
                  for m in _PARAM.finditer(text)}
        return params["challenge"], int(params["difficulty"])
    parts = text.split(".")
    if len(parts) != 5 or not parts[2].isdigit():
        raise ValueError("not a Tollgate challenge")
    return text, int(parts[2])


def solve_challenge(challenge: str | Mapping[str, Any], max_iterations: int = 1 << 32) -> str:
    """The value for the ``x-tollgate-solution`` header (expected work: 2^difficulty hashes)."""
    token, difficulty = parse_challenge(challenge)
    prefix = hashlib.sha256(f"{token}.".encode())
    for counter in range(max_iterations):
        h = prefix.copy()
        h.update(str(counter).encode())
        if _leading_zero_bits(h.digest()) >= difficulty:
            return f"{token}.{counter}"
    raise ValueError("no solution found within max_iterations")


def _pow_challenge(response: httpx2.Response) -> str | None:
    if response.status_code != 401:
        return None
    value = response.headers.get("www-authenticate", "")
    return value if value.startswith("Tollgate-PoW") else None


def _with_solution(request: httpx2.Request, solution: str) -> httpx2.Request:
    headers = httpx2.Headers(request.headers)
    headers[SOLUTION_HEADER] = solution
    return httpx2.Request(request.method, request.url, headers=headers, content=request.content,
                          extensions=request.extensions)


def _scope(request: httpx2.Request) -> tuple[str, str, int | None, str]:
    """Whom a solution sent with ``request`` is bound to, as far as a client can tell: the gateway
    (origin) and the credentials (a digest: the transport keeps no copy of a key)."""
    credentials = hashlib.sha256()
    for name in _CREDENTIAL_HEADERS:
        for value in request.headers.get_list(name):
            credentials.update(f"{name}:{value}\n".encode())
    url = request.url
    return url.scheme, url.host, url.port, credentials.hexdigest()


def _expires(solution: str) -> float | None:
    """The expiry (Unix seconds, the gateway's clock) written in a solution's token."""
    parts = solution.split(".")
    return float(parts[1]) if len(parts) == 6 and parts[1].isascii() and parts[1].isdigit() else None


@dataclass(frozen=True, slots=True)
class _Kept:
    scope: tuple[str, str, int | None, str]
    solution: str
    expires: float


class _Solutions:
    """The one unspent solution a transport remembers, and its count of challenges solved. Locked:
    a sync transport is shared by the threads of one ``httpx2.Client`` (the async one holds the
    lock only between awaits, never across one)."""

    def __init__(self, clock: Callable[[], float], margin: float) -> None:
        self._clock = clock
        self._margin = margin
        self._lock = threading.Lock()
        self._kept: _Kept | None = None
        self.solved = 0

    def take(self, scope: tuple[str, str, int | None, str]) -> str | None:
        """The remembered solution if it suits a request to ``scope`` leaving now; it is off the
        shelf until :meth:`keep` puts it back (one request at a time carries it)."""
        with self._lock:
            kept = self._kept
            if kept is None or kept.scope != scope:
                return None
            self._kept = None
            # An expired one is dropped: the gateway would only answer it with a new challenge.
            return kept.solution if kept.expires - self._margin > self._clock() else None

    def attach(self, request: httpx2.Request) -> tuple[httpx2.Request, tuple[str, str, int | None, str],
                                                        str | None]:
        """``request`` with the remembered solution on it when one suits it (and the client sent
        none of its own), its scope, and that solution (None: nothing attached)."""
        scope = _scope(request)
        carried = None if SOLUTION_HEADER in request.headers else self.take(scope)
        return (request if carried is None else _with_solution(request, carried)), scope, carried

    def keep(self, scope: tuple[str, str, int | None, str], solution: str) -> None:
        """Remember ``solution`` (not spent by the gateway, as far as the answer tells)."""
        expires = _expires(solution)
        if expires is None:
            return  # not a token this transport can date: never reused blindly
        with self._lock:
            if self._kept is None or self._kept.expires <= expires:  # the one that lasts longer
                self._kept = _Kept(scope, solution, expires)

    def count(self) -> None:
        with self._lock:
            self.solved += 1


class PowTransport(httpx2.AsyncBaseTransport):
    """Solves proof-of-work challenges (off the event loop) and resends, up to ``max_attempts``
    solves per request; remembers a solution the gateway did not spend and puts it on the next
    request to the same gateway with the same credentials (see the module docstring)."""

    def __init__(self, inner: httpx2.AsyncBaseTransport | None = None, max_attempts: int = 2,
                 max_difficulty: int = 24, expiry_margin: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._inner = inner or httpx2.AsyncHTTPTransport()
        self._attempts = max_attempts
        self._max_difficulty = max_difficulty
        self._solutions = _Solutions(clock, expiry_margin)

    @property
    def solved(self) -> int:
        """Challenges this transport has solved (each one is work paid)."""
        return self._solutions.solved

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()  # the body must be replayable
        # carried: the solution this transport put on the request, while it may be unspent
        request, scope, carried = self._solutions.attach(request)
        admitted = False
        try:
            response = await self._inner.handle_async_request(request)
            for attempt in range(self._attempts + 1):
                challenge = _pow_challenge(response)
                if challenge is None:
                    break
                carried = None  # answered with a challenge: spent, replayed, expired or too easy
                if attempt == self._attempts or parse_challenge(challenge)[1] > self._max_difficulty:
                    break
                await response.aread()
                await response.aclose()
                carried = await asyncio.to_thread(solve_challenge, challenge)
                self._solutions.count()
                request = _with_solution(request, carried)
                response = await self._inner.handle_async_request(request)
            admitted = response.is_success
            return response
        finally:
            if carried is not None and not admitted:
                self._solutions.keep(scope, carried)

    async def aclose(self) -> None:
        await self._inner.aclose()


class PowSyncTransport(httpx2.BaseTransport):
    """The blocking twin of :class:`PowTransport` (safe to share between threads)."""

    def __init__(self, inner: httpx2.BaseTransport | None = None, max_attempts: int = 2,
                 max_difficulty: int = 24, expiry_margin: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._inner = inner or httpx2.HTTPTransport()
        self._attempts = max_attempts
        self._max_difficulty = max_difficulty
        self._solutions = _Solutions(clock, expiry_margin)

    @property
    def solved(self) -> int:
        """Challenges this transport has solved (each one is work paid)."""
        return self._solutions.solved

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        # carried: the solution this transport put on the request, while it may be unspent
        request, scope, carried = self._solutions.attach(request)
        admitted = False
        try:
            response = self._inner.handle_request(request)
            for attempt in range(self._attempts + 1):
                challenge = _pow_challenge(response)
                if challenge is None:
                    break
                carried = None
                if attempt == self._attempts or parse_challenge(challenge)[1] > self._max_difficulty:
                    break
                response.read()
                response.close()
                carried = solve_challenge(challenge)
                self._solutions.count()
                request = _with_solution(request, carried)
                response = self._inner.handle_request(request)
            admitted = response.is_success
            return response
        finally:
            if carried is not None and not admitted:
                self._solutions.keep(scope, carried)

    def close(self) -> None:
        self._inner.close()
