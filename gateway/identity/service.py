"""Identity as one startable component: the key ring, the JWT verifier and the stage over them."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.identity.config import IdentityConfig
from gateway.identity.jwks import KeySource
from gateway.identity.jwt import JwtVerifier
from gateway.identity.keys import KeyRing
from gateway.stages.identity import IdentityStage


class IdentityService:
    """Owns what the identity stage needs; ``start`` loads the keys (failing fast on a bad
    file) and starts watching it, starts fetching the JWT issuers' key sets and the one timer
    that keeps them fresh, ``close`` stops everything, ``status`` is for /admin/status."""

    def __init__(self, config: IdentityConfig, session: aiohttp.ClientSession | None = None) -> None:
        self.config = config
        self.keys = KeyRing(config.keys_file, config.keys_reload_interval) if config.keys_file else None
        self.jwt = JwtVerifier(config.jwt, session=session) if config.jwt and config.jwt.issuers else None
        self.stage = IdentityStage.from_config(config, self.keys, self.jwt)

    async def start(self) -> None:
        if self.keys is not None:
            await self.keys.start()
        if self.jwt is not None:
            # Nothing awaited: an identity provider that is down must not stop the gateway
            # starting (API keys still work; the refresh timer retries, and tokens on demand).
            self.jwt.start()

    async def reload(self) -> None:
        if self.keys is not None:
            await self.keys.reload()

    async def close(self) -> None:
        if self.keys is not None:
            await self.keys.close()
        if self.jwt is not None:
            await self.jwt.close()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"anonymous": "allow" if self.config.anonymous else "deny"}
        if self.keys is not None:
            out["keys"] = {"file": str(self.keys.path), "count": len(self.keys.current),
                           "reloads": self.keys.reloads,
                           "last_error": str(self.keys.last_error) if self.keys.last_error else None}
        if self.jwt is not None:
            out["jwt_issuers"] = {issuer: _issuer_status(source)
                                  for issuer, source in self.jwt.sources().items()}
        return out


def _issuer_status(source: KeySource) -> dict[str, Any]:
    fresh = source.freshness()
    return {
        "fetches": source.fetches,
        "failures": source.failures,
        # An identity provider outage shows here long before tokens fail: failures climb and the
        # age grows past jwks_cache_ttl while stale_in_seconds runs down to 0, when every token of
        # the issuer is refused.
        "last_success_age_seconds": None if fresh.age is None else round(fresh.age, 1),
        "stale_in_seconds": round(fresh.stale_in, 1),
        "stale": fresh.stale,
    }
