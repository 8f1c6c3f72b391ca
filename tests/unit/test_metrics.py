"""The request-path metrics, read back through Prometheus' own text parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_request_counters_histograms_and_gauges_render_as_prometheus_text() -> None:
    metrics = Metrics()
    metrics.observe_request("chat.completions", 200, 0.003, 10, 5, "forwarded")
    metrics.observe_request("chat.completions", 200, 0.2, 1, 2, "forwarded")
    metrics.observe_request("messages", 429, 0.0001, 0, 0, "rate_limit")
    metrics.upstream_ttfb.labels("mock").observe(0.04)
    metrics.active_streams.inc()
    metrics.active_streams.inc()
    metrics.active_streams.dec()
    s = _samples(metrics)
    assert s[("tollgate_requests_total", (("route", "chat.completions"), ("status", "200")))] == 2
    assert s[("tollgate_requests_total", (("route", "messages"), ("status", "429")))] == 1
    assert s[("tollgate_decisions_total", (("decision", "forwarded"),))] == 2
    assert s[("tollgate_decisions_total", (("decision", "rate_limit"),))] == 1
    assert s[("tollgate_tokens_total", (("direction", "input"),))] == 11
    assert s[("tollgate_tokens_total", (("direction", "output"),))] == 7
    assert s[("tollgate_active_streams", ())] == 1
    chat = (("route", "chat.completions"),)
    assert s[("tollgate_request_duration_seconds_count", chat)] == 2
    assert abs(s[("tollgate_request_duration_seconds_sum", chat)] - 0.203) < 1e-9
    # Cumulative buckets: 0.003 falls in le=0.005, 0.2 in le=0.25.
    assert s[("tollgate_request_duration_seconds_bucket", (("le", "0.0025"), *chat))] == 0
    assert s[("tollgate_request_duration_seconds_bucket", (("le", "0.005"), *chat))] == 1
    assert s[("tollgate_request_duration_seconds_bucket", (("le", "0.25"), *chat))] == 2
    assert s[("tollgate_request_duration_seconds_bucket", (("le", "+Inf"), *chat))] == 2
    messages = (("route", "messages"),)
    assert s[("tollgate_request_duration_seconds_bucket", (("le", "0.0005"), *messages))] == 1
    assert s[("tollgate_upstream_ttfb_seconds_bucket", (("le", "0.05"), ("upstream", "mock")))] == 1
    assert s[("tollgate_upstream_ttfb_seconds_bucket", (("le", "0.025"), ("upstream", "mock")))] == 0


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    metrics = Metrics()
    metrics.observe_request("models", 200, 0.01, 0, 0, "forwarded")
    s = _samples(metrics)
    route = (("route", "models"),)
    assert s[("tollgate_request_duration_seconds_bucket", (("le", "0.005"), *route))] == 0
    assert s[("tollgate_request_duration_seconds_bucket", (("le", "0.01"), *route))] == 1
