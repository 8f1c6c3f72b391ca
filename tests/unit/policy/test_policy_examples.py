"""Every shipped policy under policies/ validates, compiles and passes its own tests; CLI codes."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from gateway.policy.cli import EXIT_INVALID, EXIT_OK, EXIT_TESTS_FAILED, add_policy_commands
from gateway.policy.compile import load_policy_dir
from gateway.policy.testing import run_tests

POLICIES = Path(__file__).resolve().parents[3] / "policies"
BAD = Path(__file__).resolve().parents[2] / "policies" / "bad"


def run(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="gateway")
    add_policy_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out, err)
    return code, out.getvalue(), err.getvalue()


def test_shipped_policies_validate_compile_and_pass_their_tests() -> None:
    snapshot = load_policy_dir(POLICIES)
    assert snapshot.warnings == ()
    assert snapshot.tests, "the examples ship with tests"
    report = run_tests(snapshot)
    assert not report.failed, [(r.case.name, r.failures) for r in report.failed]
    assert report.uncovered == []


def test_restricted_list_includes_cn_and_terms_regions() -> None:
    snapshot = load_policy_dir(POLICIES)
    restricted = set(snapshot.lists["restricted_countries"].values)
    assert {"CN", "HK", "MO", "RU", "IR", "KP", "SY", "CU"} <= restricted


def test_cli_check_ok_and_invalid(tmp_path: Path) -> None:
    code, out, _ = run("policy", "check", str(POLICIES))
    assert code == EXIT_OK and ": ok," in out
    (tmp_path / "p.yaml").write_text((BAD / "unknown-field.yaml").read_text())
    code, _, err = run("policy", "check", str(tmp_path))
    assert code == EXIT_INVALID
    assert (
        "p.yaml:5:19: rules[0].when.field: unknown field 'principal.teir'; did you mean 'principal.tier'?"
        in err
    )


def test_cli_test_failure_and_min_coverage(tmp_path: Path) -> None:
    code, out, _ = run("policy", "test", str(POLICIES), "--min-coverage", "100")
    assert code == EXIT_OK and "rule coverage: 100.0%" in out
    (tmp_path / "p.yaml").write_text(
        "version: 1\nrules:\n  - id: a\n    when: {field: client.country, equals: CN}\n    deny: true\n"
        "  - id: b\n    when: {field: client.country, equals: RU}\n    deny: true\n"
        "tests:\n  - name: wrong on purpose\n    client: {country: CN}\n    expect: {decision: allow}\n"
    )
    code, out, _ = run("policy", "test", str(tmp_path))
    assert code == EXIT_TESTS_FAILED and "decision: expected 'allow', got 'deny'" in out
    (tmp_path / "p.yaml").write_text(
        (tmp_path / "p.yaml").read_text().replace("decision: allow", "decision: deny")
    )
    code, out, _ = run("policy", "test", str(tmp_path), "--min-coverage", "60")
    assert code == EXIT_TESTS_FAILED and "rules never exercised: b" in out
    code, _, _ = run("policy", "test", str(tmp_path), "--min-coverage", "50")
    assert code == EXIT_OK


def test_cli_explain(tmp_path: Path) -> None:
    req = tmp_path / "req.yaml"
    req.write_text("request: {model: gpt-4o}\nprincipal: {account: a, tier: free}\nclient: {country: CN}\n")
    code, out, _ = run("policy", "explain", str(POLICIES), "--request", str(req))
    assert code == EXIT_OK
    assert "[      matched] region-restricted-ip" in out
    assert "failed: client.country exists false (value: 'CN')" in out
    assert "[not evaluated] tier-free-reasoning" in out
    assert out.strip().endswith(
        "decision: deny (403: This request is not permitted.) by rule 'region-restricted-ip'"
    )
    req.write_text("client: {country: ZZ}\n")
    code, _, err = run("policy", "explain", str(POLICIES), "--request", str(req))
    assert code == EXIT_INVALID and "'ZZ' is not an ISO 3166-1 alpha-2 country code" in err
