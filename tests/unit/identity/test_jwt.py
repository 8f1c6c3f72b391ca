"""JWT verification: the happy path, claim mapping, caching, and the attacks that must fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.identity.config import ClaimMapping, JwtConfig, JwtIssuerConfig
from gateway.identity.jwks import JwksFile, JwksUrl, KeySource, parse_jwks
from gateway.identity.jwt import InvalidToken, JwtVerifier
from tests.unit.identity.tokens import (
    AUDIENCE,
    ISSUER,
    FakeClock,
    JwksServer,
    claims,
    forge_hs256,
    public_jwk,
    public_pem,
    sign,
    sign_raw,
    unsigned,
)

MAPPING = ClaimMapping(account=("sub",), org=("org_id",), tier=("plan",),
                       attributes=(("org_country", ("https://example.com/claims", "org_country")),))


def issuer_config(**overrides: Any) -> JwtIssuerConfig:
    base: dict[str, Any] = {"issuer": ISSUER, "audience": (AUDIENCE,), "algorithms": ("RS256", "ES256"),
                            "jwks_file": Path("unused.json"), "claims": MAPPING, "leeway": 5.0}
    base.update(overrides)
    return JwtIssuerConfig(**base)


@pytest.fixture
def jwks_path(tmp_path: Path, rsa_key: Any, ec_key: Any) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1"), public_jwk(ec_key, "e1")]}))
    return path


@pytest.fixture
async def verifier(jwks_path: Path, clock: FakeClock) -> Any:
    cfg = issuer_config(jwks_file=jwks_path)
    source = JwksFile(jwks_path, frozenset(cfg.algorithms), cooldown=30, clock=clock)
    v = JwtVerifier(JwtConfig(issuers=(cfg,), max_token_bytes=4096), sources={ISSUER: source})
    yield v
    await v.close()


async def test_valid_rs256_token_maps_claims(verifier: JwtVerifier, rsa_key: Any) -> None:
    principal = await verifier.authenticate(sign(rsa_key, claims()))
    assert principal.authenticated and principal.source == "jwt"
    assert (principal.account, principal.org, principal.tier) == ("acct-1", "org-1", "pro")
    assert principal.attributes == {"org_country": "US"}
    assert principal.claims["iss"] == ISSUER


async def test_valid_es256_token(verifier: JwtVerifier, ec_key: Any) -> None:
    principal = await verifier.authenticate(sign(ec_key, claims(), kid="e1", alg="ES256"))
    assert principal.account == "acct-1"


async def test_verified_tokens_are_cached(verifier: JwtVerifier, rsa_key: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    token = sign(rsa_key, claims())
    calls = 0
    real = verifier._verify

    async def counting(tok: str) -> Any:
        nonlocal calls
        calls += 1
        return await real(tok)

    monkeypatch.setattr(verifier, "_verify", counting)
    first = await verifier.authenticate(token)
    second = await verifier.authenticate(token)
    assert calls == 1 and first == second and first is not second  # fresh Principal per request


async def test_cache_entry_ends_at_token_expiry(jwks_path: Path, rsa_key: Any, clock: FakeClock) -> None:
    now = [1_000_000.0]
    cfg = issuer_config(jwks_file=jwks_path)
    v = JwtVerifier(JwtConfig(issuers=(cfg,)), clock=lambda: now[0],
                    sources={ISSUER: JwksFile(jwks_path, frozenset(cfg.algorithms), clock=clock)})
    token = sign(rsa_key, claims(exp=2_000_000_000))
    await v.authenticate(token)
    entry = next(iter(v._cache.values()))
    assert entry.expires == min(2_000_000_000, 1_000_000.0 + 3600)


@pytest.mark.parametrize("label, payload", [
    ("expired", claims(exp=1_000, iat=900)),
    ("not yet valid", claims(nbf=4_000_000_000)),
    ("issued in the future", claims(iat=4_000_000_000, exp=4_000_000_600)),
    ("wrong audience", claims(aud="someone-else")),
    ("missing exp", claims(exp=None)),
    ("missing aud", claims(aud=None)),
    ("missing iat", claims(iat=None)),
    ("issuer prefix", claims(iss="https://idp.example.com")),
    ("issuer superstring", claims(iss="https://idp.example.com/.evil.example")),
    ("issuer substring", claims(iss="idp.example.com")),
    ("no account claim", claims(sub=None)),
])
async def test_bad_claims_are_rejected(verifier: JwtVerifier, rsa_key: Any, label: str,
                                       payload: dict[str, Any]) -> None:
    with pytest.raises(InvalidToken):
        await verifier.authenticate(sign(rsa_key, payload))


@pytest.mark.parametrize("iss", [[ISSUER], {"x": ISSUER}, 42, None])
async def test_non_string_issuer_is_rejected(verifier: JwtVerifier, rsa_key: Any, iss: Any) -> None:
    payload = claims()
    payload["iss"] = iss
    with pytest.raises(InvalidToken, match="unknown issuer"):
        await verifier.authenticate(sign_raw(rsa_key, payload))


async def test_alg_none_is_rejected(verifier: JwtVerifier) -> None:
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        await verifier.authenticate(unsigned(claims()))


async def test_hs256_with_rsa_public_key_pem_is_rejected(verifier: JwtVerifier, rsa_key: Any) -> None:
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        await verifier.authenticate(forge_hs256(public_pem(rsa_key), claims()))


async def test_hs256_with_rsa_public_jwk_is_rejected(verifier: JwtVerifier, rsa_key: Any) -> None:
    secret = json.dumps(public_jwk(rsa_key, "k1")).encode()
    with pytest.raises(InvalidToken, match="algorithm not allowed"):
        await verifier.authenticate(forge_hs256(secret, claims()))


async def test_hs256_rejected_even_if_issuer_pinned_it_and_jwks_has_oct_key(
        tmp_path: Path, rsa_key: Any, clock: FakeClock) -> None:
    # Defence in depth: the config parser refuses HS*, but even a hand-built config listing it
    # gets nowhere: oct (shared-secret) JWKs are dropped and RSA keys are bound to RS/PS only.
    secret = b"k" * 32
    path = tmp_path / "jwks.json"
    oct_jwk = {"kty": "oct", "kid": "h1", "k": pyjwt.utils.base64url_encode(secret).decode()}
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1"), oct_jwk]}))
    cfg = issuer_config(jwks_file=path, algorithms=("RS256", "HS256"))
    v = JwtVerifier(JwtConfig(issuers=(cfg,)),
                    sources={ISSUER: JwksFile(path, frozenset(cfg.algorithms), clock=clock)})
    with pytest.raises(InvalidToken, match="algorithm does not match the key"):
        await v.authenticate(forge_hs256(public_pem(rsa_key), claims(), kid="k1"))
    with pytest.raises(InvalidToken, match="no key for kid"):
        await v.authenticate(forge_hs256(secret, claims(), kid="h1"))


async def test_rs_token_naming_an_ec_key_is_rejected(verifier: JwtVerifier, rsa_key: Any) -> None:
    with pytest.raises(InvalidToken, match="algorithm does not match the key"):
        await verifier.authenticate(sign(rsa_key, claims(), kid="e1"))


async def test_signature_by_another_key_is_rejected(verifier: JwtVerifier, other_rsa_key: Any) -> None:
    with pytest.raises(InvalidToken, match="InvalidSignatureError"):
        await verifier.authenticate(sign(other_rsa_key, claims(), kid="k1"))


async def test_tampered_payload_is_rejected(verifier: JwtVerifier, rsa_key: Any) -> None:
    head, _, sig = sign(rsa_key, claims()).split(".")
    other = sign(rsa_key, claims(sub="admin")).split(".")[1]
    with pytest.raises(InvalidToken):
        await verifier.authenticate(f"{head}.{other}.{sig}")


async def test_oversized_token_is_rejected_before_parsing(verifier: JwtVerifier, rsa_key: Any) -> None:
    token = sign(rsa_key, claims(padding="x" * 5000))
    with pytest.raises(InvalidToken, match="too large"):
        await verifier.authenticate(token)
    assert verifier.source(ISSUER).fetches == 0


@pytest.mark.parametrize("token", ["a.b.c", "....", "x" * 100, "eyJhbGciOiJSUzI1NiJ9.e30.", "é.é.é"])
async def test_garbage_is_rejected(verifier: JwtVerifier, token: str) -> None:
    with pytest.raises(InvalidToken):
        await verifier.authenticate(token)


# ---- JWKS over HTTP: a real aiohttp server ----------------------------------------------------
def url_verifier(server: TestServer, clock: FakeClock, **source_kw: Any) -> JwtVerifier:
    cfg = issuer_config(jwks_file=None, jwks_url=str(server.make_url("/jwks.json")))
    kw: dict[str, Any] = {"cooldown": 30.0, "ttl": 600.0, "max_stale": 3600.0, "clock": clock}
    kw.update(source_kw)
    source = JwksUrl(cfg.jwks_url or "", frozenset(cfg.algorithms), **kw)
    return JwtVerifier(JwtConfig(issuers=(cfg,), cache_size=0), sources={ISSUER: source})


async def test_unknown_kid_flood_fetches_at_most_once_per_cooldown(
        jwks_server: tuple[JwksServer, TestServer], rsa_key: Any, clock: FakeClock) -> None:
    state, server = jwks_server
    v = url_verifier(server, clock)
    try:
        await v.authenticate(sign(rsa_key, claims()))
        assert state.hits == 1
        for i in range(300):
            with pytest.raises(InvalidToken, match="no key for kid"):
                await v.authenticate(sign(rsa_key, claims(), kid=f"flood-{i}"))
        assert state.hits == 1  # the cooldown since the first fetch has not passed: no fetch at all
        clock.advance(31)
        for i in range(300):
            with pytest.raises(InvalidToken):
                await v.authenticate(sign(rsa_key, claims(), kid=f"flood2-{i}"))
        assert state.hits == 2  # one fetch for the whole second flood
    finally:
        await v.close()


async def test_concurrent_unknown_kids_share_one_fetch(
        jwks_server: tuple[JwksServer, TestServer], rsa_key: Any, clock: FakeClock) -> None:
    import asyncio
    state, server = jwks_server
    v = url_verifier(server, clock)
    try:
        tokens = [sign(rsa_key, claims(), kid=f"x{i}") for i in range(50)]
        results = await asyncio.gather(*(v.authenticate(t) for t in tokens), return_exceptions=True)
        assert all(isinstance(r, InvalidToken) for r in results)
        assert state.hits == 1
    finally:
        await v.close()


async def test_rotated_key_is_picked_up_after_cooldown(
        jwks_server: tuple[JwksServer, TestServer], rsa_key: Any, other_rsa_key: Any,
        clock: FakeClock) -> None:
    state, server = jwks_server
    v = url_verifier(server, clock)
    try:
        await v.authenticate(sign(rsa_key, claims()))
        state.keys = [public_jwk(rsa_key, "k1"), public_jwk(other_rsa_key, "k2")]
        clock.advance(31)
        principal = await v.authenticate(sign(other_rsa_key, claims(), kid="k2"))
        assert principal.account == "acct-1" and state.hits == 2
    finally:
        await v.close()


async def test_last_good_keys_survive_outage_until_max_stale(
        jwks_server: tuple[JwksServer, TestServer], rsa_key: Any, clock: FakeClock) -> None:
    state, server = jwks_server
    v = url_verifier(server, clock, ttl=60.0, max_stale=3600.0)
    token = sign(rsa_key, claims())
    try:
        await v.authenticate(token)
        state.fail = True
        clock.advance(1800)  # past ttl: the refresh timer's fetch fails
        source = v.source(ISSUER)
        assert await source.refresh() is False and source.failures == 1
        assert (await v.authenticate(token)).account == "acct-1"
        clock.advance(1801)  # now older than max_stale: fail closed
        with pytest.raises(InvalidToken, match="no key for kid"):
            await v.authenticate(token)
        state.fail = False
        clock.advance(31)
        assert (await v.authenticate(token)).account == "acct-1"  # recovers when the endpoint does
    finally:
        await v.close()


async def test_oversized_jwks_response_is_refused(aiohttp_server: Any, rsa_key: Any,
                                                  clock: FakeClock) -> None:
    async def huge(request: web.Request) -> web.Response:
        return web.json_response({"keys": [public_jwk(rsa_key, "k1")], "pad": "x" * 50_000})

    app = web.Application()
    app.router.add_get("/jwks.json", huge)
    server = await aiohttp_server(app)
    cfg = issuer_config(jwks_file=None, jwks_url=str(server.make_url("/jwks.json")))
    source: KeySource = JwksUrl(cfg.jwks_url or "", frozenset(cfg.algorithms), max_bytes=10_000, clock=clock)
    v = JwtVerifier(JwtConfig(issuers=(cfg,)), sources={ISSUER: source})
    try:
        with pytest.raises(InvalidToken):
            await v.authenticate(sign(rsa_key, claims()))
        assert source.failures == 1
    finally:
        await v.close()


def test_parse_jwks_binds_algorithms_to_key_types(rsa_key: Any, ec_key: Any) -> None:
    allowed = frozenset({"RS256", "PS256", "ES256"})
    keys = parse_jwks({"keys": [
        public_jwk(rsa_key, "r"), public_jwk(ec_key, "e"), public_jwk(rsa_key, "pinned", alg="PS256"),
        {"kty": "oct", "kid": "o", "k": "c2VjcmV0"}, public_jwk(rsa_key, "enc") | {"use": "enc"},
        public_jwk(rsa_key, "bad-alg", alg="ES256"), "junk",
    ]}, allowed)
    assert keys["r"].algorithms == {"RS256", "PS256"} and keys["e"].algorithms == {"ES256"}
    assert keys["pinned"].algorithms == {"PS256"}
    assert set(keys) == {"r", "e", "pinned"}
