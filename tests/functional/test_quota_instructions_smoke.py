"""bench/quota_instructions.py's measured process still runs against the current quota stage.

The benchmark itself runs each scenario under valgrind (minutes); here its child runs a few
hundred requests without it, so a change to the stage or bench/quota_stage.py that breaks the
harness fails in the suite instead of in the next benchmark session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.redis_servers import require_redis

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("scenario", ["noop", "memory-1", "memory-3"])
@pytest.mark.parametrize("keys", ["same", "random"])
def test_child_runs_a_scenario(scenario: str, keys: str) -> None:
    proc = subprocess.run([sys.executable, "bench/quota_instructions.py", "--child", scenario,
                           "--requests", "200", "--keys", keys],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("scenario", ["redis-3", "redis-3@ping", "redis-1@nosettle", "redis-3@noreconcile"])
def test_child_runs_a_redis_scenario(scenario: str) -> None:
    require_redis("redis-server")
    proc = subprocess.run([sys.executable, "bench/quota_instructions.py", "--child", scenario,
                           "--requests", "200"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_unknown_scenario_is_refused() -> None:
    proc = subprocess.run([sys.executable, "bench/quota_instructions.py", "--scenarios", "redis-9"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown scenarios ['redis-9']" in proc.stderr


def test_ablation_on_noop_is_refused() -> None:
    proc = subprocess.run([sys.executable, "bench/quota_instructions.py",
                           "--scenarios", "noop@ping,redis-3@bogus"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown scenarios ['noop@ping', 'redis-3@bogus']" in proc.stderr
