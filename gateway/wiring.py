"""Builds the policy-driven stages and their backends from the settings, in pipeline order:

identity → client_ip → geo → match → quota → risk/friction (then forward, settle, audit).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.component_metrics import ComponentCollector
from gateway.context import RequestContext
from gateway.metrics import Metrics
from gateway.pipeline import AuditSink, Stage
from gateway.settings import Settings
from gateway.yamlsource import ConfigError, Issue, Mark

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
    # name → why that component keeps the gateway out of rotation now (None: it does not).
    not_ready: dict[str, Callable[[], str | None]] = field(default_factory=dict)
    # (method, path, handler, mutating) served on the admin listener.
    admin_routes: list[tuple[str, str, Callable[[Any], Awaitable[Any]], bool]] = field(default_factory=list)
    reloaders: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    policy: Any = None  # the PolicyHolder, when policies are configured
    collector: ComponentCollector = field(default_factory=ComponentCollector)
    store: Any = None  # the shared-state Store (memory or Redis)
    signals: Any = None  # the risk SignalStore (memory or Redis)

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

    def not_ready_reasons(self) -> dict[str, str]:
        """The components failing readiness now, each with its reason (empty when all are ready)."""
        reasons = {name: check() for name, check in self.not_ready.items()}
        return {name: reason for name, reason in reasons.items() if reason is not None}


def check_deployment(settings: Settings) -> None:
    """Refuse configurations that would silently misbehave (raises ConfigError)."""
    from gateway.quota import check_workers

    problems: list[str] = []
    if settings.quota is not None:
        message = check_workers(settings.quota, settings.workers)
        if message:
            problems.append(message)
    risk = settings.sections.get("risk")
    if settings.workers > 1 and risk is not None and risk.enabled and risk.store.backend == "memory":
        problems.append(f"--workers {settings.workers} with risk.store.backend: memory would give each "
                        "worker its own risk signals and challenge replay set; configure "
                        "risk.store.backend: redis")
    if settings.workers > 1 and risk is not None and risk.enabled and not risk.challenge.secret:
        problems.append(f"--workers {settings.workers} needs a shared proof-of-work secret: set the "
                        "variable named by risk.challenge.secret_env (default TOLLGATE_CHALLENGE_SECRET)")
    issues = [Issue(Mark(settings.source, 1, 1), "workers", p) for p in problems]
    # Log files are checked here too, before any worker starts, so N workers do not each print it.
    issues += _unwritable_log_files(settings)
    if issues:
        raise ConfigError(issues)


def _unwritable_log_files(settings: Settings) -> list[Issue]:
    """An issue naming each log file that cannot be opened for appending."""
    issues: list[Issue] = []
    for key in ("access_log", "audit_log"):
        path = getattr(settings.logging, key)
        if path in (None, "-"):
            continue
        try:
            with open(path, "ab"):
                pass
        except OSError as exc:
            issues.append(_unwritable_log(settings, key, path, exc))
    return issues


def _unwritable_log(settings: Settings, key: str, path: str, exc: OSError) -> Issue:
    from gateway.logfile import unwritable

    mark = settings.logging.marks.get(key) or Mark(settings.source, 1, 1)
    return Issue(mark, f"logging.{key}", unwritable(path, exc))


def _add_logs(features: Features, settings: Settings, metrics: Metrics) -> None:
    """The audit sink, and a check that both log files can be opened for appending: a gateway
    that cannot write its trail refuses to start (ConfigError naming the setting and its line)
    rather than serve while silently dropping records. Blocking: runs off the event loop."""
    from gateway.audit import JsonlFileSink, StdoutSink, build_audit_record

    if issues := _unwritable_log_files(settings):  # the access log is opened when the app starts
        raise ConfigError(issues)
    target = settings.logging.audit_log
    if target is None:
        return
    sink: JsonlFileSink | StdoutSink
    if target == "-":
        sink = StdoutSink()
    else:
        sink = JsonlFileSink(target)
        try:
            sink.open()
        except OSError as exc:
            raise ConfigError([_unwritable_log(settings, "audit_log", target, exc)]) from exc
    sink.losses.bind(metrics.lost_records("audit"))
    features.reloaders.append(sink.reopen)  # log rotation: reopen the file on SIGHUP / admin reload
    features.audit_sink = sink
    features.audit_builder = build_audit_record
    features.stoppers.insert(0, sink.close)


def _add_identity(features: Features, settings: Settings) -> None:
    from gateway.geo.base import lookups_failing
    from gateway.geo.config import GeoIpConfig
    from gateway.geo.maxmind import MaxMindGeoProvider
    from gateway.identity.config import IdentityConfig
    from gateway.identity.service import IdentityService
    from gateway.stages.client_ip import ClientIpConfig, ClientIpStage
    from gateway.stages.geo import GeoStage

    # Where a request comes from is resolved before who it claims to be, so that a refused
    # credential (brute force, stuffing) is audited with the client's address and country.
    client_ip_cfg = settings.sections.get("client_ip") or ClientIpConfig()
    features.stages.append(ClientIpStage.from_config(client_ip_cfg))

    geo_cfg = settings.sections.get("geoip") or GeoIpConfig()
    if geo_cfg.enabled:
        geo = MaxMindGeoProvider(geo_cfg)
        features.stages.append(GeoStage(geo))
        features.starters.append(geo.start)
        features.stoppers.append(geo.close)
        features.reloaders.append(geo.reload)
        features.status["geoip"] = lambda: [dataclasses.asdict(i) for i in geo.databases()]
        # A database failing lookups answers "unknown" to region rules: out of rotation (and
        # alerted on) until its file is replaced or a minute passes without an error.
        features.not_ready["geoip"] = lambda: lookups_failing(geo)
        features.collector.geo = geo.databases

    identity_cfg = settings.sections.get("identity") or IdentityConfig()
    identity = IdentityService(identity_cfg)
    features.stages.append(identity.stage)
    features.starters.append(identity.start)
    features.stoppers.append(identity.close)
    features.reloaders.append(identity.reload)
    features.status["identity"] = identity.status
    if identity.jwt is not None:
        features.collector.jwks = identity.jwt.sources


def _add_policy(features: Features, settings: Settings) -> None:
    from gateway.policy.builtin_actions import default_registry
    from gateway.policy.reload import PolicyHolder
    from gateway.stages.match import MatchStage

    directory = settings.policies.dir
    if directory is None:
        return
    holder = PolicyHolder.load(directory, registry=default_registry(), settings=settings,
                               run_policy_tests=settings.policies.run_tests_on_reload,
                               watch_interval=settings.policies.watch_interval)
    features.stages.append(MatchStage(holder))
    features.policy = holder
    features.collector.policy = lambda: holder

    async def start() -> None:
        if settings.policies.watch:
            holder.start_watching()

    async def reload() -> None:
        await holder.reload()

    features.starters.append(start)
    features.stoppers.append(holder.stop)
    features.reloaders.append(reload)
    features.status["policy"] = holder.status


def _add_risk(features: Features, settings: Settings) -> None:
    """Before the policy match: conditions read ``risk.*``."""
    from gateway.risk.behind import BehindSignalStore
    from gateway.risk.settings import RiskSettings
    from gateway.stages.risk import RiskStage, create_signal_store

    risk_settings = settings.sections.get("risk") or RiskSettings()
    if not risk_settings.enabled:
        return
    signals = create_signal_store(risk_settings.store)
    stage = RiskStage(risk_settings, signals)
    features.stages.append(stage)
    features.signals = signals
    features.stoppers.append(stage.close)
    features.status["risk"] = stage.status
    features.collector.extra["risk_store_errors"] = lambda: float(stage.store_errors)
    if isinstance(signals, BehindSignalStore):  # Redis in behind mode: its queued writes
        behind = signals
        features.collector.extra["risk_signal_flushes"] = lambda: float(behind.flushes)
        features.collector.extra["risk_signal_flush_errors"] = lambda: float(behind.flush_errors)
        features.collector.extra["risk_signal_local_batches"] = lambda: float(behind.local_batches)


def _add_friction(features: Features, settings: Settings) -> None:
    """After quota: friction decided by the policy (challenges, degrade, tarpit, caps)."""
    from gateway.friction.state import friction_admin_routes
    from gateway.risk.settings import RiskSettings
    from gateway.stages.friction import FrictionStage

    if features.signals is None or features.store is None:
        return
    risk_settings = settings.sections.get("risk") or RiskSettings()
    stage = FrictionStage(features.signals, features.store, risk_settings.challenge)
    features.stages.append(stage)
    features.admin_routes.extend(friction_admin_routes(stage.state))


def _add_quota(features: Features, settings: Settings) -> None:
    from gateway.quota import QuotaSettings, QuotaStage, create_store

    quota_settings = settings.quota or QuotaSettings()
    store = create_store(quota_settings)
    stage = QuotaStage(store, quota_settings)
    features.stages.append(stage)
    features.store = store
    features.stoppers.append(stage.guard.close)
    features.collector.store = lambda: stage.guard.stats

    def status() -> dict[str, Any]:
        detail: dict[str, Any] = {"backend": quota_settings.backend, **stage.guard.stats.snapshot()}
        extra = getattr(store, "stats", None)
        if extra is not None:
            detail["redis"] = dataclasses.asdict(extra)
        if routes is not None:  # a Cluster: script calls on lean connections, a cold primary's via redis-py
            detail["redis"]["cluster"] = {"cold_nodes": routes.cold_nodes, "redirects": routes.redirects,
                                          "connections": routes.connections,
                                          "client_calls": routes.client_calls}
        return detail

    routes = getattr(store, "routes", None)
    if routes is not None:
        features.collector.extra["store_cluster_redirects"] = lambda: float(routes.redirects)
    redis_stats = getattr(store, "stats", None)
    if redis_stats is not None:  # charges given up on that Redis ran after all (gateway/store/redis.py)
        extra = features.collector.extra
        extra["store_abandoned_charges_refunded"] = lambda: float(redis_stats.abandoned_refunds)
        extra["store_abandoned_charges_unknown"] = lambda: float(redis_stats.abandoned_unknown)
    features.status["quota"] = status


def build_features(settings: Settings, metrics: Metrics) -> Features:
    """Raises ConfigError (or PolicyTestsFailed) when a feature's inputs are invalid."""
    features = Features()
    metrics.registry.register(features.collector)
    _add_identity(features, settings)
    _add_risk(features, settings)
    _add_policy(features, settings)
    _add_quota(features, settings)
    _add_friction(features, settings)
    _add_logs(features, settings, metrics)
    return features
