"""Prometheus metrics, held in one registry per gateway instance (no global state).

The per-request series (requests, latency, upstream time to first byte, tokens, decisions,
active streams) are plain integers and lists updated on the event loop and turned into metric
families only when scraped: ``prometheus_client``'s own Counter and Histogram take a lock and
validate on every update, which cost several µs per request. Rare events (reloads, upstream
errors, disconnects) keep the library's types.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)


class HistogramSeries:
    """One labelled histogram series: per-bucket counts and a sum, updated without a lock because
    only the event loop's thread observes (scrapes run on the same loop)."""

    __slots__ = ("_bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self._bounds, value)] += 1
        self.total += value


class LabelledHistogram:
    """A histogram family keyed by one label value."""

    def __init__(self, name: str, documentation: str, label: str, bounds: Sequence[float]) -> None:
        self.name, self.documentation, self.label = name, documentation, label
        self._bounds = tuple(bounds)
        self.series: dict[str, HistogramSeries] = {}

    def labels(self, value: str) -> HistogramSeries:
        series = self.series.get(value)
        if series is None:
            series = self.series[value] = HistogramSeries(self._bounds)
        return series

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, series in self.series.items():
            running = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*map(repr, self._bounds), "+Inf"), series.counts, strict=True):
                running += count
                buckets.append((bound, running))
            family.add_metric([value], buckets, series.total)
        return family


class ActiveStreams:
    """A gauge of streams being relayed now."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class _RequestPathCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        requests = CounterMetricFamily("tollgate_requests", "Requests handled, by route and status.",
                                       labels=["route", "status"])
        for (route, status), n in m.request_counts.items():
            requests.add_metric([route, str(status)], n)
        yield requests
        yield m.duration.collect()
        yield m.upstream_ttfb.collect()
        yield GaugeMetricFamily("tollgate_active_streams", "Streams being relayed now.",
                                value=m.active_streams.value)
        tokens = CounterMetricFamily("tollgate_tokens", "Tokens accounted, by direction.",
                                     labels=["direction"])
        tokens.add_metric(["input"], m.tokens_in)
        tokens.add_metric(["output"], m.tokens_out)
        yield tokens
        decisions = CounterMetricFamily(
            "tollgate_decisions", "Requests by outcome: forwarded, or the kind of refusal (permission, "
            "rate_limit, authentication, challenge, invalid_request...).", labels=["decision"])
        for decision, n in m.decision_counts.items():
            decisions.add_metric([decision], n)
        yield decisions


class Metrics:
    """Counters and histograms of the request path; labels kept to bounded sets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_counts: dict[tuple[str, int], int] = {}
        self.decision_counts: dict[str, int] = {}
        self.tokens_in = 0
        self.tokens_out = 0
        self.duration = LabelledHistogram("tollgate_request_duration_seconds",
                                          "Time from request start to the response's last byte.",
                                          "route", _LATENCY_BUCKETS)
        self.upstream_ttfb = LabelledHistogram("tollgate_upstream_ttfb_seconds",
                                               "Time until the upstream's response headers arrived.",
                                               "upstream", _LATENCY_BUCKETS)
        self.active_streams = ActiveStreams()
        r.register(_RequestPathCollector(self))
        self.upstream_errors = Counter("tollgate_upstream_errors",
                                       "Upstream failures, by kind (connect, timeout, reset; protocol: a "
                                       "malformed response or an unrequested 1xx; too_large: over the "
                                       "response size limit).",
                                       ["kind"], registry=r)
        self.client_disconnects = Counter("tollgate_client_disconnects",
                                          "Responses abandoned by the client before the end.", registry=r)
        self.client_write_timeouts = Counter(
            "tollgate_client_write_timeouts",
            "Streams cut off because the client read nothing for the upstream's client_write_timeout "
            "(also counted in tollgate_client_disconnects), by upstream.", ["upstream"], registry=r)
        self.log_records_lost = Counter(
            "tollgate_log_records_lost",
            "Access-log and audit records that could not be written, by log (access, audit) and "
            "reason (write_error: disk full or I/O error; queue_full: the writer fell behind; "
            "unserialisable; closed: emitted after shutdown).", ["log", "reason"], registry=r)

    def observe_request(self, route: str, status: int, seconds: float, input_tokens: int,
                        output_tokens: int, decision: str) -> None:
        """Hot path: a few dict updates, no locks."""
        key = (route, status)
        counts = self.request_counts
        counts[key] = counts.get(key, 0) + 1
        self.duration.labels(route).observe(seconds)
        self.tokens_in += input_tokens
        self.tokens_out += output_tokens
        decisions = self.decision_counts
        decisions[decision] = decisions.get(decision, 0) + 1

    def lost_records(self, log: str) -> Callable[[str, int], None]:
        """The counter of one log's lost records, as ``count(reason, n)`` (RecordLosses.bind)."""

        def count(reason: str, n: int) -> None:
            self.log_records_lost.labels(log, reason).inc(n)

        return count

    def render(self) -> bytes:
        return generate_latest(self.registry)
