"""API keys: file format and errors, lookup, CLI, hot reload and revocation."""

from __future__ import annotations

import argparse
import asyncio
import io
import re
from pathlib import Path

import pytest

from gateway.identity.keys import KeyRing, generate_key, hash_key, load_keys_file, parse_keys
from gateway.identity.keys_cli import add_keys_commands
from gateway.stages.identity import MESSAGE, IdentityStage
from gateway.yamlsource import ConfigError
from tests.unit.identity.tokens import make_ctx


def cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="gateway")
    add_keys_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    return args.func(args, out=out), out.getvalue()


def create(path: Path, *extra: str) -> tuple[str, str]:
    status, out = cli("keys", "create", "--keys-file", str(path), "--account", "acme", "--org", "acme-inc",
                      "--tier", "pro", *extra)
    assert status == 0, out
    key = re.search(r"(tg_[A-Za-z0-9_-]{43})", out)
    key_id = re.search(r"key id: (key_[0-9a-f]{12})", out)
    assert key and key_id
    return key.group(1), key_id.group(1)


def test_key_format_and_hash() -> None:
    key = generate_key()
    assert re.fullmatch(r"tg_[A-Za-z0-9_-]{43}", key)
    assert hash_key(key).startswith("sha256:") and len(hash_key(key)) == 71
    assert generate_key() != key


def test_create_stores_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, key_id = create(path, "--label", "ci", "--attr", "org_country=US", "--attr", "region=eu")
    text = path.read_text()
    assert key not in text and hash_key(key) in text and key_id in text
    record = load_keys_file(path).find(key)
    assert record is not None and record.key_id == key_id and record.label == "ci"
    assert (record.account, record.org, record.tier) == ("acme", "acme-inc", "pro")
    assert dict(record.attributes) == {"org_country": "US", "region": "eu"}
    assert record.created_at and not record.disabled
    assert path.stat().st_mode & 0o077 == 0  # not world/group readable


