"""Token, key and context helpers for identity tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.context import ApiFamily, RequestContext, RequestView

ISSUER = "https://idp.example.com/"
AUDIENCE = "tollgate"


class FakeClock:
    """Monotonic time the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSleep:
    """``asyncio.sleep`` on a :class:`FakeClock`: a sleeper wakes only when :meth:`advance`
    moves the clock to its deadline, so a background timer runs through hours in no time."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []  # every delay asked for, in order
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.clock() + delay, future))
        self._changed.set()
        try:
            await future
        finally:
            self._sleepers = [s for s in self._sleepers if s[1] is not future]

    async def asleep(self, count: int = 1) -> None:
        """Wait (real time, bounded) until ``count`` tasks sleep: whatever they were doing in
        between, real I/O included, is done."""
        async with asyncio.timeout(5):
            while len([s for s in self._sleepers if not s[1].done()]) < count:
                self._changed.clear()
                await self._changed.wait()

    async def advance(self, seconds: float, sleepers: int = 1) -> None:
        """Move the clock ``seconds`` ahead, waking each sleeper at its deadline in turn and
        letting it run until ``sleepers`` tasks sleep again."""
        target = self.clock() + seconds
        while True:
            await self.asleep(sleepers)
            deadline, future = min((s for s in self._sleepers if not s[1].done()), key=lambda s: s[0])
            if deadline > target:
                break
            self.clock.now = max(self.clock.now, deadline)
            future.set_result(None)
            await asyncio.sleep(0)  # let it start running before we count sleepers again
        self.clock.now = target


class JwksServer:
    """An identity provider's JWKS endpoint (serve it with ``jwks_server``); ``fail`` makes it
    answer 503, as one that is down behind its load balancer does."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.hits = 0
        self.fail = False

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.fail:
            return web.Response(status=503)
        return web.json_response({"keys": self.keys})


def public_jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else jwt.algorithms.ECAlgorithm
    jwk: dict[str, Any] = json.loads(algo.to_jwk(key.public_key()))
    jwk["kid"] = kid
    jwk["use"] = "sig"
    if alg:
        jwk["alg"] = alg
    return jwk


def public_pem(key: Any) -> bytes:
    pem: bytes = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "acct-1", "iat": now, "exp": now + 600,
                            "org_id": "org-1", "plan": "pro",
                            "https://example.com/claims": {"org_country": "US"}}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, payload: dict[str, Any], kid: str | None = "k1", alg: str = "RS256",
         headers: dict[str, Any] | None = None) -> str:
    hdr = dict(headers or {})
    if kid is not None:
        hdr["kid"] = kid
    return jwt.encode(payload, key, algorithm=alg, headers=hdr)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(secret: bytes, payload: dict[str, Any], kid: str = "k1") -> str:
    """An HS256 token MACed with ``secret`` (pyjwt refuses to make these with a PEM; we must)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


def unsigned(payload: dict[str, Any], kid: str = "k1") -> str:
    head = b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{head}.{b64(json.dumps(payload).encode())}."


def make_ctx(headers: list[tuple[str, str]]) -> RequestContext:
    view = RequestView(api=ApiFamily.OPENAI, route="chat.completions", path="/v1/chat/completions",
                       method="POST", headers=CIMultiDictProxy(CIMultiDict(headers)))
    return RequestContext(request_id="r1", request=view)


def sign_raw(key: Any, payload: dict[str, Any], kid: str = "k1") -> str:
    """RS256 over an arbitrary payload (pyjwt's encoder refuses some malformed claims)."""
    head = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(payload).encode())
    sig = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(f"{head}.{body}".encode(), key)
    return f"{head}.{body}.{b64(sig)}"
