"""``gateway policy check|test|explain``: the same validator and evaluator the server runs.

Exit codes: 0 ok, 1 policy tests failed (or coverage below ``--min-coverage``), 2 invalid
policy, gateway config or request file. ``--config`` checks with the gateway's own settings, so
``check --config`` accepts exactly what start-up and reload accept.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

from gateway.policy.builtin_actions import default_registry
from gateway.policy.compile import compile_sources, read_policy_dir
from gateway.policy.evaluate import Snapshot
from gateway.policy.explain import explain, format_explain
from gateway.policy.testing import format_report, load_request_file, run_tests
from gateway.settings import Settings, load_settings
from gateway.stages.client_ip import nat64_of
from gateway.yamlsource import ConfigError

EXIT_OK = 0
EXIT_TESTS_FAILED = 1
EXIT_INVALID = 2


# What a policy check cannot know without the gateway's config: keep in step with what consults
# CompileEnv.settings (quota spend limits; IP operands and test-case addresses, which decode the
# local NAT64 prefixes).
SETTINGS_CHECKS = ("spend limits need a price table (quota.prices), and addresses in local NAT64 prefixes "
                   "are read as IPv4 only with client_ip.nat64_prefixes")
WITHOUT_CONFIG = (f"note: checked without --config, so the checks that need the gateway's settings were "
                  f"skipped: {SETTINGS_CHECKS}")


def percent(text: str) -> float:
    """argparse type for ``--min-coverage``: a percentage from 0 to 100."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {text!r}") from None
    if not 0 <= value <= 100:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a percentage from 0 to 100, got {text}")
    return value


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="GATEWAY.yaml",
                        help="the gateway config: validate with its settings, exactly as start-up and "
                             f"reload do ({SETTINGS_CHECKS})")


def add_policy_commands(subparsers: Any) -> None:
    """Add ``policy {check,test,explain}`` to an argparse subparsers object.

    Each command sets ``func``: the caller runs ``sys.exit(args.func(args))``.
    """
    policy = subparsers.add_parser("policy", help="validate, test and explain policies")
    commands = policy.add_subparsers(dest="policy_command", required=True)
    check = commands.add_parser("check", help="validate a policy directory as the gateway would")
    check.add_argument("directory")
    _add_config(check)
    check.set_defaults(func=run_check)
    test = commands.add_parser("test", help="run the policy tests and report rule coverage")
    test.add_argument("directory")
    _add_config(test)
    test.add_argument("--min-coverage", type=percent, default=0.0, metavar="PERCENT",
                      help="fail when fewer than PERCENT (0-100) of the rules are exercised")
    test.set_defaults(func=run_test)
    exp = commands.add_parser("explain", help="show how the policies decide one request")
    exp.add_argument("directory")
    _add_config(exp)
    exp.add_argument("--request", required=True, metavar="REQ.yaml")
    exp.add_argument("--json", action="store_true", help="print the explanation as JSON")
    exp.set_defaults(func=run_explain)


@dataclass(frozen=True, slots=True)
class Compiled:
    """A valid policy set and the gateway settings it was checked with (None: no --config)."""

    snapshot: Snapshot
    settings: Settings | None


def _compile(args: argparse.Namespace, err: TextIO) -> Compiled | None:
    settings: Settings | None = None
    try:
        if args.config is not None:
            settings = load_settings(args.config)
        snapshot, issues = compile_sources(read_policy_dir(args.directory), default_registry(), settings)
    except ConfigError as exc:
        print(exc, file=err)
        return None
    for issue in issues:
        print(issue, file=err)
    if snapshot is None:
        count = sum(1 for i in issues if i.severity == "error")
        print(f"{args.directory}: invalid policy ({count} error{'s' if count != 1 else ''})", file=err)
        return None
    return Compiled(snapshot, settings)


def run_check(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Valid exactly when the gateway would accept the set: with ``--config`` that includes its
    settings and, when ``policies.run_tests_on_reload`` is on, the set's own tests."""
    out, err = out or sys.stdout, err or sys.stderr
    compiled = _compile(args, err)
    if compiled is None:
        return EXIT_INVALID
    snapshot, settings = compiled.snapshot, compiled.settings
    if settings is not None and settings.policies.run_tests_on_reload and snapshot.tests:
        report = run_tests(snapshot)
        if report.failed:
            print(format_report(report), file=out)
            print(f"{args.directory}: the policy tests fail, so the gateway would refuse this set "
                  "(policies.run_tests_on_reload)", file=out)
            return EXIT_TESTS_FAILED
    print(f"{args.directory}: ok, {len(snapshot.rules)} rules in {len(snapshot.files)} files, "
          f"{len(snapshot.tests)} tests, revision {snapshot.revision}", file=out)
    if settings is None:
        print(WITHOUT_CONFIG + "; the gateway also refuses a set whose tests fail (gateway policy test)",
              file=out)
    return EXIT_OK


def run_test(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    compiled = _compile(args, err)
    if compiled is None:
        return EXIT_INVALID
    if compiled.settings is None:
        print(WITHOUT_CONFIG, file=err)
    report = run_tests(compiled.snapshot)
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
    compiled = _compile(args, err)
    if compiled is None:
        return EXIT_INVALID
    if compiled.settings is None:
        print(WITHOUT_CONFIG, file=err)  # stderr: --json output stays parseable
    try:
        ctx = load_request_file(args.request, nat64_of(compiled.settings))
    except ConfigError as exc:
        print(exc, file=err)
        return EXIT_INVALID
    report = explain(compiled.snapshot, ctx)
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
