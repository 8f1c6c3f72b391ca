"""Bad-policy fixtures assert their exact error text; good ones compile clean and pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.policy.compile import Source, compile_sources, load_policy_dir, read_policy_dir
from gateway.policy.testing import run_tests
from gateway.yamlsource import ConfigError

ROOT = Path(__file__).resolve().parents[2] / "policies"
BAD_FILES = sorted((ROOT / "bad").glob("*.yaml"))
GOOD_FILES = sorted((ROOT / "good").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_fixture_reports_exact_messages(path: Path) -> None:
    text = path.read_text()
    expected = [
        line.removeprefix("# expect: ") for line in text.splitlines() if line.startswith("# expect: ")
    ]
    assert expected, f"{path.name} has no '# expect:' lines"
    _, issues = compile_sources([Source(path.name, text)])
    assert [str(i) for i in issues] == expected


def test_duplicate_rule_id_across_files() -> None:
    with pytest.raises(ConfigError) as info:
        load_policy_dir(ROOT / "bad" / "duplicate-rule-id")
    assert (
        str(info.value)
        == "b.yaml:3:5: rules[0].id: duplicate rule id 'block-cn', first defined at a.yaml:3:5"
    )


def test_every_error_is_reported_at_once() -> None:
    sources = [Source(p.name, p.read_text()) for p in BAD_FILES]
    _, issues = compile_sources(sources)
    expected = sum(
        1 for p in BAD_FILES for line in p.read_text().splitlines() if line.startswith("# expect: ")
    )
    # Fixtures compiled together also collide on the rule id r1, so there are more, never fewer.
    assert len(issues) >= expected


@pytest.mark.parametrize("path", GOOD_FILES, ids=lambda p: p.stem)
def test_good_fixture_compiles_without_warnings_and_passes(path: Path) -> None:
    snapshot, issues = compile_sources([Source(path.name, path.read_text())])
    assert snapshot is not None and issues == []
    report = run_tests(snapshot)
    assert report.results and not report.failed, [r.failures for r in report.failed]
    assert report.coverage == 100.0


def test_read_policy_dir_skips_hidden_and_non_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("version: 1\n")
    (tmp_path / ".a.yaml.swp").write_text("junk")
    (tmp_path / "notes.txt").write_text("junk")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yml").write_text("version: 1\n")
    assert [s.name for s in read_policy_dir(tmp_path)] == ["a.yaml", "sub/b.yml"]


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy directory not found"):
        read_policy_dir(tmp_path / "nope")


def test_a_case_without_time_runs_at_a_fixed_instant_not_the_clock() -> None:
    """Wednesday 2025-01-01 12:00 UTC, whenever the tests run: otherwise a time rule would make a
    policy's tests fail at one hour of the week (the all-operators fixture did, on Mondays 03:00)."""
    text = """version: 1
rules:
  - id: wednesday-noon
    when: {all: [{field: time.weekday, equals: 2}, {field: time.hour, equals: 12}]}
    tag: midweek
  - id: monday-3am
    when: {all: [{field: time.weekday, equals: 0}, {field: time.hour, equals: 3}]}
    tag: monday
tests:
  - name: no time given
    principal: {account: a}
    expect: {matched: [wednesday-noon], tags: [midweek]}
  - name: a time given
    principal: {account: a}
    time: 2025-03-03T03:15:00Z
    expect: {matched: [monday-3am], tags: [monday]}
"""
    snapshot, issues = compile_sources([Source("t.yaml", text)])
    assert snapshot is not None and issues == []
    report = run_tests(snapshot)
    assert len(report.results) == 2 and not report.failed, [r.failures for r in report.failed]
