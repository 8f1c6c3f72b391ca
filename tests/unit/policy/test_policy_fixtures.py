"""Bad-policy fixtures assert their exact error text; good ones compile clean and pass."""

from __future__ import annotations

import os
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


@pytest.mark.parametrize("content", [{}, {"README.md": "notes", ".hidden.yaml": "version: 1\n"}],
                         ids=["empty", "no-yaml"])
def test_a_directory_without_policy_files_is_refused(tmp_path: Path, content: dict[str, str]) -> None:
    """An emptied directory must not go live as "allow everything"."""
    for name, text in content.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        read_policy_dir(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}:1:1: no policy files (*.yaml, *.yml), expected at least one; a set meant to allow "
        "every request says so in a file holding 'version: 1'"
    )
    _, issues = compile_sources([])
    assert [i.message for i in issues] == [str(info.value).split(":1:1: ", 1)[1]]


def test_a_file_holding_only_the_version_is_an_explicit_empty_set(tmp_path: Path) -> None:
    (tmp_path / "00-open.yaml").write_text("version: 1\n")
    assert load_policy_dir(tmp_path).rules == ()


def test_a_dangling_symlink_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text("version: 1\n")
    (tmp_path / "20-link.yaml").symlink_to(tmp_path / "moved-away.yaml")
    with pytest.raises(ConfigError) as info:
        read_policy_dir(tmp_path)
    assert str(info.value) == (
        "20-link.yaml:1:1: broken symbolic link (its target does not exist), expected a policy file"
    )


def test_a_symlink_loop_is_reported_as_a_loop_not_as_dangling(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_text("version: 1\n")
    (tmp_path / "20-ping.yaml").symlink_to("30-pong.yaml")  # a two-link cycle...
    (tmp_path / "30-pong.yaml").symlink_to("20-ping.yaml")
    (tmp_path / "40-self.yaml").symlink_to("40-self.yaml")  # ...and a link to itself
    (tmp_path / "50-gone.yaml").symlink_to("moved-away.yaml")  # a dangling one stays "broken"
    with pytest.raises(ConfigError) as info:
        load_policy_dir(tmp_path)
    assert str(info.value).splitlines() == [
        "20-ping.yaml:1:1: symbolic link loop (it points to '30-pong.yaml', which never resolves to a "
        "file), expected a policy file",
        "30-pong.yaml:1:1: symbolic link loop (it points to '20-ping.yaml', which never resolves to a "
        "file), expected a policy file",
        "40-self.yaml:1:1: symbolic link loop (it points to '40-self.yaml', which never resolves to a "
        "file), expected a policy file",
        "50-gone.yaml:1:1: broken symbolic link (its target does not exist), expected a policy file",
    ]


def test_a_looping_policy_directory_is_named_as_a_loop(tmp_path: Path) -> None:
    (tmp_path / "policies").symlink_to("policies")
    with pytest.raises(ConfigError) as info:
        read_policy_dir(tmp_path / "policies")
    assert str(info.value) == f"{tmp_path / 'policies'}:1:1: symbolic link loop, expected a directory"


def test_non_utf8_policy_file_names_file_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "10-a.yaml").write_bytes(
        b"version: 1\nrules:\n  - id: r\n    description: caf\xe9 rule\n    deny: true\n"
    )
    (tmp_path / "20-b.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as info:
        read_policy_dir(tmp_path)
    assert str(info.value).splitlines() == [
        "10-a.yaml:4:21: invalid UTF-8 (byte 0xe9), expected a UTF-8 text file",
        "20-b.yaml:1:1: invalid UTF-8 (byte 0xff), expected a UTF-8 text file",
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_policy_file_is_an_error_naming_it(tmp_path: Path) -> None:
    policy = tmp_path / "10-a.yaml"
    policy.write_text("version: 1\n")
    policy.chmod(0)
    with pytest.raises(ConfigError) as info:
        read_policy_dir(tmp_path)
    assert str(info.value) == "10-a.yaml:1:1: cannot read file: Permission denied, expected a readable file"


def test_a_fifo_is_not_read(tmp_path: Path) -> None:
    """Opening a FIFO would block the reload thread forever."""
    (tmp_path / "10-a.yaml").write_text("version: 1\n")
    os.mkfifo(tmp_path / "20-pipe.yaml")
    with pytest.raises(ConfigError, match=r"^20-pipe.yaml:1:1: not a regular file, expected a policy file$"):
        read_policy_dir(tmp_path)
