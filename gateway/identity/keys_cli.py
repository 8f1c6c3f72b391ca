"""``gateway keys create|list|revoke``: manage the API keys file.

The file is edited by :mod:`gateway.identity.keys_edit`: under a lock, atomically, through
symlinks, with every other line and comment kept.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.identity.keys import generate_key, hash_key, load_keys_file, new_key_id
from gateway.identity.keys_edit import appended, locked, revoked
from gateway.yamlsource import ConfigError


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
    try:
        with locked(args.keys_file) as current:
            if current is None:
                return 1
            current.save(appended(current, record))
    except OSError as exc:
        print(f"error: cannot update keys file {args.keys_file}: {exc}", file=sys.stderr)
        return 1
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
    try:
        with locked(args.keys_file) as current:
            if current is None:
                return 1
            keys = current.loaded.get("keys") or []
            index = next((i for i, r in enumerate(keys)
                          if isinstance(r, dict) and r.get("id") == args.key_id), None)
            if index is None:
                print(f"error: no key with id {args.key_id!r}", file=sys.stderr)
                return 1
            updates: dict[str, Any] = {}
            if keys[index].get("disabled") is not True:
                updates["disabled"] = True
            if "revoked_at" not in keys[index]:
                updates["revoked_at"] = _now()
            if updates:  # revoking twice leaves the file (and its revoked_at) alone
                current.save(revoked(current, index, updates))
    except OSError as exc:
        print(f"error: cannot update keys file {args.keys_file}: {exc}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}; effective when the gateway reloads the keys file", file=out)
    return 0


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
