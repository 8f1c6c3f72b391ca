"""``gateway solve``: solve a proof-of-work challenge from the command line.

    gateway solve 'v1.1767225600.16.abc.def'            # a bare token
    gateway solve 'Tollgate-PoW challenge="...", difficulty=16, ...'
    curl ... | gateway solve -                           # an error body (JSON) on stdin

Prints the value for the ``x-tollgate-solution`` header.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


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


def add_solve_command(subparsers: Any) -> None:
    """Register ``solve`` on the CLI's ``add_subparsers()`` object; the handler is ``args.func``
    (returns the exit code)."""
    parser = subparsers.add_parser("solve", help="solve a Tollgate proof-of-work challenge",
                                   description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("challenge", help="a token, a WWW-Authenticate value, or '-' for JSON on stdin")
    parser.set_defaults(func=_run)
