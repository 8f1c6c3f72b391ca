"""API keys: file format and errors, lookup, CLI, hot reload and revocation."""

from __future__ import annotations

import argparse
import asyncio
import errno
import io
import os
import re
from pathlib import Path

import pytest

from gateway.identity.keys import KeyRing, generate_key, hash_key, load_keys_file, parse_keys
from gateway.identity.keys_cli import add_keys_commands
from gateway.identity.keys_edit import locked as _locked
from gateway.identity.keys_edit import rewrite as _rewrite
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


# ---- rewriting: symlinks, modes and comments -------------------------------------------------
HAND_WRITTEN = """\
# Managed by SRE; ticket OPS-1.
# Keep the CI key until Q3.

version: 1   # format version
keys:
  # the CI runner
  - id: key_ci
    hash: sha256:0000000000000000000000000000000000000000000000000000000000000000
    account: acme
    disabled: false   # flip to revoke
    attributes:
      org_country: US
  # add partner keys below
# end of file
"""


def revoked_at(text: str, key_id: str) -> str:
    """The ``revoked_at`` line the CLI wrote for ``key_id`` (its value is the current time)."""
    match = re.search(rf"- id: {key_id}\n(?:    .*\n)*?(    revoked_at: '[0-9TZ:-]+'\n)", text)
    assert match, text
    return match.group(1)


def new_record(text: str, key_id: str, indent: str = "  ") -> str:
    """The block of lines ``keys create`` inserted for ``key_id``, its dash at ``indent``."""
    match = re.search(rf"(?m)^{indent}- id: {key_id}\n(?:{indent}  .*\n)+", text)
    assert match, text
    return match.group(0)


