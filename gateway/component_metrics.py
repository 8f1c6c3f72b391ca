"""Prometheus views of the components' own counters, read at scrape time (nothing on the hot path).

Each component keeps plain counters (store fallbacks, policy reloads, GeoIP databases, JWT key
sets, risk store errors); this collector turns them into metric families when ``/metrics`` is
scraped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(slots=True, eq=False)  # identity-hashed: the registry keys collectors by object
class ComponentCollector(Collector):
    """Collects from the callables registered by the wiring (each returns its component's stats)."""

    store: Callable[[], Any] | None = None  # gateway.store.breaker.StoreStats
    policy: Callable[[], Any] | None = None  # gateway.policy.reload.PolicyHolder
    geo: Callable[[], Any] | None = None  # -> tuple[GeoDatabaseInfo, ...]
    jwks: Callable[[], Mapping[str, Any]] | None = None  # -> {issuer: gateway.identity.jwks.KeySource}
    extra: dict[str, Callable[[], float]] = field(default_factory=dict)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.store is not None:
            yield from _store(self.store())
        if self.policy is not None:
            yield from _policy(self.policy())
        if self.geo is not None:
            yield from _geo(self.geo())
        if self.jwks is not None:
            yield from _jwks(self.jwks())
        for name, read in self.extra.items():
            yield CounterMetricFamily(f"tollgate_{name}", f"Component counter {name}.", value=read())


def _store(stats: Any) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    calls = CounterMetricFamily("tollgate_store_calls", "Quota store calls.", value=stats.calls)
    errors = CounterMetricFamily("tollgate_store_errors", "Quota store calls that failed or timed out.",
                                 value=stats.errors)
    fallbacks = CounterMetricFamily("tollgate_store_fallbacks",
                                    "Requests decided by a rule's store-failure mode.", labels=["mode"])
    for mode, count in stats.fallbacks.items():
        fallbacks.add_metric([mode], count)
    state = GaugeMetricFamily("tollgate_store_breaker_open", "1 while the store circuit breaker is open.",
                              value=0.0 if stats.breaker_state.value == "closed" else 1.0)
    settle = CounterMetricFamily("tollgate_store_settle_failures",
                                 "Reconciliations or lease releases that could not reach the store.",
                                 value=stats.settle_failures)
    leases = CounterMetricFamily("tollgate_store_lease_renewal_rounds",
                                 "Lease renewal rounds the store answered.", value=stats.lease_renewals)
    renew_failed = CounterMetricFamily("tollgate_store_renew_failures",
                                       "Lease renewal rounds that could not reach the store.",
                                       value=stats.renew_failures)
    lost = CounterMetricFamily("tollgate_store_leases_lost",
                               "Leases that expired while their request still ran (store outage).",
                               value=stats.leases_lost)
    yield from (calls, errors, fallbacks, state, settle, leases, renew_failed, lost)


def _policy(holder: Any) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    stats = holder.stats
    reloads = CounterMetricFamily(
        "tollgate_policy_reloads", "Policy reload attempts from any trigger (file watcher, SIGHUP, admin "
        "call) by result: ok (a new revision went live), unchanged (the files hash to the serving "
        "revision), failed (refused; the last good set keeps serving).", labels=["result"])
    for result in ("ok", "failed", "unchanged"):
        reloads.add_metric([result], getattr(stats, result))
    info = GaugeMetricFamily("tollgate_policy_revision", "The policy revision serving now (value 1).",
                             labels=["revision"])
    info.add_metric([holder.revision], 1.0)
    rules = GaugeMetricFamily("tollgate_policy_rules", "Rules in the serving policy set.",
                              value=len(holder.current.rules))
    failing = GaugeMetricFamily("tollgate_policy_last_reload_failed",
                                "1 when the last reload was refused (the previous set keeps serving).",
                                value=1.0 if holder.last_error else 0.0)
    yield from (reloads, info, rules, failing)


def _geo(databases: Any) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    build = GaugeMetricFamily("tollgate_geoip_build_timestamp_seconds",
                              "Build time of each loaded GeoIP database.", labels=["role", "database_type"])
    errors = GaugeMetricFamily("tollgate_geoip_reload_errors", "Failed reloads of each GeoIP database.",
                               labels=["role"])
    lookup_errors = CounterMetricFamily("tollgate_geoip_lookup_errors",
                                        "Lookups that failed on a damaged GeoIP database (answered as "
                                        "unknown), by database role.", labels=["role"])
    failing = GaugeMetricFamily("tollgate_geoip_lookups_failing",
                                "1 while a database's lookups are failing (readiness fails meanwhile).",
                                labels=["role"])
    for db in databases:
        build.add_metric([db.role, db.database_type or ""], float(db.build_epoch or 0))
        errors.add_metric([db.role], float(db.reload_errors))
        lookup_errors.add_metric([db.role], float(db.lookup_errors))
        failing.add_metric([db.role], 1.0 if db.lookups_failing else 0.0)
    yield from (build, errors, lookup_errors, failing)


def _jwks(sources: Mapping[str, Any]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    age = GaugeMetricFamily("tollgate_jwks_age_seconds",
                            "Seconds since each JWT issuer's key set was last fetched successfully "
                            "(+Inf: never).", labels=["issuer"])
    stale_in = GaugeMetricFamily("tollgate_jwks_stale_in_seconds",
                                 "Seconds each JWT issuer's last good key set stays usable "
                                 "(jwks_max_stale after its fetch); 0: stale, its tokens are refused.",
                                 labels=["issuer"])
    failures = CounterMetricFamily("tollgate_jwks_fetch_failures",
                                   "Failed fetches of each JWT issuer's key set (the last good keys "
                                   "kept).", labels=["issuer"])
    for issuer, source in sources.items():
        fresh = source.freshness()
        age.add_metric([issuer], math.inf if fresh.age is None else fresh.age)
        stale_in.add_metric([issuer], fresh.stale_in)
        failures.add_metric([issuer], float(source.failures))
    yield from (age, stale_in, failures)
