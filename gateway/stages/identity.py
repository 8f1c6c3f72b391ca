"""Identity: resolve ``ctx.principal`` from a gateway API key or a JWT; refuse anything else.

Credentials are read from ``Authorization: Bearer`` (OpenAI SDKs) or ``x-api-key``
(Anthropic SDKs). Every refusal carries the same neutral 401 body whatever went wrong (missing,
unknown, disabled, expired, bad signature...): telling an attacker which check failed helps
them. The precise reason goes to ``ctx.audit["identity"]`` for operators only.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.context import Decision, RequestContext
from gateway.identity.config import CREDENTIAL_HEADERS, IdentityConfig
from gateway.identity.jwt import InvalidToken, JwtVerifier
from gateway.identity.keys import KEY_PREFIX, KeyRing

MESSAGE = "Invalid or missing credentials."
_MAX_CREDENTIAL_CHARS = 65536  # JWT verifier has its own (smaller) cap; this bounds everything


def unauthorized() -> Decision:
    """The one 401 every identity failure produces."""
    return Decision(status=401, error_type="authentication", message=MESSAGE,
                    headers={"WWW-Authenticate": 'Bearer realm="tollgate"'})


class IdentityStage:
    """Sets ``ctx.principal``; returns a 401 Decision when credentials are missing or invalid.

    With ``anonymous=True`` a request *without* credentials continues unauthenticated; one that
    presents a credential which fails is still refused (a typo must not silently downgrade).
    """

    before_body = True  # reads headers only (see Pipeline)

    def __init__(self, keys: KeyRing | None = None, jwt: JwtVerifier | None = None, *,
                 anonymous: bool = False, headers: tuple[str, ...] = CREDENTIAL_HEADERS) -> None:
        unknown = [h for h in headers if h.lower() not in CREDENTIAL_HEADERS]
        if unknown:
            raise ValueError(f"unsupported credential header(s): {', '.join(unknown)}")
        self._keys = keys
        self._jwt = jwt
        self._anonymous = anonymous
        self._headers = tuple(h.lower() for h in headers)

    @classmethod
    def from_config(cls, config: IdentityConfig, keys: KeyRing | None,
                    jwt: JwtVerifier | None) -> IdentityStage:
        return cls(keys, jwt, anonymous=config.anonymous, headers=config.headers)

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        credential = self._credential(ctx.request.headers)
        if credential is None:
            if self._anonymous:
                return None
            return self._deny(ctx, "missing credentials")
        if len(credential) > _MAX_CREDENTIAL_CHARS:
            return self._deny(ctx, "credential too large")
        if credential.startswith(KEY_PREFIX):
            if self._keys is None:
                return self._deny(ctx, "api keys not configured")
            record = self._keys.current.find(credential)
            if record is None:
                return self._deny(ctx, "unknown api key")
            if record.disabled:
                return self._deny(ctx, f"disabled api key {record.key_id}")
            ctx.principal = record.principal()
            return None
        if self._jwt is not None and credential.count(".") == 2:
            try:
                ctx.principal = await self._jwt.authenticate(credential)
            except InvalidToken as exc:
                return self._deny(ctx, f"jwt {exc}")
            return None
        return self._deny(ctx, "unrecognised credential")

    def _credential(self, headers: Mapping[str, str]) -> str | None:
        for name in self._headers:
            value = headers.get(name)
            if not value:
                continue
            if name == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    continue
                value = token
            value = value.strip()
            if value:
                return value
        return None

    @staticmethod
    def _deny(ctx: RequestContext, reason: str) -> Decision:
        ctx.audit["identity"] = reason  # never the credential itself
        return unauthorized()
