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
        "identity.jwt.issuers[1].jwks_url: expected an http(s) URL",
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
        assert (p.account, p.org, p.tier, p.attributes["org_country"]) == ("acct-1", "org-1", "pro", "US")
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
        ctx = make_ctx([("Authorization", f"Bearer {sign(rsa_key, claims())}")])
        assert await service.stage(ctx) is None and ctx.principal.account == "acct-1"
        status = service.status()
        assert status["keys"]["count"] == 0 and status["anonymous"] == "deny"
        assert status["jwt_issuers"][ISSUER]["fetches"] == 1
    finally:
        await service.close()


def test_relative_paths_default_to_the_config_folder(tmp_path: Path) -> None:
    issues = Issues()
    root = Node.parse(GOOD, str(tmp_path / "gateway.yaml"), issues)
    assert root is not None
    cfg = parse_identity_config(root.child("identity"))
    assert cfg.keys_file == tmp_path / "keys.yaml"
