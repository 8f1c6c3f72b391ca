"""``gateway solve`` and ``gateway friction list|clear``.

``gateway solve``: solve a proof-of-work challenge from the command line.

    gateway solve 'v1.1767225600.16.abc.def'            # a bare token
    gateway solve 'Tollgate-PoW challenge="...", difficulty=16, ...'
    curl ... | gateway solve -                           # an error body (JSON) on stdin

Prints the value for the ``x-tollgate-solution`` header.

``gateway friction``: list and clear an account's sticky friction through a running gateway's
admin API (the one audited path for clears, whatever the store; see gateway/friction/state.py).

    gateway friction list acct-42
    gateway friction clear acct-42 --by alice --reason "ticket 123: verified by phone"
    gateway friction clear acct-42 --by alice --rule distillation-pow
    gateway friction clear acct-42 --by alice --reverify

``--admin-url`` (default ``$TOLLGATE_ADMIN_URL`` or http://127.0.0.1:9090); the bearer token is
read from the variable named by ``--token-env`` (default ``TOLLGATE_ADMIN_TOKEN``), never from the
command line. Prints the admin API's JSON answer; exit 1 when it refused, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ADMIN_URL = "http://127.0.0.1:9090"
ADMIN_TIMEOUT = 10.0


def _run(args: argparse.Namespace) -> int:
    from gateway.client import solve_challenge

    raw: Any = args.challenge
    if raw == "-":
        text = sys.stdin.read()
        try:
            raw = json.loads(text)
        except ValueError:
            raw = text
    try:
        print(solve_challenge(raw))
    except (ValueError, KeyError, TypeError) as exc:
        print(f"gateway solve: not a proof-of-work challenge ({exc})", file=sys.stderr)
        return 2
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str, query: dict[str, str]) -> int:
    base = (args.admin_url or os.environ.get("TOLLGATE_ADMIN_URL") or DEFAULT_ADMIN_URL).rstrip("/")
    if not base.startswith(("http://", "https://")):
        print(f"gateway friction: --admin-url must be an http(s) URL, got {base!r}", file=sys.stderr)
        return 2
    url = f"{base}/admin/friction/{urllib.parse.quote(args.account, safe='')}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    headers = {"Accept": "application/json"}
    token = os.environ.get(args.token_env)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT) as response:
            body = response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        print(f"gateway friction: {method} {url}: {exc.code} {detail}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"gateway friction: cannot reach the admin API at {base}: {exc}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(json.loads(body), indent=2, sort_keys=True))
    except ValueError:
        print(body)
    return 0


def _list(args: argparse.Namespace) -> int:
    return _admin_call(args, "GET", "", {})


def _clear(args: argparse.Namespace) -> int:
    query = {"by": args.by}
    if args.reason:
        query["reason"] = args.reason
    if args.rule:
        query["rule"] = args.rule
    return _admin_call(args, "DELETE", "/reverify" if args.reverify else "", query)


def add_solve_command(subparsers: Any) -> None:
    """Register ``solve`` on the CLI's ``add_subparsers()`` object; its handler is ``args.func``
    (returns the exit code)."""
    parser = subparsers.add_parser("solve", help="solve a Tollgate proof-of-work challenge",
                                   description="Solve a proof-of-work challenge from the command line.")
    parser.add_argument("challenge", help="a token, a WWW-Authenticate value, or '-' for JSON on stdin")
    parser.set_defaults(func=_run)


def add_friction_commands(subparsers: Any) -> None:
    """Register ``friction list|clear`` (clients of the admin API)."""
    friction = subparsers.add_parser("friction", help="list and clear an account's sticky friction",
                                     description="List and clear an account's sticky friction through "
                                                 "a running gateway's admin API; every clear is audited.")
    sub = friction.add_subparsers(dest="friction_command", required=True)
    listing = sub.add_parser("list", help="saved friction (why, since, expiry) and the history of clears")
    clear = sub.add_parser("clear", help="clear sticky friction (all, one rule, or reverification)")
    for parser in (listing, clear):
        parser.add_argument("account")
        parser.add_argument("--admin-url", help=f"the admin listener (default $TOLLGATE_ADMIN_URL or "
                                                f"{DEFAULT_ADMIN_URL})")
        parser.add_argument("--token-env", default="TOLLGATE_ADMIN_TOKEN",
                            help="environment variable holding the admin token")
    clear.add_argument("--by", required=True, help="who clears (recorded in the account's history)")
    clear.add_argument("--reason", help="why (recorded with it)")
    scope = clear.add_mutually_exclusive_group()
    scope.add_argument("--rule", help="clear only this rule's state")
    scope.add_argument("--reverify", action="store_true", help="clear pending reverification only")
    listing.set_defaults(func=_list)
    clear.set_defaults(func=_clear)
