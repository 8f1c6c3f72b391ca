"""Prometheus metrics, held in one registry per gateway instance (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Counters and histograms of the request path; labels kept to bounded sets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tollgate_requests", "Requests handled, by route and status.",
                                ["route", "status"], registry=r)
        self.duration = Histogram("tollgate_request_duration_seconds",
                                  "Time from request start to the response's last byte.",
                                  ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_ttfb = Histogram("tollgate_upstream_ttfb_seconds",
                                       "Time until the upstream's response headers arrived.",
                                       ["upstream"], buckets=_LATENCY_BUCKETS, registry=r)
        self.active_streams = Gauge("tollgate_active_streams", "Streams being relayed now.", registry=r)
        self.tokens = Counter("tollgate_tokens", "Tokens accounted, by direction.", ["direction"],
                              registry=r)
        self.decisions = Counter("tollgate_decisions",
                                 "Requests by outcome: forwarded, or the kind of refusal (permission, "
                                 "rate_limit, authentication, challenge, invalid_request...).",
                                 ["decision"], registry=r)
        self.upstream_errors = Counter("tollgate_upstream_errors",
                                       "Upstream failures, by kind (connect, timeout, reset).",
                                       ["kind"], registry=r)
        self.client_disconnects = Counter("tollgate_client_disconnects",
                                          "Responses abandoned by the client before the end.", registry=r)
        self.reloads = Counter("tollgate_reloads", "Reloads of policies, keys or geo databases.",
                               ["what", "result"], registry=r)
        self._requests_by: dict[tuple[str, int], Counter] = {}
        self._duration_by: dict[str, Histogram] = {}
        self._decisions_by: dict[str, Counter] = {}
        self._tokens_in = self.tokens.labels("input")
        self._tokens_out = self.tokens.labels("output")

    def observe_request(self, route: str, status: int, seconds: float, input_tokens: int,
                        output_tokens: int) -> None:
        """Hot path: label children are cached so a request costs a few dict lookups."""
        key = (route, status)
        counter = self._requests_by.get(key)
        if counter is None:
            counter = self._requests_by[key] = self.requests.labels(route, str(status))
        counter.inc()
        hist = self._duration_by.get(route)
        if hist is None:
            hist = self._duration_by[route] = self.duration.labels(route)
        hist.observe(seconds)
        if input_tokens:
            self._tokens_in.inc(input_tokens)
        if output_tokens:
            self._tokens_out.inc(output_tokens)

    def observe_decision(self, decision: str) -> None:
        counter = self._decisions_by.get(decision)
        if counter is None:
            counter = self._decisions_by[decision] = self.decisions.labels(decision)
        counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
