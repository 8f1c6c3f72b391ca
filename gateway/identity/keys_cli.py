"""``gateway keys create|list|revoke``: manage the API keys file.

The file is rewritten atomically (temp file + rename, so the running gateway's watcher only
ever sees a complete file) under an advisory lock (two concurrent ``keys create`` must not
lose a key). Comments in the file are not preserved. A file that does not parse is refused
rather than rewritten, so a broken file is never made worse.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from gateway.identity.keys import generate_key, hash_key, load_keys_file, new_key_id
from gateway.yamlsource import ConfigError

_HEADER = ("# Tollgate API keys. Only SHA-256 hashes are stored; manage with `gateway keys ...`.\n"
           "# A key is revoked by `disabled: true` (or `revoked_at`); the gateway reloads this file.\n")


def add_keys_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``keys create|list|revoke``; each sets ``func(args) -> int`` (exit status)."""
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)

    create = sub.add_parser("create", help="create a key and print it (once)")
    _keys_file_arg(create)
    create.add_argument("--account", required=True)
    create.add_argument("--org", required=True)
    create.add_argument("--tier", required=True)
    create.add_argument("--label")
    create.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                        help="principal attribute, e.g. org_country=US (repeatable)")
    create.set_defaults(func=cmd_create)

    listing = sub.add_parser("list", help="list keys (never the keys themselves)")
    _keys_file_arg(listing)
    listing.set_defaults(func=cmd_list)

    revoke = sub.add_parser("revoke", help="disable a key; the gateway drops it on its next reload")
    _keys_file_arg(revoke)
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_revoke)


def _keys_file_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keys-file", required=True, type=Path, help="the YAML keys file")


def cmd_create(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    attrs: dict[str, str] = {}
    for item in args.attr:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"error: --attr expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        attrs[name] = value
    key = generate_key()
    record: dict[str, Any] = {
        "id": new_key_id(), "hash": hash_key(key), "account": args.account, "org": args.org,
        "tier": args.tier, "created_at": _now(), "disabled": False,
    }
    if args.label:
        record["label"] = args.label
    if attrs:
        record["attributes"] = attrs
    with _edit(args.keys_file) as edit:
        if edit.doc is None:
            return 1
        edit.doc["keys"].append(record)
    print(f"key id: {record['id']}", file=out)
    print(f"api key (shown once, store it now): {key}", file=out)
    return 0


def cmd_list(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        keyset = load_keys_file(args.keys_file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    rows = sorted(keyset.by_hash.values(), key=lambda r: (r.created_at or 0, r.key_id))
    print(f"{'ID':<18} {'ACCOUNT':<20} {'ORG':<20} {'TIER':<10} {'STATUS':<8} {'CREATED':<20} LABEL",
          file=out)
    for r in rows:
        created = (dt.datetime.fromtimestamp(r.created_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                   if r.created_at is not None else "-")
        status = "revoked" if r.disabled else "active"
        print(f"{r.key_id:<18} {r.account:<20} {r.org or '-':<20} {r.tier or '-':<10} {status:<8} "
              f"{created:<20} {r.label or ''}", file=out)
    return 0


def cmd_revoke(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    with _edit(args.keys_file) as edit:
        if edit.doc is None:
            return 1
        for record in edit.doc["keys"]:
            if isinstance(record, dict) and record.get("id") == args.key_id:
                record["disabled"] = True
                record.setdefault("revoked_at", _now())
                break
        else:
            edit.doc = None  # nothing to write
            print(f"error: no key with id {args.key_id!r}", file=sys.stderr)
            return 1
    print(f"revoked {args.key_id}; effective when the gateway reloads the keys file", file=out)
    return 0


@dataclass(slots=True)
class _Edit:
    doc: dict[str, Any] | None  # None: do not write (invalid file, or nothing to change)


@contextlib.contextmanager
def _edit(path: Path) -> Iterator[_Edit]:
    """Yield the parsed document under the lock; write it back unless ``doc`` became None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        edit = _Edit({"version": 1, "keys": []})
        if path.exists():
            try:
                load_keys_file(path)  # full validation with file:line errors first
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except ConfigError as exc:
                print(f"refusing to modify an invalid keys file:\n{exc}", file=sys.stderr)
                edit.doc = None
            else:
                edit.doc = {"version": loaded.get("version", 1), "keys": list(loaded.get("keys") or [])}
        yield edit
        if edit.doc is not None:
            _atomic_write(path, _HEADER + yaml.safe_dump(edit.doc, sort_keys=False, allow_unicode=True))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
