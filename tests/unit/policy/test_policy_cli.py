"""``gateway policy check|test|explain``: --config, exit codes and unreadable input, in process."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest

from gateway.policy.cli import EXIT_INVALID, EXIT_OK, EXIT_TESTS_FAILED, add_policy_commands

SPEND = """version: 1
rules:
  - id: budget
    when: {field: principal.account, exists: true}
    quota:
      limits:
        - {name: usd, kind: spend, limit: 5, per: 1d}
"""
FAILING_TEST = """version: 1
rules:
  - {id: deny-cn, when: {field: client.country, equals: CN}, deny: true}
tests:
  - {name: wrong on purpose, client: {country: CN}, expect: {decision: allow}}
"""
PRICES = 'quota: {prices: {"*": {input: 1, output: 2}}}\n'


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="gateway")
    add_policy_commands(root.add_subparsers(dest="command", required=True))
    return root


def run(*argv: str) -> tuple[int, str, str]:
    args = parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out, err)
    return code, out.getvalue(), err.getvalue()


def policy_dir(tmp_path: Path, text: str) -> Path:
    directory = tmp_path / "pol"
    directory.mkdir()
    (directory / "p.yaml").write_text(text)
    return directory


def gateway_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text("mock_upstream: {enabled: true}\n" + extra)
    return path


def test_check_with_config_applies_the_gateways_settings(tmp_path: Path) -> None:
    """Without the price table the gateway refuses a spend limit; check must agree with it."""
    directory = policy_dir(tmp_path, SPEND)
    code, out, _ = run("policy", "check", str(directory))
    assert code == EXIT_OK
    assert ("checked without --config, so the checks that need the gateway's settings were skipped: "
            "spend limits need a price table (quota.prices)") in out
    code, _, err = run("policy", "check", str(directory), "--config", str(gateway_config(tmp_path)))
    assert code == EXIT_INVALID
    assert err.splitlines() == [
        "p.yaml:7:43: rules[0].quota.limits[0].limit: spend limits need a price table (quota.prices in the "
        "gateway config)",
        f"{directory}: invalid policy (1 error)",
    ]
    code, out, _ = run("policy", "check", str(directory), "--config", str(gateway_config(tmp_path, PRICES)))
    assert code == EXIT_OK and ": ok, 1 rules" in out and "without --config" not in out


def test_check_with_config_runs_the_tests_when_the_gateway_would(tmp_path: Path) -> None:
    directory = policy_dir(tmp_path, FAILING_TEST)
    assert run("policy", "check", str(directory))[0] == EXIT_OK  # tests are policy test's job
    code, out, _ = run("policy", "check", str(directory), "--config", str(gateway_config(tmp_path)))
    assert code == EXIT_TESTS_FAILED
    assert "decision: expected 'allow', got 'deny'" in out
    assert out.rstrip().endswith(f"{directory}: the policy tests fail, so the gateway would refuse this set "
                                 "(policies.run_tests_on_reload)")
    config = gateway_config(tmp_path, "policies: {dir: pol, run_tests_on_reload: false}\n")
    assert run("policy", "check", str(directory), "--config", str(config))[0] == EXIT_OK


def test_an_invalid_or_missing_config_is_exit_code_2(tmp_path: Path) -> None:
    directory = policy_dir(tmp_path, FAILING_TEST)
    code, _, err = run("policy", "test", str(directory), "--config", str(tmp_path / "nope.yaml"))
    assert code == EXIT_INVALID and "nope.yaml:1:1: cannot read config" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("mock_upstream: {enabled: true}\npolicies: {watch_interval: 10ms}\n")
    code, _, err = run("policy", "explain", str(directory), "--config", str(bad), "--request", str(bad))
    assert code == EXIT_INVALID and "bad.yaml:2:28: policies.watch_interval: expected an interval" in err


def test_test_and_explain_say_on_stderr_what_was_skipped(tmp_path: Path) -> None:
    directory = policy_dir(tmp_path, FAILING_TEST.replace("decision: allow", "decision: deny"))
    request = tmp_path / "req.yaml"
    request.write_text("client: {country: CN}\n")
    code, out, err = run("policy", "explain", str(directory), "--request", str(request), "--json")
    assert code == EXIT_OK and json.loads(out)["decision"] == "deny"  # stdout stays JSON
    assert err.startswith("note: checked without --config")
    config = str(gateway_config(tmp_path))
    code, out, err = run("policy", "test", str(directory), "--config", config)
    assert code == EXIT_OK and "1 passed, 0 failed" in out and err == ""


def test_explain_and_test_read_local_nat64_addresses_with_the_gateways_prefixes(tmp_path: Path) -> None:
    """A client behind a local NAT64 prefix is the IPv4 client it stands for, in explain and in the
    policy tests as at the gateway, but only with the gateway config that lists the prefix."""
    directory = policy_dir(tmp_path, """version: 1