def test_find_rejects_wrong_and_near_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, _ = create(path)
    keys = load_keys_file(path)
    assert keys.find(key) is not None
    assert keys.find(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert keys.find("tg_") is None and keys.find("") is None


def test_list_never_prints_keys_or_hashes(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, key_id = create(path, "--label", "laptop")
    status, out = cli("keys", "list", "--keys-file", str(path))
    assert status == 0 and key_id in out and "laptop" in out and "active" in out
    assert key not in out and hash_key(key)[7:] not in out


def test_revoke_marks_disabled(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, key_id = create(path)
    assert cli("keys", "revoke", "--keys-file", str(path), key_id)[0] == 0
    record = load_keys_file(path).find(key)
    assert record is not None and record.disabled
    assert "revoked" in cli("keys", "list", "--keys-file", str(path))[1]
    assert cli("keys", "revoke", "--keys-file", str(path), "key_nope")[0] == 1


def test_cli_refuses_to_touch_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - id: a\n")
    before = path.read_text()
    status, _ = cli("keys", "create", "--keys-file", str(path), "--account", "a", "--org", "o", "--tier", "t")
    assert status == 1 and path.read_text() == before


def test_bad_attr_syntax(tmp_path: Path) -> None:
    status, _ = cli("keys", "create", "--keys-file", str(tmp_path / "k.yaml"), "--account", "a", "--org", "o",
                    "--tier", "t", "--attr", "novalue")
    assert status == 2


BAD = """\
version: 1
keys:
  - id: key_1
    hash: sha256:abc
    account: acme
  - id: key_1
    hash: sha256:0000000000000000000000000000000000000000000000000000000000000000
    acount: acme
    attributes: {nested: {a: 1}}
    created_at: yesterday
"""


def test_file_errors_are_all_reported_with_positions() -> None:
    with pytest.raises(ConfigError) as err:
        parse_keys(BAD, "keys.yaml")
    text = str(err.value)
    assert "keys.yaml:4:11: keys[0].hash: expected 'sha256:' followed by 64 lowercase hex digits" in text
    assert "keys.yaml:8:5: keys[1].acount: unknown key 'acount'; did you mean 'account'?" in text
    assert "keys[1]: missing required key 'account'" in text
    assert "keys.yaml:9:26: keys[1].attributes.nested: expected a string, number or boolean" in text
    assert "keys.yaml:10:17: keys[1].created_at: expected an ISO 8601 time" in text


def test_duplicates_are_reported() -> None:
    h = "sha256:" + "1" * 64
    text = f"keys:\n  - {{id: a, hash: '{h}', account: x}}\n  - {{id: a, hash: '{h}', account: y}}\n"
    with pytest.raises(ConfigError) as err:
        parse_keys(text, "k.yaml")
    assert "k.yaml:3:6: keys[1].id: duplicate key id 'a'" in str(err.value)
    assert "keys[1].hash: duplicate key hash" in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read keys file"):
        load_keys_file(tmp_path / "absent.yaml")


def test_empty_file_has_no_keys() -> None:
    assert len(parse_keys("", "k.yaml")) == 0 and len(parse_keys("keys: []\n", "k.yaml")) == 0


# ---- through the stage and the hot-reloading ring ---------------------------------------------
async def test_stage_accepts_bearer_and_x_api_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, key_id = create(path, "--attr", "org_country=CN")
    ring = KeyRing(path, reload_interval=0)
    await ring.start()
    stage = IdentityStage(ring)
    for headers in ([("Authorization", f"Bearer {key}")], [("authorization", f"bearer  {key} ")],
                    [("x-api-key", key)], [("Authorization", "Basic Zm9vOmJhcg=="), ("x-api-key", key)]):
        ctx = make_ctx(headers)
        assert await stage(ctx) is None, headers
        p = ctx.principal
        assert p.authenticated and p.source == "api_key" and p.key_id == key_id
        assert p.account == "acme" and p.attributes["org_country"] == "CN"
    await ring.close()


@pytest.mark.parametrize("headers", [
    [], [("Authorization", "Bearer")], [("Authorization", "Bearer tg_wrong")], [("x-api-key", "sk-other")],
    [("Authorization", "Basic dGdfOg==")], [("x-api-key", "tg_" + "a" * 70000)],
])
async def test_stage_refuses_with_one_neutral_401(tmp_path: Path, headers: list[tuple[str, str]]) -> None:
    path = tmp_path / "keys.yaml"
    create(path)
    ring = KeyRing(path, reload_interval=0)
    ring.load()
    ctx = make_ctx(headers)
    decision = await IdentityStage(ring)(ctx)
    assert decision is not None and decision.status == 401 and decision.error_type == "authentication"
    assert decision.message == MESSAGE and not decision.retryable
    assert "identity" in ctx.audit and "tg_wrong" not in str(ctx.audit)


async def test_anonymous_allow(tmp_path: Path) -> None:
    stage = IdentityStage(None, None, anonymous=True)
    ctx = make_ctx([])
    assert await stage(ctx) is None and not ctx.principal.authenticated
    bad = await stage(make_ctx([("x-api-key", "tg_nope")]))  # a wrong key is still refused
    assert bad is not None and bad.status == 401


async def test_revoked_key_stops_working_after_reload(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, key_id = create(path)
    ring = KeyRing(path, reload_interval=0.02)
    await ring.start()
    stage = IdentityStage(ring)
    try:
        assert await stage(make_ctx([("x-api-key", key)])) is None
        cli("keys", "revoke", "--keys-file", str(path), key_id)
        for _ in range(250):  # real file watching: poll until the reload lands (≤ 5 s)
            if ring.current.find(key) is not None and ring.current.find(key).disabled:  # type: ignore[union-attr]
                break
            await asyncio.sleep(0.02)
        ctx = make_ctx([("x-api-key", key)])
        decision = await stage(ctx)
        assert decision is not None and decision.status == 401
        assert ctx.audit["identity"] == f"disabled api key {key_id}"
    finally:
        await ring.close()


async def test_invalid_reload_keeps_last_good_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, _ = create(path)
    ring = KeyRing(path, reload_interval=0)
    ring.load()
    path.write_text("keys:\n  - id: k\n    hash: nope\n    account: a\n")
    assert await ring.reload() is False
    assert ring.current.find(key) is not None
    assert ring.last_error is not None and f"{path}:3:11: keys[0].hash" in str(ring.last_error)
    create(tmp_path / "other.yaml")
    (tmp_path / "other.yaml").replace(path)
    assert await ring.reload() is True and ring.last_error is None and ring.current.find(key) is None
