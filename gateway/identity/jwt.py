"""JWT authentication (pyjwt) against configured issuers, with a verified-token cache.

Order of checks, cheapest first, so junk never reaches a signature check or a key fetch:
size cap (and ASCII only) → cache → header (alg pinned per issuer; ``none`` and HS* are never accepted) →
issuer chosen by *exact* ``iss`` (a dict lookup, no substring or prefix matching) → ``typ``
when the issuer lists ``token_types`` → key by ``kid`` from that issuer's set, bound to its own
algorithms → full pyjwt verification with required claims (``exp`` always), audience, issuer,
leeway.

The cache of verified tokens is keyed by SHA-256 of the whole token: a probe reveals nothing
about near misses (no comparison of attacker-chosen bytes against secrets). An entry lives until
the token's ``exp`` or ``cache_max_ttl`` after verification, whichever comes first (a hit never
extends it), and no longer than its issuer's key set vouches for it: when a refresh withdraws
or replaces a key, the set's ``revision`` moves on and every entry verified before that is void;
when the set goes past ``jwks_max_stale``, every entry of that issuer is void until a refresh
succeeds. A void entry is dropped and the token verified afresh, so it gets exactly the answer
(and the refresh attempt) a token not in the cache would.
Failed tokens are not cached: a forged signature costs one verification (~0.1 ms) each time,
and a negative cache would not change that for an attacker, who can mint endless distinct junk.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt
from jwt.types import Options

from gateway.context import Principal
from gateway.identity.config import ClaimMapping, JwtConfig, JwtIssuerConfig
from gateway.identity.jwks import JwksFile, JwksRefresher, JwksUrl, KeySource


class InvalidToken(Exception):
    """The token is not acceptable. The reason is for logs and audit, never for the client."""


@dataclass(frozen=True, slots=True)
class _Verified:
    """The identity part of a verified token, shared by every request carrying that token."""

    account: str
    issuer: str
    org: str | None
    tier: str | None
    issued_at: float | None
    claims: Mapping[str, Any]
    attributes: Mapping[str, Any]
    expires: float  # wall time after which the cache entry is void
    source: KeySource  # whose key verified the token...
    revision: int  # ...and its revision then: see KeySource.vouches

    def principal(self) -> Principal:
        return Principal(authenticated=True, source="jwt", account=self.account, org=self.org,
                         tier=self.tier, created_at=self.issued_at, claims=self.claims,
                         attributes=self.attributes, issuer=self.issuer)


@dataclass(frozen=True, slots=True)
class _Issuer:
    config: JwtIssuerConfig
    source: KeySource
    algorithms: frozenset[str]
    audience: list[str]
    options: Options  # pyjwt decode options, built once
    types: frozenset[str] | None  # accepted ``typ`` values as full media types; None: any


def _issuer(config: JwtIssuerConfig, source: KeySource) -> _Issuer:
    # exp is required whatever required_claims says: a token without it would be valid forever,
    # and the cache and key withdrawal rely on tokens ending.
    required = list(dict.fromkeys((*config.required_claims, "exp")))
    options: Options = {"require": required, "verify_signature": True, "verify_exp": True,
                        "verify_nbf": True, "verify_iat": True, "verify_aud": True,
                        "verify_iss": True}
    types = None if config.token_types is None else frozenset(map(_media_type, config.token_types))
    return _Issuer(config, source, frozenset(config.algorithms), list(config.audience), options, types)


class JwtVerifier:
    """Turns a bearer JWT into a Principal, or raises InvalidToken.

    ``sources`` overrides the key source per issuer (tests); by default each issuer gets a
    :class:`JwksFile` or :class:`JwksUrl`. ``clock`` is wall time (token times are wall times).
    :meth:`start` loads the key sets and starts the one timer that keeps them all fresh
    (:class:`JwksRefresher`, driven by ``sleep`` and ``rand``); :meth:`close` stops it.
    """

    def __init__(self, config: JwtConfig, *, sources: Mapping[str, KeySource] | None = None,
                 session: aiohttp.ClientSession | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] | None = None) -> None:
        self._config = config
        self._clock = clock
        self._issuers: dict[str, _Issuer] = {}
        for issuer in config.issuers:
            source = (sources or {}).get(issuer.issuer) or _source_for(issuer, session)
            self._issuers[issuer.issuer] = _issuer(issuer, source)
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self.refresher = JwksRefresher((i.source for i in self._issuers.values()), sleep=sleep, rand=rand)

    def source(self, issuer: str) -> KeySource:
        return self._issuers[issuer].source

    def sources(self) -> dict[str, KeySource]:
        """Each issuer's key source, by issuer (for /admin/status and metrics)."""
        return {name: issuer.source for name, issuer in self._issuers.items()}

    def start(self) -> None:
        """Start loading every issuer's keys in the background, and the timer that refreshes
        them (see :meth:`JwksRefresher.start`)."""
        self.refresher.start()

    async def authenticate(self, token: str) -> Principal:
        if len(token) > self._config.max_token_bytes:
            raise InvalidToken("token too large")
        if not token.isascii():  # a JWT is base64url and dots; this also keeps bytes == chars
            raise InvalidToken("malformed token: not ASCII")
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            if self._clock() < cached.expires and cached.source.vouches(cached.revision):
                self._cache.move_to_end(digest)
                return cached.principal()
            del self._cache[digest]
        verified = await self._verify(token)
        if self._config.cache_size:
            self._cache[digest] = verified
            if len(self._cache) > self._config.cache_size:
                self._cache.popitem(last=False)
        return verified.principal()

    async def _verify(self, token: str) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {type(exc).__name__}") from exc
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidToken("unknown issuer")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise InvalidToken("algorithm not allowed for issuer")
        if issuer.types is not None:
            typ = header.get("typ")
            # ASCII only: str.lower() folds some non-ASCII letters into ASCII ones (KELVIN SIGN
            # to "k"), and no media type has them.
            if not isinstance(typ, str) or not typ.isascii() or _media_type(typ) not in issuer.types:
                raise InvalidToken("token type not allowed for issuer")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > 256):
            raise InvalidToken("bad kid")
        key = await issuer.source.get(kid)
        revision = issuer.source.revision  # no await from here on: this is the key's revision
        if key is None:
            raise InvalidToken("no key for kid")
        if alg not in key.algorithms:
            raise InvalidToken("algorithm does not match the key")
        cfg = issuer.config
        try:
            claims = jwt.decode(token, key.key, algorithms=[alg], audience=issuer.audience,
                                issuer=cfg.issuer, leeway=cfg.leeway,
                                options=issuer.options)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"rejected: {type(exc).__name__}") from exc
        return self._map(issuer, claims, revision)

    def _map(self, issuer: _Issuer, claims: dict[str, Any], revision: int) -> _Verified:
        cfg = issuer.config
        mapping: ClaimMapping = cfg.claims
        account = _scalar(claims, mapping.account)
        if account is None:
            raise InvalidToken("account claim missing")
        if cfg.account_prefix:
            account = cfg.account_prefix + account
        attributes = {}
        for name, path in mapping.attributes:
            value = _lookup(claims, path)
            if value is not None:
                attributes[name] = value
        now = self._clock()
        exp = claims.get("exp")
        expires = now + self._config.cache_max_ttl
        if isinstance(exp, int | float):
            expires = min(expires, float(exp))
        iat = claims.get("iat")
        return _Verified(
            account=account,
            issuer=cfg.issuer,
            org=_scalar(claims, mapping.org),
            tier=_scalar(claims, mapping.tier) or cfg.default_tier,
            issued_at=float(iat) if isinstance(iat, int | float) else None,
            claims=MappingProxyType(claims),
            attributes=MappingProxyType(attributes),
            expires=expires,
            source=issuer.source,
            revision=revision,
        )

    async def close(self) -> None:
        await self.refresher.stop()  # first: it must not start a fetch on a closing source
        for issuer in self._issuers.values():
            await issuer.source.close()


