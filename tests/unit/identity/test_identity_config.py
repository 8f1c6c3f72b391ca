"""``identity:`` config parsing, and the stage with a JWT verifier built from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.identity.config import IdentityConfig, parse_identity_config
from gateway.identity.jwt import JwtVerifier
from gateway.stages.identity import IdentityStage
from gateway.yamlsource import ConfigError, Issues, Node
from tests.unit.identity.tokens import ISSUER, claims, make_ctx, public_jwk, sign

GOOD = f"""
identity:
  anonymous: deny
  keys_file: keys.yaml
  keys_reload_interval: 5s
  jwt:
    max_token_bytes: 4096
    issuers:
      - issuer: "{ISSUER}"
        audience: tollgate
        algorithms: [RS256]
        jwks_file: jwks.json
        leeway: 10s
        jwks_refresh_cooldown: 1m
        account_prefix: "sso:"
        claims:
          account: sub
          org: org_id
          tier: plan
          attributes:
            org_country: [https://example.com/claims, org_country]
"""


def parse(text: str, base: Path | None = None) -> tuple[IdentityConfig, Issues]:
    issues = Issues()
    root = Node.parse(text, "gw.yaml", issues)
    assert root is not None
    return parse_identity_config(root.child("identity"), base), issues


def test_good_config(tmp_path: Path) -> None:
    cfg, issues = parse(GOOD, tmp_path)
    issues.raise_if_errors()
    assert not cfg.anonymous and cfg.keys_file == tmp_path / "keys.yaml" and cfg.keys_reload_interval == 5
    assert cfg.jwt is not None and cfg.jwt.max_token_bytes == 4096
    iss = cfg.jwt.issuers[0]
    assert iss.issuer == ISSUER and iss.audience == ("tollgate",) and iss.algorithms == ("RS256",)
    assert iss.jwks_file == tmp_path / "jwks.json" and iss.leeway == 10 and iss.jwks_refresh_cooldown == 60
    assert iss.required_claims == ("exp", "iat", "iss", "aud")
    assert iss.claims.attributes == (("org_country", ("https://example.com/claims", "org_country")),)
    assert iss.account_prefix == "sso:"


def test_defaults() -> None:
    cfg, issues = parse("other: 1\n")
    assert cfg == IdentityConfig() and not issues.items
    assert cfg.headers == ("authorization", "x-api-key") and not cfg.anonymous


BAD = """\
identity:
  anonymous: maybe
  headers: [cookie]
  jwt:
    issuers:
      - issuer: https://a/
        audience: x
        algorithms: [HS256, none]
        jwks_file: a.json
        jwks_url: https://a/jwks
      - issuer: https://a/
        audience: []
        algorithms: [RS256]
        jwks_url: ftp://a/jwks
        leeway: forever
        claim: {}
"""


def test_bad_config_reports_everything() -> None:
    _, issues = parse(BAD)
    with pytest.raises(ConfigError) as err:
        issues.raise_if_errors()
    text = str(err.value)
    for expected in [
        "gw.yaml:2:3: identity.anonymous: expected 'allow' or 'deny'",
        "identity.headers: unsupported header(s) cookie",
        "identity.jwt.issuers[0].algorithms: algorithm 'HS256' is not allowed",
        "identity.jwt.issuers[0].algorithms: algorithm 'none' is not allowed",
        "identity.jwt.issuers[0]: exactly one of 'jwks_file' or 'jwks_url' is required",
        "identity.jwt.issuers[1].audience: expected at least one audience",
        "identity.jwt.issuers[1].jwks_url: expected an https:// URL",
        "gw.yaml:15:17: identity.jwt.issuers[1].leeway: expected a duration",
        "unknown key 'claim'; did you mean 'claims'?",
    ]:
        assert expected in text, expected


async def test_stage_with_jwt_from_config(tmp_path: Path, rsa_key: Any) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1")]}))
    cfg, issues = parse(GOOD.replace("  keys_file: keys.yaml\n", ""), tmp_path)
    issues.raise_if_errors()
    assert cfg.jwt is not None
    verifier = JwtVerifier(cfg.jwt)
    stage = IdentityStage.from_config(cfg, None, verifier)
    try:
        ctx = make_ctx([("Authorization", f"Bearer {sign(rsa_key, claims())}")])
        assert await stage(ctx) is None
        p = ctx.principal
        assert (p.account, p.org, p.tier, p.attributes["org_country"]) == ("sso:acct-1", "org-1", "pro", "US")
        ctx = make_ctx([("x-api-key", sign(rsa_key, claims(aud="nope")))])
        decision = await stage(ctx)
        assert decision is not None and decision.status == 401
        assert ctx.audit["identity"] == "jwt rejected: InvalidAudienceError"
        ctx = make_ctx([("x-api-key", "tg_" + "x" * 43)])  # key-shaped but no key ring configured
        assert (await stage(ctx)) is not None
    finally:
        await verifier.close()


async def test_identity_service_lifecycle(tmp_path: Path, rsa_key: Any) -> None:
    from gateway.identity.keys_cli import add_keys_commands  # noqa: F401  (CLI module imports cleanly)
    from gateway.identity.service import IdentityService

    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1")]}))
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    cfg, issues = parse(GOOD.replace("keys_reload_interval: 5s", "keys_reload_interval: 0"), tmp_path)
    issues.raise_if_errors()
    service = IdentityService(cfg)
    await service.start()
    try:
        assert service.jwt is not None
        source = service.jwt.source(ISSUER)
        await source.join()  # prefetched at start-up: the first token finds the keys loaded
        assert source.fetches == 1
        ctx = make_ctx([("Authorization", f"Bearer {sign(rsa_key, claims())}")])
        # the account carries the issuer's account_prefix
        assert await service.stage(ctx) is None and ctx.principal.account == "sso:acct-1"
        status = service.status()
        assert status["keys"]["count"] == 0 and status["anonymous"] == "deny"
        issuer = status["jwt_issuers"][ISSUER]
        assert (issuer["fetches"], issuer["failures"], issuer["stale"]) == (1, 0, False)
        # Fetched a moment ago; usable for jwks_max_stale (a day by default) from then.
        age = issuer["last_success_age_seconds"]
        assert 0 <= age < 10 and abs(issuer["stale_in_seconds"] + age - 86400) <= 0.2
    finally:
        await service.close()


def test_relative_paths_default_to_the_config_folder(tmp_path: Path) -> None:
    issues = Issues()
    root = Node.parse(GOOD, str(tmp_path / "gateway.yaml"), issues)
    assert root is not None
    cfg = parse_identity_config(root.child("identity"))
    assert cfg.keys_file == tmp_path / "keys.yaml"


def _issuers(*entries: str, keys_file: bool = False) -> str:
    """An identity section with one issuer per entry (extra YAML lines for that issuer)."""
    text = "identity:\n" + ("  keys_file: keys.yaml\n" if keys_file else "") + "  jwt:\n    issuers:\n"
    for i, extra in enumerate(entries):
        text += (f"      - issuer: https://idp{i}.example/\n        audience: tollgate\n"
                 f"        algorithms: [RS256]\n        jwks_file: jwks{i}.json\n")
        text += "".join(f"        {line}\n" for line in extra.splitlines() if line)
    return text


def errors_of(text: str) -> str:
    _, issues = parse(text)
    return "\n".join(str(item) for item in issues.items)


def test_one_source_of_accounts_needs_no_prefix() -> None:
    assert errors_of(_issuers("")) == ""
    assert errors_of(_issuers("account_prefix: 'x:'")) == ""


@pytest.mark.parametrize("entries, keys_file", [
    (("", "account_prefix: 'p:'"), False),  # two issuers, the first silent
    (("",), True),  # an issuer beside the keys file
])
def test_several_sources_of_accounts_must_each_say_where_theirs_live(
    entries: tuple[str, ...], keys_file: bool
) -> None:
    text = errors_of(_issuers(*entries, keys_file=keys_file))
    assert "gw.yaml:" in text and "identity.jwt.issuers[0]: issuer 'https://idp0.example/' shares account " \
        "names" in text
    assert "set account_prefix" in text and "issuers[1]" not in text


def test_overlapping_prefixes_are_refused_equal_ones_share_deliberately() -> None:
    text = errors_of(_issuers("account_prefix: 'a:'", "account_prefix: 'a:b:'"))
    assert ("identity.jwt.issuers[1].account_prefix: account_prefix 'a:b:' overlaps "
            "account_prefix 'a:'") in text
    assert errors_of(_issuers("account_prefix: 'a:'", "account_prefix: 'a:'", keys_file=True)) == ""
    # the home namespace (keys file, deliberately shared issuers) beside a prefixed partner
    assert errors_of(_issuers("account_prefix: ''", "account_prefix: 'partner:'", keys_file=True)) == ""


@pytest.mark.parametrize("url, ok", [
    ("https://idp.example/jwks", True), ("http://127.0.0.1:8080/jwks", True),
    ("http://localhost/jwks", True), ("http://[::1]:9/jwks", True), ("http://idp.example/jwks", False),
    ("http://127.0.0.1.evil.example/x", False), ("https://", False), ("ftp://idp.example/jwks", False),
    ("http://[::1]/jwks", True), ("http://LOCALHOST/jwks", True),
    # user info hides the real host: it is evil.example, over plain http
    ("http://127.0.0.1:80@evil.example/jwks", False), ("http://localhost@evil.example/", False),
    ("https://user@idp.example/jwks", False), ("http://127.0.0.1:port/jwks", False),
])
def test_jwks_urls_must_be_https_except_to_loopback(url: str, ok: bool) -> None:
    text = errors_of(_issuers("").replace("jwks_file: jwks0.json", f"jwks_url: '{url}'"))
    assert (text == "") is ok, text


@pytest.mark.parametrize("line, error", [
    ("jwks_refresh_cooldown: 0s", "identity.jwt.issuers[0].jwks_refresh_cooldown: must be between 1s and "
                                  "3600s, got 0s"),
    ("jwks_timeout: 0s", "identity.jwt.issuers[0].jwks_timeout: must be between 0.1s and 60s, got 0s"),
    ("jwks_timeout: 5m", "identity.jwt.issuers[0].jwks_timeout: must be between 0.1s and 60s, got 300s"),
])
def test_jwks_fetch_settings_that_would_disable_the_protections_are_refused(line: str, error: str) -> None:
    # A zero cooldown lets every unknown-kid token fetch the key set; aiohttp reads a zero
    # timeout as "no timeout", which would hold every caller of a hung fetch.
    text = errors_of(_issuers(line))
    assert text.startswith("gw.yaml:8:") and error in text, text


def test_token_types_are_read_as_written_and_absent_by_default() -> None:
    cfg, issues = parse(_issuers("token_types: [at+jwt, application/JWT]\naccount_prefix: 'a:'",
                                 "account_prefix: 'b:'"))
    assert not issues.items and cfg.jwt is not None
    assert [i.token_types for i in cfg.jwt.issuers] == [("at+jwt", "application/JWT"), None]


@pytest.mark.parametrize("line, error", [
    ("token_types: at+jwt", "gw.yaml:8:22: identity.jwt.issuers[0].token_types: expected a list of token "
                            "types (JOSE 'typ' values such as at+jwt), got string 'at+jwt'"),
    ("token_types:", "gw.yaml:8:21: identity.jwt.issuers[0].token_types: expected a list of token types "
                     "(JOSE 'typ' values such as at+jwt), got nothing (null)"),
    ("token_types: {at+jwt: 1}", "gw.yaml:8:22: identity.jwt.issuers[0].token_types: expected a list of "
                                 "token types"),
    ("token_types: []", "gw.yaml:8:9: identity.jwt.issuers[0].token_types: expected at least one token "
                        "type; leave token_types out to accept any 'typ'"),
    ("token_types: [at+jwt, '']", "gw.yaml:8:31: identity.jwt.issuers[0].token_types[1]: expected a token "
                                  "type (JOSE 'typ' value such as at+jwt), got an empty string"),
    ("token_types: [at+jwt, ' ']", "gw.yaml:8:31: identity.jwt.issuers[0].token_types[1]: expected a token "
                                   "type (JOSE 'typ' value such as at+jwt), got only spaces"),
    ("token_types: [5, at+jwt]", "gw.yaml:8:23: identity.jwt.issuers[0].token_types[0]: expected a token "
                                 "type (JOSE 'typ' value such as at+jwt), got int 5"),
    ("token_types: [[at+jwt]]", "gw.yaml:8:23: identity.jwt.issuers[0].token_types[0]: expected a token "
                                "type (JOSE 'typ' value such as at+jwt), got a list"),
])
def test_bad_token_types_are_refused_with_their_place(line: str, error: str) -> None:
    text = errors_of(_issuers(line))
    assert error in text and text.count("\n") == 0, text  # one error, where the bad value is


@pytest.mark.parametrize("lines, error", [
    ("jwks_max_stale: 10m", "gw.yaml:8:9: identity.jwt.issuers[0].jwks_max_stale: expected jwks_max_stale "
                            "longer than jwks_cache_ttl + 10% (660s), got 600s"),
    ("jwks_cache_ttl: 1d", "gw.yaml:8:9: identity.jwt.issuers[0].jwks_cache_ttl: expected jwks_max_stale "
                           "longer than jwks_cache_ttl + 10% (95040s), got 86400s"),
])
def test_a_key_set_that_would_go_stale_between_refreshes_is_refused(lines: str, error: str) -> None:
    assert errors_of(_issuers(lines)) == error
    assert errors_of(_issuers("jwks_cache_ttl: 10m\njwks_max_stale: 661s")) == ""


async def test_token_types_from_config_reach_the_stage(tmp_path: Path, rsa_key: Any) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [public_jwk(rsa_key, "k1")]}))
    text = GOOD.replace("  keys_file: keys.yaml\n", "").replace(
        "        leeway: 10s\n", "        leeway: 10s\n        token_types: [at+jwt]\n")
    cfg, issues = parse(text, tmp_path)
    issues.raise_if_errors()
    assert cfg.jwt is not None
    verifier = JwtVerifier(cfg.jwt)
    stage = IdentityStage.from_config(cfg, None, verifier)
    try:
        ctx = make_ctx([("Authorization", f"Bearer {sign(rsa_key, claims(), headers={'typ': 'at+jwt'})}")])
        assert await stage(ctx) is None and ctx.principal.account == "sso:acct-1"
        ctx = make_ctx([("Authorization", f"Bearer {sign(rsa_key, claims())}")])  # pyjwt's typ: JWT
        decision = await stage(ctx)
        assert decision is not None and decision.status == 401
        assert ctx.audit["identity"] == "jwt token type not allowed for issuer"
    finally:
        await verifier.close()


async def test_an_unreachable_identity_provider_does_not_stop_the_start(tmp_path: Path, rsa_key: Any) -> None:
    from gateway.identity.service import IdentityService

    (tmp_path / "keys.yaml").write_text("keys: []\n")
    cfg, issues = parse(GOOD.replace("keys_reload_interval: 5s", "keys_reload_interval: 0"), tmp_path)
    issues.raise_if_errors()  # jwks.json is missing: the prefetch fails, the start does not
    service = IdentityService(cfg)
    await service.start()
    try:
        assert service.jwt is not None
        source = service.jwt.source(ISSUER)
        await source.join()
        assert (source.fetches, source.failures) == (1, 1)
        ctx = make_ctx([("Authorization", f"Bearer {sign(rsa_key, claims())}")])
        decision = await service.stage(ctx)
        assert decision is not None and decision.status == 401  # no keys yet: refused, not crashed
    finally:
        await service.close()

