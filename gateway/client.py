"""Client-side helpers for Tollgate challenges, usable with the official SDKs.

The OpenAI and Anthropic SDKs installed here send requests through ``httpx2``; wrap their
transport so a proof-of-work challenge is solved and the request retried transparently::

    import httpx2, openai
    from gateway.client import PowTransport

    client = openai.AsyncOpenAI(base_url="https://gateway.example/v1", api_key=KEY,
                                http_client=httpx2.AsyncClient(transport=PowTransport()))

``PowSyncTransport`` does the same for ``openai.OpenAI`` / ``anthropic.Anthropic``. Without the
wrapper, an SDK raises ``AuthenticationError`` (status 401) whose body carries
``error.challenge``; solve it with :func:`solve_challenge` (or ``gateway solve TOKEN``) and
resend with the header ``x-tollgate-solution: <solution>`` (``extra_headers=`` in the SDKs).
Reverification challenges (403) need a human and are never retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping
from typing import Any

import httpx2

SOLUTION_HEADER = "x-tollgate-solution"
_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]+))')


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


def _retry_request(request: httpx2.Request, solution: str) -> httpx2.Request:
    headers = httpx2.Headers(request.headers)
    headers[SOLUTION_HEADER] = solution
    return httpx2.Request(request.method, request.url, headers=headers, content=request.content,
                          extensions=request.extensions)


class PowTransport(httpx2.AsyncBaseTransport):
    """Solves proof-of-work challenges (off the event loop) and resends, up to ``max_attempts``."""

    def __init__(self, inner: httpx2.AsyncBaseTransport | None = None, max_attempts: int = 2,
                 max_difficulty: int = 24) -> None:
        self._inner = inner or httpx2.AsyncHTTPTransport()
        self._attempts = max_attempts
        self._max_difficulty = max_difficulty

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        await request.aread()  # the body must be replayable
        response = await self._inner.handle_async_request(request)
        for _ in range(self._attempts):
            challenge = _pow_challenge(response)
            if challenge is None or parse_challenge(challenge)[1] > self._max_difficulty:
                return response
            await response.aread()
            await response.aclose()
            solution = await asyncio.to_thread(solve_challenge, challenge)
            request = _retry_request(request, solution)
            response = await self._inner.handle_async_request(request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class PowSyncTransport(httpx2.BaseTransport):
    """The blocking twin of :class:`PowTransport`."""

    def __init__(self, inner: httpx2.BaseTransport | None = None, max_attempts: int = 2,
                 max_difficulty: int = 24) -> None:
        self._inner = inner or httpx2.HTTPTransport()
        self._attempts = max_attempts
        self._max_difficulty = max_difficulty

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        request.read()
        response = self._inner.handle_request(request)
        for _ in range(self._attempts):
            challenge = _pow_challenge(response)
            if challenge is None or parse_challenge(challenge)[1] > self._max_difficulty:
                return response
            response.read()
            response.close()
            request = _retry_request(request, solve_challenge(challenge))
            response = self._inner.handle_request(request)
        return response

    def close(self) -> None:
        self._inner.close()
