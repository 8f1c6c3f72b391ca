"""Builds the policy-driven stages and their backends from the settings, in pipeline order:

identity → client_ip → geo → match → quota → risk/friction (then forward, settle, audit).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.context import RequestContext
from gateway.metrics import Metrics
from gateway.pipeline import AuditSink, Stage
from gateway.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Features:
    """The optional parts of a gateway, started and stopped with it."""

    stages: list[Stage] = field(default_factory=list)
    audit_sink: AuditSink | None = None
    audit_builder: Callable[[RequestContext], dict[str, Any]] | None = None
    starters: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    stoppers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    status: dict[str, Callable[[], Any]] = field(default_factory=dict)
    # (method, path, handler, mutating) served on the admin listener.
    admin_routes: list[tuple[str, str, Callable[[Any], Awaitable[Any]], bool]] = field(default_factory=list)
    reloaders: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def start(self) -> None:
        for start in self.starters:
            await start()

    async def stop(self) -> None:
        for stop in reversed(self.stoppers):
            try:
                await stop()
            except Exception:  # keep stopping the rest; shutdown must complete
                log.exception("error while stopping a component")

    async def reload(self) -> None:
        """SIGHUP or an admin call: reload every hot-reloadable input (each keeps its last good state)."""
        for reload in self.reloaders:
            await reload()

    def readiness(self) -> dict[str, Any]:
        return {name: describe() for name, describe in self.status.items()}


def check_deployment(settings: Settings) -> None:
    """Refuse configurations that would silently misbehave (raises ConfigError)."""


def build_features(settings: Settings, metrics: Metrics) -> Features:
    return Features()