def test_create_and_revoke_keep_every_other_line_and_comment(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(HAND_WRITTEN)
    key, key_id = create(path)
    text = path.read_text()
    record = new_record(text, key_id)
    assert text == HAND_WRITTEN.replace("  # add partner keys", record + "  # add partner keys")
    assert load_keys_file(path).find(key) is not None

    assert cli("keys", "revoke", "--keys-file", str(path), "key_ci")[0] == 0
    after = path.read_text()
    assert after == text.replace("disabled: false   # flip", "disabled: true   # flip").replace(
        "      org_country: US\n", "      org_country: US\n" + revoked_at(after, "key_ci"))
    ci = load_keys_file(path).by_hash["sha256:" + "0" * 64]
    assert ci.disabled and ci.attributes["org_country"] == "US"


def test_revoking_twice_keeps_the_first_revocation_time(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, key_id = create(path)
    cli("keys", "revoke", "--keys-file", str(path), key_id)
    first = path.read_text()
    assert cli("keys", "revoke", "--keys-file", str(path), key_id)[0] == 0
    assert path.read_text() == first


def test_flow_style_records_are_edited_in_place(tmp_path: Path) -> None:
    """One record per line, as scripts (and bench/identity_geo.py) write them; no final newline."""
    h1, h2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    original = (f"# generated\nkeys:\n- {{id: k1, hash: '{h1}', account: a}}  # first\n"
                f"- {{id: k2, hash: '{h2}', account: b, disabled: false}}")
    path = tmp_path / "keys.yaml"
    path.write_text(original)
    assert cli("keys", "revoke", "--keys-file", str(path), "k1")[0] == 0
    assert cli("keys", "revoke", "--keys-file", str(path), "k2")[0] == 0
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# generated", "keys:"]
    revoked = "disabled: true, revoked_at: '[^']+'"
    assert re.fullmatch(rf"- {{id: k1, hash: '{h1}', account: a, {revoked}}}  # first", lines[2])
    assert re.fullmatch(rf"- {{id: k2, hash: '{h2}', account: b, {revoked}}}", lines[3])
    key, key_id = create(path)
    assert path.read_text().splitlines()[:4] == lines and f"- id: {key_id}" in path.read_text()
    assert load_keys_file(path).find(key) is not None


@pytest.mark.parametrize(("empty", "becomes"), [
    ("keys: []   # none yet\n", "keys:   # none yet\n"),
    ("keys: []\n", "keys:\n"),
    ("keys:\n", "keys:\n"),
])
def test_an_empty_list_becomes_a_block_list_in_place(tmp_path: Path, empty: str, becomes: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"# our keys\n\n{empty}version: 1  # keep me\n")
    _, key_id = create(path)
    text = path.read_text()
    assert text == f"# our keys\n\n{becomes}{new_record(text, key_id, indent='')}version: 1  # keep me\n"


def test_crlf_line_endings_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    h = "sha256:" + "1" * 64
    path.write_bytes(f"# windows\r\nkeys:\r\n  - id: k1\r\n    hash: '{h}'\r\n    account: a\r\n".encode())
    create(path)
    assert cli("keys", "revoke", "--keys-file", str(path), "k1")[0] == 0
    data = path.read_bytes()
    assert data.startswith(b"# windows\r\nkeys:\r\n  - id: k1\r\n")
    assert data.count(b"\n") == data.count(b"\r\n") > 10
    assert load_keys_file(path).by_hash[h].disabled


def test_a_layout_that_cannot_be_spliced_is_rewritten_keeping_the_header(tmp_path: Path) -> None:
    h = "sha256:" + "1" * 64
    path = tmp_path / "keys.yaml"
    path.write_text(f"# header kept\n# (both lines)\n\nkeys: [{{id: k1, hash: '{h}', account: a}}]  # lost\n")
    key, key_id = create(path)
    text = path.read_text()
    assert text.startswith("# header kept\n# (both lines)\nversion: 1\nkeys:\n- id: k1\n")
    assert "# lost" not in text
    keys = load_keys_file(path)
    assert keys.find(key) is not None and h in keys.by_hash


def test_a_splice_that_changes_the_meaning_is_never_written(tmp_path: Path) -> None:
    """The safety net under every line edit: re-parse, compare, else re-serialise the document."""
    path = tmp_path / "keys.yaml"
    path.write_text(HAND_WRITTEN)
    with _locked(path) as current:
        assert current is not None
        expected = {**current.loaded, "keys": []}
        text = _rewrite(current, expected, lambda lines, root: lines.text)  # "forgot" the edit
    assert text == HAND_WRITTEN.split("\n\n")[0] + "\nversion: 1\nkeys: []\n"


def k8s_style_secret(tmp_path: Path, text: str, mode: int) -> tuple[Path, Path]:
    """``keys.yaml -> ..data/keys.yaml``, ``..data -> ..2024_01_01``: how a mounted secret looks."""
    versioned = tmp_path / "secret" / "..2024_01_01"
    versioned.mkdir(parents=True)
    target = versioned / "keys.yaml"
    target.write_text(text)
    target.chmod(mode)
    (tmp_path / "secret" / "..data").symlink_to("..2024_01_01")
    link = tmp_path / "secret" / "keys.yaml"
    link.symlink_to("..data/keys.yaml")
    return link, target


def test_create_and_revoke_write_through_symlinks_keeping_links_and_mode(tmp_path: Path) -> None:
    link, target = k8s_style_secret(tmp_path, HAND_WRITTEN, 0o640)
    outer = tmp_path / "keys.yaml"
    outer.symlink_to(link)  # and one more level, as a config-management symlink would add
    key, key_id = create(outer)
    assert cli("keys", "revoke", "--keys-file", str(outer), key_id)[0] == 0
    assert outer.is_symlink() and link.is_symlink() and (tmp_path / "secret" / "..data").is_symlink()
    assert os.readlink(link) == "..data/keys.yaml"
    assert target.stat().st_mode & 0o777 == 0o640
    assert target.read_text().startswith(HAND_WRITTEN.split("  # add partner")[0])
    record = load_keys_file(outer).find(key)
    assert record is not None and record.disabled
    # the temp file was renamed over the target in its own directory; nothing else left behind
    assert sorted(p.name for p in target.parent.iterdir()) == ["keys.yaml", "keys.yaml.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml", "secret"]


def test_a_dangling_symlink_gets_its_target_created(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    link = tmp_path / "keys.yaml"
    link.symlink_to("secrets/keys.yaml")
    key, _ = create(link)
    target = tmp_path / "secrets" / "keys.yaml"
    assert link.is_symlink() and target.is_file() and not target.is_symlink()
    assert target.stat().st_mode & 0o777 == 0o600
    assert load_keys_file(link).find(key) is not None


def test_a_symlink_loop_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    status, _ = cli("keys", "create", "--keys-file", str(tmp_path / "a.yaml"), "--account", "a",
                    "--org", "o", "--tier", "t")
    assert status == 1
    link = tmp_path / "a.yaml"
    assert capsys.readouterr().err == (f"error: cannot update keys file {link}: "
                                       f"[Errno {errno.ELOOP}] {os.strerror(errno.ELOOP)}: '{link}'\n")
    assert (tmp_path / "a.yaml").is_symlink() and (tmp_path / "b.yaml").is_symlink()


def test_an_existing_mode_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys: []\n")
    path.chmod(0o640)
    create(path)
    assert path.stat().st_mode & 0o777 == 0o640


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
