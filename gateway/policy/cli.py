"""``gateway policy check|test|explain``: the same validator and evaluator the server runs.

Exit codes: 0 ok, 1 policy tests failed (or coverage below ``--min-coverage``), 2 invalid
policy or request file.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from gateway.policy.compile import compile_sources, read_policy_dir
from gateway.policy.evaluate import Snapshot
from gateway.policy.explain import explain, format_explain
from gateway.policy.testing import format_report, load_request_file, run_tests
from gateway.yamlsource import ConfigError

EXIT_OK = 0
EXIT_TESTS_FAILED = 1
EXIT_INVALID = 2


def add_policy_commands(subparsers: Any) -> None:
    """Add ``policy {check,test,explain}`` to an argparse subparsers object.

    Each command sets ``func``: the caller runs ``sys.exit(args.func(args))``.
    """
    policy = subparsers.add_parser("policy", help="validate, test and explain policies")
    commands = policy.add_subparsers(dest="policy_command", required=True)
    check = commands.add_parser("check", help="validate a policy directory")
    check.add_argument("directory")
    check.set_defaults(func=run_check)
    test = commands.add_parser("test", help="run the policy tests and report rule coverage")
    test.add_argument("directory")
    test.add_argument("--min-coverage", type=float, default=0.0, metavar="PERCENT",
                      help="fail when fewer than PERCENT of the rules are exercised")
    test.set_defaults(func=run_test)
    exp = commands.add_parser("explain", help="show how the policies decide one request")
    exp.add_argument("directory")
    exp.add_argument("--request", required=True, metavar="REQ.yaml")
    exp.add_argument("--json", action="store_true", help="print the explanation as JSON")
    exp.set_defaults(func=run_explain)


def _compile(directory: str, err: TextIO) -> Snapshot | None:
    try:
        snapshot, issues = compile_sources(read_policy_dir(directory))
    except ConfigError as exc:
        print(exc, file=err)
        return None
    for issue in issues:
        print(issue, file=err)
    if snapshot is None:
        count = sum(1 for i in issues if i.severity == "error")
        print(f"{directory}: invalid policy ({count} error{'s' if count != 1 else ''})", file=err)
    return snapshot


def run_check(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    snapshot = _compile(args.directory, err)
    if snapshot is None:
        return EXIT_INVALID
    print(f"{args.directory}: ok, {len(snapshot.rules)} rules in {len(snapshot.files)} files, "
          f"{len(snapshot.tests)} tests, revision {snapshot.revision}", file=out)
    return EXIT_OK


def run_test(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    snapshot = _compile(args.directory, err)
    if snapshot is None:
        return EXIT_INVALID
    report = run_tests(snapshot)
    print(format_report(report), file=out)
    if report.failed:
        return EXIT_TESTS_FAILED
    if report.coverage < args.min_coverage:
        print(f"rule coverage {report.coverage:.1f}% is below --min-coverage {args.min_coverage:g}%",
              file=out)
        return EXIT_TESTS_FAILED
    return EXIT_OK


def run_explain(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    snapshot = _compile(args.directory, err)
    if snapshot is None:
        return EXIT_INVALID
    try:
        ctx = load_request_file(args.request)
    except (ConfigError, OSError) as exc:
        print(exc, file=err)
        return EXIT_INVALID
    report = explain(snapshot, ctx)
    print(json.dumps(report, indent=2) if args.json else format_explain(report), file=out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m gateway.policy.cli policy check DIR``)."""
    parser = argparse.ArgumentParser(prog="gateway")
    add_policy_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
