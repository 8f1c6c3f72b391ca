"""Gateway-level settings for quotas: the ``store:`` and ``quota:`` config sections.

```yaml
store:
  backend: redis                 # memory (default, one worker) | redis
  redis:
    url: redis://127.0.0.1:6379/0            # single Redis, or:
    cluster_nodes: [redis://10.0.0.1:7000]   # Redis Cluster startup nodes
    key_prefix: "tg:"
  deadline: 50ms                 # per store call
  breaker: {failures: 5, reset_after: 5s}
quota:
  on_store_failure: local        # default for rules: open | closed | local
  replicas: 4                    # gateway replicas; the local fallback holds limit / replicas
  default_output_tokens: 4096    # output reservation when a request has no max_tokens
  lease_ttl: 10m                 # concurrency lease TTL; renewed every lease_ttl/3 while in flight
  prices:                        # USD per million tokens; 'prefix*' patterns allowed
    gpt-4o: {input: 2.5, output: 10}
    "claude-*": {input: 3, output: 15}
```
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.store.breaker import BreakerSettings, FailureMode
from gateway.store.cluster import cluster_url_issue
from gateway.yamlsource import Node, read_duration


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    backend: str = "memory"  # "memory" | "redis"
    redis_urls: tuple[str, ...] = ()
    redis_cluster: bool = False
    key_prefix: str = "tg:"
    deadline: float = 0.05
    breaker: BreakerSettings = BreakerSettings()
    on_store_failure: FailureMode = FailureMode.LOCAL
    replicas: int = 1
    default_output_tokens: int = 4096
    lease_ttl: float = 600.0
    prices: tuple[tuple[str, Price], ...] = ()

    def price_for(self, model: str | None) -> Price | None:
        """Exact model, else the longest matching ``prefix*`` pattern, else ``*``; with no
        match the most expensive entry is used, so an unknown model cannot spend for free."""
        if not self.prices:
            return None
        table = dict(self.prices)
        if model is not None and model in table:
            return table[model]
        patterns = sorted((p for p in table if p.endswith("*")), key=len, reverse=True)
        for pattern in patterns:
            if model is not None and model.startswith(pattern[:-1]):
                return table[pattern]
        return max(table.values(), key=lambda p: p.input + p.output)


def check_workers(settings: QuotaSettings, workers: int) -> str | None:
    """The message refusing a start that would silently split quotas, or None if fine."""
    if workers > 1 and settings.backend == "memory":
        return (f"--workers {workers} with the memory store would give each worker its own quotas; "
                "configure store.backend: redis or run one worker")
    return None



def _positive_int(node: Node, key: str, default: int) -> int:
    value = node.get(key, int, default)
    if value is None or value < 1:
        child = node.child(key)
        if child is not None and isinstance(value, int):
            child.error(f"expected a positive integer, got {value}")
        return default
    return value


def _store(node: Node) -> dict[str, object]:
    out: dict[str, object] = {}
    if not node.expect_mapping():
        return out
    node.check_keys({"backend", "redis", "deadline", "breaker"})
    backend = node.get("backend", str, "memory")
    if backend not in ("memory", "redis"):
        node.error(f"unknown backend '{backend}'; expected one of: memory, redis", "backend")
        backend = "memory"
    out["backend"] = backend
    out["deadline"] = read_duration(node, "deadline", 0.05, 0.001, 10.0)
    breaker = node.child("breaker")
    if breaker is not None and breaker.expect_mapping():
        breaker.check_keys({"failures", "reset_after"})
        out["breaker"] = BreakerSettings(_positive_int(breaker, "failures", 5),
                                         read_duration(breaker, "reset_after", 5.0, 0.01, 3600.0))
    redis = node.child("redis")
    if redis is not None and redis.expect_mapping():
        redis.check_keys({"url", "cluster_nodes", "key_prefix"})
        url = redis.get("url", str)
        nodes = redis.child("cluster_nodes")
        if url is not None and nodes is not None:
            redis.error("set either 'url' or 'cluster_nodes', not both")
        if nodes is not None and nodes.expect_list("a list of redis:// URLs"):
            urls = tuple(u for u in (n.as_type(str) for n in nodes.elements()) if u)
            out["redis_urls"] = urls
            out["redis_cluster"] = True
            issue = cluster_url_issue(urls) if urls else None
            if issue:
                redis.error(issue, "cluster_nodes")
        elif url is not None:
            out["redis_urls"] = (url,)
        out["key_prefix"] = redis.get("key_prefix", str, "tg:")
    if backend == "redis" and not out.get("redis_urls"):
        node.error("backend 'redis' needs redis.url or redis.cluster_nodes", "backend")
    return out


def _quota(node: Node) -> dict[str, object]:
    out: dict[str, object] = {}
    if not node.expect_mapping():
        return out
    node.check_keys({"on_store_failure", "replicas", "default_output_tokens", "lease_ttl", "prices"})
    mode = node.get("on_store_failure", str)
    if mode is not None:
        try:
            out["on_store_failure"] = FailureMode(mode)
        except ValueError:
            node.error(f"unknown failure mode '{mode}'; expected one of: closed, local, open",
                       "on_store_failure")
    out["replicas"] = _positive_int(node, "replicas", 1)
    out["default_output_tokens"] = _positive_int(node, "default_output_tokens", 4096)
    out["lease_ttl"] = read_duration(node, "lease_ttl", 600.0, 1.0, 86400.0)
    prices = node.child("prices")
    if prices is not None and prices.expect_mapping("a mapping of model → {input, output}"):
        table: list[tuple[str, Price]] = []
        for model, entry in prices.items():
            if not entry.expect_mapping("a mapping with 'input' and 'output'"):
                continue
            entry.check_keys({"input", "output"}, required=("input", "output"))
            pin = entry.get("input", float)
            pout = entry.get("output", float)
            if pin is not None and pout is not None:
                if pin < 0 or pout < 0:
                    entry.error("prices must not be negative")
                else:
                    table.append((model, Price(float(pin), float(pout))))
        out["prices"] = tuple(table)
    return out


def parse_quota_settings(root: Node) -> QuotaSettings:
    """Read ``store:`` and ``quota:`` from the root config node; errors go to ``root.issues``
    (other root keys are the settings loader's business)."""
    values: dict[str, object] = {}
    store = root.child("store")
    if store is not None:
        values.update(_store(store))
    quota = root.child("quota")
    if quota is not None:
        values.update(_quota(quota))
    return QuotaSettings(**values)  # type: ignore[arg-type]
