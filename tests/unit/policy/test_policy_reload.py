"""Hot reload: swap on success, keep the old snapshot on failure, watcher trigger."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.policy.evaluate import evaluate
from gateway.policy.reload import PolicyHolder, PolicyTestsFailed
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
    assert await holder.reload() is True
    assert holder.current is not in_flight and holder.current.revision != in_flight.revision
    ctx = context_from_mapping({"client": {"country": "CN"}})
    assert evaluate(in_flight, ctx).decision == "deny"  # the old snapshot is untouched
    assert evaluate(holder.current, ctx).decision == "allow"
    assert holder.stats.ok == 1 and holder.last_error is None
    assert await holder.reload() is False and holder.stats.unchanged == 1


async def test_failed_reload_keeps_last_good_snapshot(tmp_path: Path) -> None:
    write(tmp_path, DENY_CN)
    holder = PolicyHolder.load(tmp_path)
    good = holder.current
    write(tmp_path, DENY_CN.replace("equals: CN", "equals: XX"))
    assert await holder.reload() is False
    assert holder.current is good and holder.stats.failed == 1
    assert holder.last_error is not None and "'XX' is not an ISO 3166-1 alpha-2" in holder.last_error
    # A set that compiles but fails its own tests must not go live either.
    write(tmp_path, DENY_CN.replace("decision: deny", "decision: allow"))
    assert await holder.reload() is False
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
