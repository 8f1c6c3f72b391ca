"""The ``store:`` and ``quota:`` gateway config sections."""

from __future__ import annotations

from gateway.quota.settings import Price, QuotaSettings, check_workers, parse_quota_settings
from gateway.store.breaker import BreakerSettings, FailureMode
from gateway.yamlsource import Issues, Node


def parse(text: str) -> tuple[QuotaSettings, list[str]]:
    issues = Issues()
    node = Node.parse(text, "gw.yaml", issues)
    assert node is not None
    return parse_quota_settings(node), [str(i) for i in issues.items]


def test_defaults() -> None:
    settings, errors = parse("listen: 8080\n")
    assert errors == [] and settings == QuotaSettings()
    assert settings.backend == "memory" and settings.deadline == 0.05


def test_full_config() -> None:
    settings, errors = parse(
        "store:\n  backend: redis\n"
        "  redis: {cluster_nodes: ['redis://h1:7000', 'redis://h2:7001'], key_prefix: 'x:'}\n"
        "  deadline: 20ms\n  breaker: {failures: 3, reset_after: 2s}\n"
        "quota:\n  on_store_failure: closed\n  replicas: 4\n  default_output_tokens: 512\n  lease_ttl: 5m\n"
        "  prices:\n    gpt-4o: {input: 2.5, output: 10}\n    'claude-*': {input: 3, output: 15}\n")
    assert errors == []
    assert settings.redis_urls == ("redis://h1:7000", "redis://h2:7001") and settings.redis_cluster
    assert settings.deadline == 0.02 and settings.breaker == BreakerSettings(3, 2.0)
    assert settings.on_store_failure is FailureMode.CLOSED and settings.replicas == 4
    assert settings.price_for("gpt-4o") == Price(2.5, 10.0)
    assert settings.price_for("claude-sonnet-4") == Price(3.0, 15.0)
    assert settings.price_for("unknown") == Price(3.0, 15.0)  # most expensive: no free spend


def test_errors_are_reported_with_positions() -> None:
    _, errors = parse("store:\n  backend: redis\n  deadline: 1m\nquota:\n  on_store_failure: sometimes\n"
                      "  replica: 2\n")
    assert sorted(errors) == [
        "gw.yaml:2:3: store.backend: backend 'redis' needs redis.url or redis.cluster_nodes",
        "gw.yaml:3:13: store.deadline: must be between 0.001s and 10s, got 60s",
        "gw.yaml:5:3: quota.on_store_failure: unknown failure mode 'sometimes'; expected one of: "
        "closed, local, open",
        "gw.yaml:6:3: quota.replica: unknown key 'replica'; did you mean 'replicas'?",
    ]


def test_cluster_nodes_must_agree_on_credentials_and_tls() -> None:
    """Every node a Cluster client discovers is reached with one set of credentials and TLS
    settings, so startup URLs that disagree (or name a database, or a socket) are refused."""
    _, errors = parse("store:\n  backend: redis\n"
                      "  redis: {cluster_nodes: ['redis://:s3cret@h1:7000', 'redis://h2:7001']}\n")
    assert errors == ["gw.yaml:3:11: store.redis.cluster_nodes: the startup node URLs must share one "
                      "scheme, user, password and ssl_* options"]
    _, errors = parse("store:\n  backend: redis\n  redis: {cluster_nodes: ['redis://h1:7000/2']}\n")
    assert errors == ["gw.yaml:3:11: store.redis.cluster_nodes: 'redis://h1:7000/2': a Redis Cluster "
                      "has only database 0"]
    settings, errors = parse("store:\n  backend: redis\n  redis: {cluster_nodes: "
                             "['rediss://tg:pw@h1:7000', 'rediss://tg:pw@h2:7001']}\n")
    assert errors == [] and settings.redis_cluster


def test_memory_store_refuses_several_workers() -> None:
    assert check_workers(QuotaSettings(), 1) is None
    assert check_workers(QuotaSettings(), 4) == (
        "--workers 4 with the memory store would give each worker its own quotas; "
        "configure store.backend: redis or run one worker")
    assert check_workers(QuotaSettings(backend="redis", redis_urls=("redis://x",)), 4) is None


def test_cluster_url_errors_never_show_the_password() -> None:
    _, errors = parse("store:\n  backend: redis\n  redis: {cluster_nodes: ['redis://tg:hunter2@h1:7000/2']}\n")
    assert errors == ["gw.yaml:3:11: store.redis.cluster_nodes: 'redis://tg:***@h1:7000/2': a Redis "
                      "Cluster has only database 0"]