rules:
  - {id: blocked-net, when: {field: client.ip, cidr: 203.0.113.0/24}, deny: true}
tests:
  - {name: local NAT64, client: {ip: "64:ff9b:1:cb00:71:700::"}, expect: {decision: deny}}
""")
    request = tmp_path / "req.yaml"
    request.write_text('client: {ip: "64:ff9b:1:cb00:71:700::"}\n')
    config = str(gateway_config(tmp_path, "client_ip: {nat64_prefixes: [64:ff9b:1::/48]}\n"))
    code, out, _ = run("policy", "explain", str(directory), "--config", config, "--request", str(request),
                       "--json")
    assert code == EXIT_OK and json.loads(out)["decision"] == "deny"
    code, out, _ = run("policy", "explain", str(directory), "--request", str(request), "--json")
    assert code == EXIT_OK and json.loads(out)["decision"] == "allow"
    assert run("policy", "test", str(directory), "--config", config)[0] == EXIT_OK
    assert run("policy", "test", str(directory))[0] == EXIT_TESTS_FAILED


def test_non_utf8_policy_and_request_files_name_file_line_and_column(tmp_path: Path) -> None:
    directory = policy_dir(tmp_path, "version: 1\n")
    request = tmp_path / "req.yaml"
    request.write_bytes(b"principal:\n  account: caf\xe9\n")
    code, _, err = run("policy", "explain", str(directory), "--request", str(request))
    assert code == EXIT_INVALID
    assert err.splitlines()[-1] == f"{request}:2:15: invalid UTF-8 (byte 0xe9), expected a UTF-8 text file"
    code, _, err = run("policy", "explain", str(directory), "--request", str(tmp_path / "missing.yaml"))
    assert code == EXIT_INVALID and "missing.yaml:1:1: cannot read file: No such file or directory" in err
    (directory / "p.yaml").write_bytes(b"version: 1\n# \xff\n")
    for command in ("check", "test"):
        code, _, err = run("policy", command, str(directory))
        assert code == EXIT_INVALID
        assert err == "p.yaml:2:3: invalid UTF-8 (byte 0xff), expected a UTF-8 text file\n"


def test_a_directory_without_policy_files_is_invalid(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("policies go here\n")
    code, out, err = run("policy", "check", str(tmp_path))
    assert (code, out) == (EXIT_INVALID, "")
    assert err.startswith(f"{tmp_path}:1:1: no policy files (*.yaml, *.yml), expected at least one")


def test_a_test_case_asn_outside_32_bits_is_invalid(tmp_path: Path) -> None:
    text = FAILING_TEST.replace("client: {country: CN}", "client: {asn: 4294967296}")
    code, _, err = run("policy", "test", str(policy_dir(tmp_path, text)))
    assert code == EXIT_INVALID
    assert ("p.yaml:5:44: tests[0].client.asn: 4294967296 is not an AS number, expected an integer from 0 "
            "to 4294967295") in err


@pytest.mark.parametrize("value", ["-1", "100.5", "nan", "lots"])
def test_min_coverage_is_a_percentage(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(["policy", "test", "pol", "--min-coverage", value])
    assert info.value.code == 2
    assert "argument --min-coverage: expected a percentage from 0 to 100" in capsys.readouterr().err
    assert parser().parse_args(["policy", "test", "pol", "--min-coverage", "100"]).min_coverage == 100.0
