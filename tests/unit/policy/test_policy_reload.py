"""Hot reload: swap on success, keep the old snapshot on failure, watcher trigger."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.policy.evaluate import evaluate
from gateway.policy.reload import PolicyHolder, PolicyTestsFailed, ReloadOutcome
from gateway.policy.testing import context_from_mapping
from gateway.yamlsource import ConfigError

DENY_CN = """version: 1
rules:
  - id: deny-cn
    when: {field: client.country, equals: CN}
    deny: true
tests:
  - {name: cn, client: {country: CN}, expect: {decision: deny}}
"""


def write(directory: Path, text: str) -> None:
    (directory / "p.yaml").write_text(text)


async def test_reload_swaps_and_keeps_in_flight_snapshot(tmp_path: Path) -> None:
    write(tmp_path, DENY_CN)
    holder = PolicyHolder.load(tmp_path)
    in_flight = holder.current
    write(tmp_path, DENY_CN.replace("CN", "RU"))
    assert await holder.reload() is ReloadOutcome.OK and holder.last_outcome is ReloadOutcome.OK
    assert holder.current is not in_flight and holder.current.revision != in_flight.revision
    ctx = context_from_mapping({"client": {"country": "CN"}})
    assert evaluate(in_flight, ctx).decision == "deny"  # the old snapshot is untouched
    assert evaluate(holder.current, ctx).decision == "allow"
    assert holder.stats.ok == 1 and holder.last_error is None
    assert await holder.reload() is ReloadOutcome.UNCHANGED and holder.stats.unchanged == 1


async def test_failed_reload_keeps_last_good_snapshot(tmp_path: Path) -> None:
    write(tmp_path, DENY_CN)
    holder = PolicyHolder.load(tmp_path)
    good = holder.current
    write(tmp_path, DENY_CN.replace("equals: CN", "equals: XX"))
    assert await holder.reload() is ReloadOutcome.FAILED
    assert holder.current is good and holder.stats.failed == 1
    assert holder.last_error is not None and "'XX' is not an ISO 3166-1 alpha-2" in holder.last_error
    # A set that compiles but fails its own tests must not go live either.
    write(tmp_path, DENY_CN.replace("decision: deny", "decision: allow"))
    assert await holder.reload() is ReloadOutcome.FAILED
    assert holder.current is good and "decision: expected 'allow', got 'deny'" in (holder.last_error or "")
    status = holder.status()
    assert status["reloads_failed"] == 2 and status["revision"] == good.revision


def test_start_up_with_invalid_policy_raises(tmp_path: Path) -> None:
    write(tmp_path, "version: 1\nrules: [{id: a}]\n")
    with pytest.raises(ConfigError, match="rule has no action"):
        PolicyHolder.load(tmp_path)
    write(tmp_path, DENY_CN.replace("decision: deny", "decision: allow"))
    with pytest.raises(PolicyTestsFailed):
        PolicyHolder.load(tmp_path)


async def test_watcher_reloads_after_file_change(tmp_path: Path) -> None:
    write(tmp_path, DENY_CN)
    holder = PolicyHolder.load(tmp_path, watch_interval=0.02, debounce=0.02)
    first = holder.current.revision
    holder.start_watching()
    try:
        await asyncio.sleep(0.05)
        write(tmp_path, DENY_CN.replace("CN", "KP"))
        for _ in range(200):
            if holder.current.revision != first:
                break
            await asyncio.sleep(0.01)
        assert holder.current.revision != first
    finally:
        await holder.stop()


async def test_emptying_the_directory_keeps_the_last_good_revision(tmp_path: Path) -> None:
    """An emptied or half-synced directory would otherwise go live as "allow everything"."""
    write(tmp_path, DENY_CN)
    holder = PolicyHolder.load(tmp_path)
    good = holder.current
    (tmp_path / "p.yaml").unlink()
    assert await holder.reload() is ReloadOutcome.FAILED
    assert holder.current is good and holder.stats.failed == 1
    assert holder.last_error is not None and holder.last_error.startswith(f"{tmp_path}:1:1: no policy files")
    assert holder.status()["last_result"] == "failed"
    ctx = context_from_mapping({"client": {"country": "CN"}})
    assert evaluate(holder.current, ctx).decision == "deny"
    write(tmp_path, DENY_CN)  # the same files back: nothing to swap, and the error is cleared
    assert await holder.reload() is ReloadOutcome.UNCHANGED and holder.last_error is None


async def test_a_non_utf8_file_fails_the_reload_with_its_position(tmp_path: Path) -> None:
    write(tmp_path, DENY_CN)
    holder = PolicyHolder.load(tmp_path)
    (tmp_path / "p.yaml").write_bytes(DENY_CN.encode().replace(b"deny-cn", b"deny-\xe7n"))
    assert await holder.reload() is ReloadOutcome.FAILED
    assert holder.last_error == "p.yaml:3:14: invalid UTF-8 (byte 0xe7), expected a UTF-8 text file"


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_a_watch_interval_that_would_busy_loop_is_refused(tmp_path: Path, interval: float) -> None:
    write(tmp_path, DENY_CN)
    with pytest.raises(ValueError, match="watch_interval must be positive"):
        PolicyHolder.load(tmp_path, watch_interval=interval)


async def test_every_trigger_counts_its_outcome(tmp_path: Path) -> None:
    """Direct calls (SIGHUP, admin) and the file watcher are all counted in ``stats`` (what
    tollgate_policy_reloads_total exports)."""
    write(tmp_path, DENY_CN)
    holder = PolicyHolder.load(tmp_path, watch_interval=0.02, debounce=0.02)
    assert await holder.reload() is ReloadOutcome.UNCHANGED
    write(tmp_path, "version: 1\nrules: [{id: a}]\n")
    assert await holder.reload() is ReloadOutcome.FAILED
    assert (holder.stats.unchanged, holder.stats.failed, holder.stats.ok) == (1, 1, 0)
    holder.start_watching()
    try:
        await asyncio.sleep(0.05)  # let the watcher take its first look before the change
        write(tmp_path, DENY_CN.replace("CN", "KP"))
        for _ in range(300):
            if holder.stats.ok:
                break
            await asyncio.sleep(0.01)
    finally:
        await holder.stop()
    assert holder.stats.ok == 1 and holder.last_outcome is ReloadOutcome.OK
