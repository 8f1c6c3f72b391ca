"""Token validation edges and the verified-token cache: what gets cached, for how long, under
which key, and that a JWT is treated the same in ``x-api-key`` as in ``Authorization``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.identity.config import JwtConfig
from gateway.identity.jwks import JwksFile
from gateway.identity.jwt import InvalidToken, JwtVerifier
from gateway.stages.identity import MESSAGE, IdentityStage
from tests.unit.identity.test_jwt import issuer_config
from tests.unit.identity.tokens import AUDIENCE, ISSUER, FakeClock, b64, claims, make_ctx, public_jwk, sign


@pytest.fixture
def jwks_path(tmp_path: Path, rsa_key: Any) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1")]}))
    return path


def make_verifier(jwks_path: Path, clock: FakeClock, *, wall: Any = time.time, **config: Any) -> JwtVerifier:
    cfg = config.pop("issuer", None) or issuer_config(jwks_file=jwks_path)
    source = JwksFile(jwks_path, frozenset(cfg.algorithms), clock=clock)
    return JwtVerifier(JwtConfig(issuers=(cfg,), **config), sources={ISSUER: source}, clock=wall)


class CountingVerifier:
    """Counts full verifications (cache misses) of a JwtVerifier."""

    def __init__(self, verifier: JwtVerifier, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = verifier._verify

        async def counting(token: str) -> Any:
            self.calls += 1
            return await real(token)

        monkeypatch.setattr(verifier, "_verify", counting)


# ---- input that must be refused before any parsing ---------------------------------------------
@pytest.mark.parametrize("token", ["a.b\udcff.c", "é" * 3000 + ".a.b", "a.b.c\x00é"])
async def test_non_ascii_tokens_are_refused_not_crashing(jwks_path: Path, clock: FakeClock,
                                                         token: str) -> None:
    # Regression: aiohttp decodes header bytes that are not UTF-8 to lone surrogates, and
    # token.encode() raised UnicodeEncodeError (a 500) before any check. Non-ASCII also made the
    # size cap count characters instead of bytes.
    v = make_verifier(jwks_path, clock)
    with pytest.raises(InvalidToken):
        await v.authenticate(token)


async def test_non_ascii_credential_through_the_stage_is_a_plain_401(jwks_path: Path,
                                                                     clock: FakeClock) -> None:
    stage = IdentityStage(None, make_verifier(jwks_path, clock))
    ctx = make_ctx([("Authorization", "Bearer a.b\udcff.c")])
    decision = await stage(ctx)
    assert decision is not None and decision.status == 401 and decision.message == MESSAGE


async def test_a_16_kb_token_is_refused_before_parsing_at_the_default_cap(
        jwks_path: Path, clock: FakeClock, rsa_key: Any) -> None:
    v = make_verifier(jwks_path, clock)  # default max_token_bytes: 8192
    with pytest.raises(InvalidToken, match="too large"):
        await v.authenticate(sign(rsa_key, claims(pad="x" * 16_000)))
    assert v.source(ISSUER).fetches == 0


# ---- claims ----------------------------------------------------------------------------------
async def test_exp_is_required_even_when_required_claims_leave_it_out(
        jwks_path: Path, clock: FakeClock, rsa_key: Any) -> None:
    v = make_verifier(jwks_path, clock, issuer=issuer_config(jwks_file=jwks_path, required_claims=("iat",)))
    assert (await v.authenticate(sign(rsa_key, claims()))).account == "acct-1"
    with pytest.raises(InvalidToken, match="MissingRequiredClaimError"):
        await v.authenticate(sign(rsa_key, claims(exp=None)))


@pytest.mark.parametrize("label, offsets, ok", [
    ("expired within leeway", {"exp": -3}, True),
    ("expired beyond leeway", {"exp": -30}, False),
    ("nbf within leeway", {"nbf": 3}, True),
    ("nbf beyond leeway", {"nbf": 30}, False),
    ("iat within leeway", {"iat": 3}, True),
    ("iat beyond leeway", {"iat": 30}, False),
])
async def test_time_claims_use_the_issuer_leeway(jwks_path: Path, clock: FakeClock, rsa_key: Any,
                                                 label: str, offsets: dict[str, int], ok: bool) -> None:
    v = make_verifier(jwks_path, clock)  # leeway 5 s
    now = int(time.time())
    token = sign(rsa_key, claims(**{k: now + d for k, d in offsets.items()}))
    if ok:
        assert (await v.authenticate(token)).account == "acct-1"
    else:
        with pytest.raises(InvalidToken):
            await v.authenticate(token)


@pytest.mark.parametrize("aud, ok", [
    ([AUDIENCE, "other"], True), ("second", True), (["other"], False), ("tollgate-x", False), ("", False),
])
async def test_audience_any_of_the_configured(jwks_path: Path, clock: FakeClock, rsa_key: Any,
                                              aud: Any, ok: bool) -> None:
    cfg = issuer_config(jwks_file=jwks_path, audience=(AUDIENCE, "second"))
    v = make_verifier(jwks_path, clock, issuer=cfg)
    token = sign(rsa_key, claims(aud=aud))
    if ok:
        assert (await v.authenticate(token)).account == "acct-1"
    else:
        with pytest.raises(InvalidToken):
            await v.authenticate(token)


# ---- the typ header ----------------------------------------------------------------------------
@pytest.mark.parametrize("typ, ok", [
    ("at+jwt", True), ("AT+JWT", True), ("application/at+jwt", True), ("Application/At+JWT", True),
    ("JWT", False), (None, False), ("application/jwt", False), ("at+jwt; charset=utf-8", False),
    ("text/at+jwt", False), (["at+jwt"], False), (1, False), ("at+jwt ", False),
])
async def test_token_types_refuse_a_missing_or_other_typ(jwks_path: Path, clock: FakeClock, rsa_key: Any,
                                                         typ: Any, ok: bool) -> None:
    v = make_verifier(jwks_path, clock, issuer=issuer_config(jwks_file=jwks_path, token_types=("at+jwt",)))
    token = sign(rsa_key, claims(), headers={"typ": typ})
    if ok:
        assert (await v.authenticate(token)).account == "acct-1"
    else:
        with pytest.raises(InvalidToken, match="token type not allowed for issuer"):
            await v.authenticate(token)
        assert v.source(ISSUER).fetches == 0  # refused on the header, before any key fetch


async def test_token_types_compare_as_media_types(jwks_path: Path, clock: FakeClock, rsa_key: Any) -> None:
    # Configured in the long form and in upper case; tokens in the short form, and vice versa.
    cfg = issuer_config(jwks_file=jwks_path, token_types=("application/AT+JWT", "jwt"))
    v = make_verifier(jwks_path, clock, issuer=cfg)
    for typ in ("at+jwt", "JWT", "application/jwt"):
        assert (await v.authenticate(sign(rsa_key, claims(), headers={"typ": typ}))).account == "acct-1"
    with pytest.raises(InvalidToken, match="token type not allowed"):
        await v.authenticate(sign(rsa_key, claims(), headers={"typ": "id+jwt"}))


@pytest.mark.parametrize("typ", [None, "JWT", "id+jwt", ["x"]])
async def test_without_token_types_any_typ_is_accepted(jwks_path: Path, clock: FakeClock, rsa_key: Any,
                                                       typ: Any) -> None:
    v = make_verifier(jwks_path, clock)  # the default: no typ check, as before the option existed
    assert (await v.authenticate(sign(rsa_key, claims(), headers={"typ": typ}))).account == "acct-1"


@pytest.mark.parametrize("headers", [
    {"crit": ["exp-ext"], "exp-ext": 1}, {"crit": ["b64"], "b64": False}, {"crit": "b64"}, {"crit": []},
])
async def test_crit_extensions_are_refused(jwks_path: Path, clock: FakeClock, rsa_key: Any,
                                           headers: dict[str, Any]) -> None:
    v = make_verifier(jwks_path, clock)
    with pytest.raises(InvalidToken):
        await v.authenticate(sign(rsa_key, claims(), headers=headers))


# ---- the verified-token cache ------------------------------------------------------------------
async def test_a_failed_token_is_never_cached(jwks_path: Path, clock: FakeClock, other_rsa_key: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    v = make_verifier(jwks_path, clock)
    counter = CountingVerifier(v, monkeypatch)
    forged = sign(other_rsa_key, claims())
    for _ in range(3):
        with pytest.raises(InvalidToken, match="InvalidSignatureError"):
            await v.authenticate(forged)
    assert counter.calls == 3 and not v._cache  # no positive entry, and no negative cache (by choice)


async def test_cache_is_keyed_by_the_whole_token(jwks_path: Path, clock: FakeClock, rsa_key: Any) -> None:
    v = make_verifier(jwks_path, clock)
    token = sign(rsa_key, claims())
    await v.authenticate(token)
    head, body, sig = token.split(".")
    # Same header (kid) and claims (sub), another signature: not the cached token.
    bad_sig = b64(b"\x00" * 256)
    with pytest.raises(InvalidToken, match="InvalidSignatureError"):
        await v.authenticate(f"{head}.{body}.{bad_sig}")
    # Same kid and sub, other claims: a separate entry.
    await v.authenticate(sign(rsa_key, claims(plan="free")))
    assert len(v._cache) == 2


async def test_cache_is_bounded_lru(jwks_path: Path, clock: FakeClock, rsa_key: Any) -> None:
    v = make_verifier(jwks_path, clock, cache_size=2)
    a, b, c = (sign(rsa_key, claims(sub=s)) for s in "abc")
    for token in (a, b, a, c):  # a is used again, so b is the least recently used when c comes
        await v.authenticate(token)
    assert len(v._cache) == 2
    accounts = {entry.account for entry in v._cache.values()}
    assert accounts == {"a", "c"}


async def test_cache_entry_lives_at_most_cache_max_ttl_from_verification(
        jwks_path: Path, clock: FakeClock, rsa_key: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    wall = FakeClock(start=time.time())
    v = make_verifier(jwks_path, clock, wall=wall, cache_max_ttl=60)
    counter = CountingVerifier(v, monkeypatch)
    token = sign(rsa_key, claims(exp=int(wall.now) + 3600))
    for _ in range(59):  # hits do not extend the entry
        await v.authenticate(token)
        wall.advance(1)
    assert counter.calls == 1
    wall.advance(1)  # 60 s after verification
    await v.authenticate(token)
    assert counter.calls == 2


async def test_cache_entry_ends_at_exp(jwks_path: Path, clock: FakeClock, rsa_key: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    wall = FakeClock(start=time.time())
    v = make_verifier(jwks_path, clock, wall=wall)
    counter = CountingVerifier(v, monkeypatch)
    token = sign(rsa_key, claims(exp=int(wall.now) + 10))
    await v.authenticate(token)
    wall.advance(11)
    await v.authenticate(token)  # re-verified: pyjwt's real clock says it is still valid
    assert counter.calls == 2


async def test_cached_tokens_are_refused_once_the_key_set_is_past_max_stale(
        jwks_path: Path, clock: FakeClock, rsa_key: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: a cached token kept being accepted after its issuer's key set went past
    # jwks_max_stale, when the same token verified afresh is refused.
    v = make_verifier(jwks_path, clock)  # jwks_max_stale: the default 24 h
    stage = IdentityStage(None, v)
    counter = CountingVerifier(v, monkeypatch)
    token = sign(rsa_key, claims())
    assert (await v.authenticate(token)).account == "acct-1"
    good = jwks_path.read_text()
    jwks_path.write_text("<html>maintenance</html>")  # every refresh from now on fails
    clock.advance(86400)  # the last good keys are exactly max_stale old: still trusted
    assert (await v.authenticate(token)).account == "acct-1"
    assert counter.calls == 1  # from the cache

    clock.advance(1)  # past max_stale
    refusals = []
    for credential in (token, sign(rsa_key, claims(sub="never-seen"))):  # cached, then fresh
        ctx = make_ctx([("Authorization", f"Bearer {credential}")])
        decision = await stage(ctx)
        assert decision is not None
        refusals.append((decision.status, decision.message, ctx.audit["identity"]))
    assert refusals == [(401, MESSAGE, "jwt no key for kid")] * 2  # the cached token, as a fresh one
    source = v.source(ISSUER)
    assert counter.calls == 3 and (source.fetches, source.failures) == (2, 1)

    jwks_path.write_text(good)  # the provider is back
    clock.advance(30)  # one cooldown after the failed attempt
    assert (await v.authenticate(token)).account == "acct-1"
    assert (await v.authenticate(token)).account == "acct-1"
    assert counter.calls == 4 and source.fetches == 3  # verified again once, then cached again


async def test_a_successful_refresh_keeps_cached_tokens_past_the_first_deadline(
        jwks_path: Path, clock: FakeClock, rsa_key: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    v = make_verifier(jwks_path, clock)  # jwks_cache_ttl 10 min, jwks_max_stale 24 h
    token = sign(rsa_key, claims())
    await v.authenticate(token)
    clock.advance(86000)
    assert await v.source(ISSUER).refresh()  # the refresh timer's round
    counter = CountingVerifier(v, monkeypatch)
    clock.advance(1000)  # past the first fetch's max_stale, well within the refresh's
    assert (await v.authenticate(token)).account == "acct-1"
    assert counter.calls == 0  # still from the cache


# ---- where the token comes from ----------------------------------------------------------------
async def test_jwt_in_x_api_key_is_treated_like_bearer(jwks_path: Path, clock: FakeClock, rsa_key: Any,
                                                       other_rsa_key: Any) -> None:
    stage = IdentityStage(None, make_verifier(jwks_path, clock))
    good, forged = sign(rsa_key, claims()), sign(other_rsa_key, claims(sub="x"))
    principals, reasons = [], []
    for headers in ([("Authorization", f"Bearer {good}")], [("x-api-key", good)]):
        ctx = make_ctx(headers)
        assert await stage(ctx) is None
        principals.append(ctx.principal)
    for headers in ([("Authorization", f"Bearer {forged}")], [("x-api-key", forged)]):
        ctx = make_ctx(headers)
        decision = await stage(ctx)
        assert decision is not None and decision.status == 401 and decision.message == MESSAGE
        reasons.append(ctx.audit["identity"])
    assert principals[0] == principals[1] and principals[0].source == "jwt"
    assert reasons == ["jwt rejected: InvalidSignatureError"] * 2
