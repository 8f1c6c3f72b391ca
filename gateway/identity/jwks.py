"""JSON Web Key Sets from a file or URL, with refresh discipline that survives abuse and outages.

- A token naming an unknown ``kid`` may trigger a refresh, but at most one fetch happens per
  ``cooldown`` whatever the request rate (single flight under a lock, then a time gate), and an
  unknown kid is remembered (negative cache) so a kid flood costs a dict probe, not a lock.
- Known keys are refreshed in the background every ``ttl``. When fetching fails, the last good
  keys keep working for ``max_stale`` after the last success, then verification fails closed.
- Only asymmetric public keys are accepted (``oct`` keys are dropped), and each key is bound to
  the algorithms its type supports intersected with the issuer's pinned list: an RSA key can
  never be used with HS256 or with an EC algorithm.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt

log = logging.getLogger(__name__)

_FAMILIES: dict[str, frozenset[str]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC:P-256": frozenset({"ES256"}),
    "EC:P-384": frozenset({"ES384"}),
    "EC:P-521": frozenset({"ES512"}),
    "EC:secp256k1": frozenset({"ES256K"}),
    "OKP:Ed25519": frozenset({"EdDSA"}),
    "OKP:Ed448": frozenset({"EdDSA"}),
}
MAX_KEYS = 100
_NEGATIVE_CACHE_MAX = 4096


class JwksError(Exception):
    """A key set could not be fetched or parsed."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    kid: str | None
    key: Any  # a cryptography public key object
    algorithms: frozenset[str]


def parse_jwks(
    data: bytes | str | Mapping[str, Any], allowed: frozenset[str],
) -> dict[str | None, VerificationKey]:
    """Usable signing keys of a JWKS document by kid. Unusable keys are skipped, not fatal."""
    try:
        doc = json.loads(data) if isinstance(data, bytes | str) else data
    except (ValueError, UnicodeDecodeError) as exc:
        raise JwksError(f"not JSON: {exc}") from exc
    if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
        raise JwksError("expected an object with a 'keys' list")
    out: dict[str | None, VerificationKey] = {}
    for jwk in doc["keys"][:MAX_KEYS]:
        if not isinstance(jwk, Mapping) or jwk.get("use", "sig") != "sig":
            continue
        kty = jwk.get("kty")
        family = _FAMILIES.get(str(kty) if kty == "RSA" else f"{kty}:{jwk.get('crv')}")
        if family is None:  # includes "oct": shared secrets are never verification keys here
            continue
        algs = family & allowed
        if "alg" in jwk:
            algs &= {jwk["alg"]}
        kid = jwk.get("kid")
        if not algs or not (kid is None or isinstance(kid, str)):
            continue
        try:
            key = jwt.PyJWK(dict(jwk), algorithm=sorted(algs)[0]).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if hasattr(key, "private_numbers"):
            key = key.public_key()  # a JWKS leaking private parts still only verifies
        out[kid] = VerificationKey(kid, key, frozenset(algs))
    return out


class KeySource:
    """Cached keys of one issuer; subclasses say how to fetch the document."""

    def __init__(self, allowed: frozenset[str], *, ttl: float = 600.0, cooldown: float = 30.0,
                 max_stale: float = 86400.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._allowed = allowed
        self._ttl = ttl
        self._cooldown = cooldown
        self._max_stale = max_stale
        self._clock = clock
        self._keys: dict[str | None, VerificationKey] = {}
        self._last_success: float | None = None
        self._last_attempt: float | None = None
        self._negative: dict[str | None, float] = {}
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self.fetches = 0  # for tests and metrics
        self.failures = 0

    async def _fetch(self) -> bytes:
        raise NotImplementedError

    async def get(self, kid: str | None) -> VerificationKey | None:
        """The key for ``kid`` (None: the only key, if there is exactly one), fetching if allowed."""
        now = self._clock()
        found = self._lookup(kid, now)
        if found is not None:
            if now - (self._last_success or now) >= self._ttl:
                self._refresh_in_background(now)
            return found
        until = self._negative.get(kid)
        if until is not None and now < until:
            return None
        async with self._lock:
            # Whoever waited here behind a fetch finds the gate closed and just re-reads.
            if self._last_attempt is None or self._clock() - self._last_attempt >= self._cooldown:
                await self._refresh()
        found = self._lookup(kid, self._clock())
        if found is None:
            if len(self._negative) >= _NEGATIVE_CACHE_MAX:
                self._negative.clear()
            self._negative[kid] = self._clock() + self._cooldown
        return found

    def _lookup(self, kid: str | None, now: float) -> VerificationKey | None:
        if self._last_success is None or now - self._last_success > self._max_stale:
            return None  # never loaded, or too stale to trust: fail closed
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        self._last_attempt = self._clock()
        self.fetches += 1
        try:
            keys = parse_jwks(await self._fetch(), self._allowed)
        except (JwksError, OSError, aiohttp.ClientError, TimeoutError) as exc:
            self.failures += 1
            log.warning("JWKS refresh failed for %s, keeping last good keys: %s", self, exc)
            return
        self._keys = keys
        self._last_success = self._clock()
        self._negative.clear()

    def _refresh_in_background(self, now: float) -> None:
        if self._background is not None and not self._background.done():
            return
        if self._last_attempt is not None and now - self._last_attempt < self._cooldown:
            return
        self._background = asyncio.create_task(self._locked_refresh(), name=f"jwks-refresh {self}")

    async def _locked_refresh(self) -> None:
        async with self._lock:
            await self._refresh()

    async def join(self) -> None:
        """Wait for a running background refresh (tests, orderly shutdown)."""
        if self._background is not None:
            await self._background

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            try:
                await self._background
            except asyncio.CancelledError:
                pass


class JwksFile(KeySource):
    """Keys from a local file, re-read under the same discipline as a URL."""

    def __init__(self, path: Path, allowed: frozenset[str], **kwargs: Any) -> None:
        super().__init__(allowed, **kwargs)
        self.path = path

    async def _fetch(self) -> bytes:
        return await asyncio.to_thread(self.path.read_bytes)

    def __str__(self) -> str:
        return str(self.path)


class JwksUrl(KeySource):
    """Keys from an HTTPS endpoint, fetched with aiohttp; responses are size-capped."""

    def __init__(self, url: str, allowed: frozenset[str], *, timeout: float = 5.0,
                 max_bytes: int = 1 << 20, session: aiohttp.ClientSession | None = None,
                 **kwargs: Any) -> None:
        super().__init__(allowed, **kwargs)
        self.url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_bytes = max_bytes
        self._session = session
        self._own_session = session is None

    async def _fetch(self) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.get(self.url, timeout=self._timeout, allow_redirects=False,
                                     headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise JwksError(f"HTTP {resp.status}")
            if (resp.content_length or 0) > self._max_bytes:
                raise JwksError("response too large")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > self._max_bytes:
                    raise JwksError("response too large")
            return bytes(body)

    async def close(self) -> None:
        await super().close()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def __str__(self) -> str:
        return self.url
