"""The live policy: a holder with one ``current`` snapshot, swapped atomically on reload.

Reload = read + validate + compile + run the policy tests, all in a worker thread, then one
reference assignment on the event loop. A failed reload keeps the previous snapshot serving,
counts the failure and exposes it as ``last_error``; requests already running keep the snapshot
they took (they hold a reference, the holder never mutates one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from gateway.policy.compile import compile_sources, read_policy_dir, revision_of
from gateway.policy.evaluate import Snapshot
from gateway.policy.registry import Registry
from gateway.policy.testing import TestReport, format_report, run_tests
from gateway.watch import FileWatcher
from gateway.yamlsource import ConfigError

log = logging.getLogger(__name__)


class ReloadOutcome(StrEnum):
    """What one reload did; the values are the ``result`` label of the reload metrics."""

    OK = "ok"  # a new revision went live
    UNCHANGED = "unchanged"  # the files hash to the serving revision: nothing to do
    FAILED = "failed"  # invalid, unreadable or failing its tests: the last good set keeps serving


class PolicyTestsFailed(Exception):
    """A policy set compiled but its own tests failed; it must not go live."""

    def __init__(self, report: TestReport) -> None:
        self.report = report
        super().__init__(format_report(report))


@dataclass(slots=True)
class ReloadStats:
    """Counters exposed on the admin status endpoint and as metrics."""

    ok: int = 0
    failed: int = 0
    unchanged: int = 0
    last_attempt: float | None = None
    last_success: float | None = None
    history: list[str] = field(default_factory=list)


def build_snapshot(directory: str | os.PathLike[str], registry: Registry | None = None,
                   settings: Any = None, run_policy_tests: bool = True,
                   previous: str | None = None) -> Snapshot | None:
    """Blocking: load, compile and test a policy set. None when its revision equals ``previous``.

    Raises :class:`ConfigError` (invalid) or :class:`PolicyTestsFailed` (its tests fail).
    """
    sources = read_policy_dir(directory)
    if previous is not None and revision_of(sources) == previous:
        return None
    snapshot, issues = compile_sources(sources, registry, settings)
    if snapshot is None:
        raise ConfigError([i for i in issues if i.severity == "error"])
    if run_policy_tests and snapshot.tests:
        report = run_tests(snapshot)
        if report.failed:
            raise PolicyTestsFailed(report)
    return snapshot


class PolicyHolder:
    """Owns the current policy snapshot of one process.

    Construct with :meth:`load` at start-up (raises on an invalid policy so the process exits
    non-zero), then call :meth:`start_watching` inside the running loop; wire SIGHUP and the
    admin reload endpoint to :meth:`reload`.
    """

    def __init__(self, directory: str | os.PathLike[str], snapshot: Snapshot, *,
                 registry: Registry | None = None, settings: Any = None,
                 run_policy_tests: bool = True, watch_interval: float = 1.0,
                 debounce: float = 0.5) -> None:
        if not watch_interval > 0:  # zero polls the directory in a busy loop; "not >" refuses nan too
            raise ValueError(f"watch_interval must be positive, got {watch_interval}")
        self.directory = Path(directory)
        self._current = snapshot
        self._registry = registry
        self._settings = settings
        self._run_tests = run_policy_tests
        self._interval = watch_interval
        self._debounce = debounce
        self._lock = asyncio.Lock()
        self._watcher: FileWatcher | None = None
        self.last_error: str | None = None
        self.last_outcome: ReloadOutcome | None = None
        self.stats = ReloadStats()

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, registry: Registry | None = None,
             settings: Any = None, run_policy_tests: bool = True, watch_interval: float = 1.0,
             debounce: float = 0.5) -> PolicyHolder:
        """Blocking initial load; raises ConfigError / PolicyTestsFailed."""
        snapshot = build_snapshot(directory, registry, settings, run_policy_tests)
        assert snapshot is not None
        for warning in snapshot.warnings:
            log.warning("policy: %s", warning)
        return cls(directory, snapshot, registry=registry, settings=settings,
                   run_policy_tests=run_policy_tests, watch_interval=watch_interval, debounce=debounce)

    @property
    def current(self) -> Snapshot:
        """The snapshot to use for a request that starts now; take it once per request."""
        return self._current

    @property
    def revision(self) -> str:
        return self._current.revision

    async def reload(self) -> ReloadOutcome:
        """Rebuild from disk off the event loop; whichever trigger asked, the outcome is counted
        (``stats``) and kept as ``last_outcome``."""
        async with self._lock:  # concurrent triggers (watcher + SIGHUP) must not race the swap
            outcome = await self._reload_locked()
            self.last_outcome = outcome
            return outcome

    async def _reload_locked(self) -> ReloadOutcome:
        self.stats.last_attempt = time.time()
        try:
            snapshot = await asyncio.to_thread(
                build_snapshot, self.directory, self._registry, self._settings,
                self._run_tests, self._current.revision,
            )
        except (ConfigError, PolicyTestsFailed, OSError) as exc:
            self.stats.failed += 1
            self.last_error = str(exc)
            log.error("policy reload failed, keeping revision %s:\n%s", self._current.revision, exc)
            return ReloadOutcome.FAILED
        self.last_error = None
        if snapshot is None:
            self.stats.unchanged += 1
            return ReloadOutcome.UNCHANGED
        old, self._current = self._current.revision, snapshot
        self.stats.ok += 1
        self.stats.last_success = time.time()
        self.stats.history = [*self.stats.history[-9:], snapshot.revision]
        log.info("policy reloaded: revision %s -> %s (%d rules)", old, snapshot.revision,
                 len(snapshot.rules))
        return ReloadOutcome.OK

    def start_watching(self) -> None:
        """Reload when files under the policy directory change (polling, debounced)."""
        if self._watcher is None:
            self._watcher = FileWatcher([self.directory], self._on_change, self._interval, self._debounce)
            self._watcher.start()

    async def _on_change(self) -> None:
        await self.reload()

    async def stop(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None

    def status(self) -> dict[str, Any]:
        """For the admin status endpoint; a failed reload never makes readiness red."""
        snap = self._current
        return {
            "revision": snap.revision, "rules": len(snap.rules), "files": list(snap.files),
            "reloads_ok": self.stats.ok, "reloads_failed": self.stats.failed,
            "reloads_unchanged": self.stats.unchanged, "last_attempt": self.stats.last_attempt,
            "last_success": self.stats.last_success, "last_error": self.last_error,
            "last_result": self.last_outcome.value if self.last_outcome else None,
            "warnings": [str(w) for w in snap.warnings],
        }