def _source_for(cfg: JwtIssuerConfig, session: aiohttp.ClientSession | None) -> KeySource:
    common: dict[str, Any] = {"ttl": cfg.jwks_cache_ttl, "cooldown": cfg.jwks_refresh_cooldown,
                              "max_stale": cfg.jwks_max_stale}
    allowed = frozenset(cfg.algorithms)
    if cfg.jwks_url is not None:
        return JwksUrl(cfg.jwks_url, allowed, timeout=cfg.jwks_timeout, max_bytes=cfg.jwks_max_bytes,
                       session=session, **common)
    assert cfg.jwks_file is not None  # the config parser requires exactly one of the two
    return JwksFile(cfg.jwks_file, allowed, max_bytes=cfg.jwks_max_bytes, **common)


def _media_type(typ: str) -> str:
    """A ``typ`` value as the media type it names: RFC 7515 §4.1.9 has a value without ``/``
    read as if ``application/`` were in front (``at+jwt`` is ``application/at+jwt``), and media
    types compare case-insensitively (RFC 2045)."""
    typ = typ.lower()
    return typ if "/" in typ else "application/" + typ


def _lookup(claims: Mapping[str, Any], path: tuple[str, ...] | None) -> Any:
    value: Any = claims
    for part in path or ():
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return None if path is None else value


def _scalar(claims: Mapping[str, Any], path: tuple[str, ...] | None) -> str | None:
    value = _lookup(claims, path)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None
