"""The ``risk:`` config section: signal windows, score weights and ramps, challenge settings.

```yaml
risk:
  enabled: true
  patterns: null                # a patterns YAML file; default: the packaged gateway/risk/patterns.yaml
  store: {backend: memory}      # or {backend: redis, url: redis://..., prefix: "tg:risk:", deadline: 50ms,
                                #     mode: behind (default) | inline, mirror_entries: 200000}
                                # Redis Cluster: {backend: redis, cluster: true, nodes: [redis://h:7000, ...]}
  windows: {fan_in: 1h, account_half_life: 1h, account_ttl: 7d, template_half_life: 10m,
            cluster_half_life: 1h}
  ceilings: {max_tokens: 16384, reasoning_budget: 32000}
  tier_rates: {free: 60, pro: 600, enterprise: 6000, default: 120}   # expected requests per hour
  new_account_age: 7d
  min_gaps: 8                   # inter-arrival gaps needed before regularity counts
  cluster: {min_accounts: 5, full_accounts: 30}
  weights: {cot_share: 0.35, ...}        # noisy-OR weights, 0..1, see gateway/risk/score.py
  ramps: {template_accounts: [5, 50], ...}   # signal value → strength 0..1, linear between lo and hi
  challenge: {secret_env: TOLLGATE_CHALLENGE_SECRET, ttl: 5m, min_difficulty: 10, max_difficulty: 20}
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.store.cluster import cluster_url_issue
from gateway.yamlsource import Node, read_duration

# Noisy-OR weights: score = 1 - Π(1 - weight × strength). Chosen so that no single behaviour a
# legitimate heavy user can show (chain-of-thought prompts, machine timing, one template, high
# volume) reaches a friction threshold on its own; campaigns add up network and cluster evidence.
DEFAULT_WEIGHTS: Mapping[str, float] = MappingProxyType({
    "cot_share": 0.35, "shape_share": 0.25, "hydra": 0.5, "fan_in": 0.45, "new_accounts": 0.3,
    "velocity": 0.3, "regularity": 0.25, "single_turn": 0.1, "focus": 0.1, "round_the_clock": 0.15,
    "anonymiser": 0.2, "hosting": 0.15, "young_volume": 0.2, "cluster": 0.6,
})
# Ramps: strength = 0 at or below lo, 1 at or above hi (hi < lo inverts: low values are risky).
DEFAULT_RAMPS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "cot_share": (0.2, 0.8), "shape_share": (0.2, 0.8), "template_accounts": (5.0, 50.0),
    "ip_accounts": (3.0, 20.0), "prefix_accounts": (6.0, 40.0), "new_accounts": (4.0, 20.0),
    "velocity": (1.0, 4.0), "gap_cv": (1.0, 0.3), "single_turn_share": (0.7, 1.0),
    "focus": (0.6, 0.95), "hours_active": (14.0, 22.0), "young_requests": (20.0, 100.0),
    "cluster_evidence": (0.1, 0.5),
})
DEFAULT_TIER_RATES: Mapping[str, float] = MappingProxyType(
    {"free": 60.0, "pro": 600.0, "enterprise": 6000.0, "default": 120.0})


@dataclass(frozen=True, slots=True)
class ChallengeSettings:
    """Proof-of-work challenges. The secret is read from ``secret_env`` at start-up."""

    secret: bytes = b""
    ttl: float = 300.0
    min_difficulty: int = 10
    max_difficulty: int = 20


@dataclass(frozen=True, slots=True)
class StoreSettings:
    backend: str = "memory"  # memory | redis
    url: str | None = None  # single Redis (or, with cluster, one startup node)
    prefix: str = "tg:risk:"
    deadline: float = 0.05
    cluster: bool = False
    nodes: tuple[str, ...] = ()  # Redis Cluster startup nodes
    # Redis only: "behind" answers mirrored accounts locally and writes behind (see
    # gateway/risk/behind.py); "inline" awaits the store on every request.
    mode: str = "behind"
    mirror_entries: int = 200_000

    @property
    def urls(self) -> tuple[str, ...]:
        """Where to connect: the startup nodes, else the one URL."""
        return self.nodes or ((self.url,) if self.url else ())


@dataclass(frozen=True, slots=True)
class RiskSettings:
    enabled: bool = True
    patterns: str | None = None
    store: StoreSettings = field(default_factory=StoreSettings)
    fan_in_window: float = 3600.0
    account_half_life: float = 3600.0
    account_ttl: float = 7 * 86400.0
    template_half_life: float = 600.0
    cluster_half_life: float = 3600.0
    max_tokens_ceiling: int = 16384
    reasoning_budget_ceiling: int = 32000
    tier_rates: Mapping[str, float] = field(default_factory=lambda: DEFAULT_TIER_RATES)
    new_account_age: float = 7 * 86400.0
    min_gaps: int = 8
    cluster_min_accounts: int = 5
    cluster_full_accounts: int = 30
    weights: Mapping[str, float] = field(default_factory=lambda: DEFAULT_WEIGHTS)
    ramps: Mapping[str, tuple[float, float]] = field(default_factory=lambda: DEFAULT_RAMPS)
    challenge: ChallengeSettings = field(default_factory=ChallengeSettings)



def _positive(node: Node, key: str, default: int) -> int:
    value = node.get(key, int, default)
    if value is None or value <= 0:
        node.error(f"expected a positive integer, got {value!r}", key)
        return default
    return value


def _mapping(node: Node | None, what: str) -> Node | None:
    if node is None or not node.expect_mapping(what):
        return None
    return node


def _weights(node: Node | None) -> Mapping[str, float]:
    out = dict(DEFAULT_WEIGHTS)
    if _mapping(node, "a mapping of signal name to weight") is None:
        return MappingProxyType(out)
    assert node is not None
    node.check_keys(frozenset(DEFAULT_WEIGHTS))
    for name, child in node.items():
        value = child.as_type(float, what="a weight from 0 to 1")
        if name in out and value is not None:
            if 0.0 <= value <= 1.0:
                out[name] = float(value)
            else:
                child.error(f"expected a weight from 0 to 1, got {value}")
    return MappingProxyType(out)


def _ramps(node: Node | None) -> Mapping[str, tuple[float, float]]:
    out = dict(DEFAULT_RAMPS)
    if _mapping(node, "a mapping of signal name to [lo, hi]") is None:
        return MappingProxyType(out)
    assert node is not None
    node.check_keys(frozenset(DEFAULT_RAMPS))
    for name, child in node.items():
        value = child.value
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
                or value[0] == value[1]):
            child.error(f"expected [lo, hi], two different numbers, got {value!r}")
        elif name in out:
            out[name] = (float(value[0]), float(value[1]))
    return MappingProxyType(out)


def _tier_rates(node: Node | None) -> Mapping[str, float]:
    out = dict(DEFAULT_TIER_RATES)
    if _mapping(node, "a mapping of tier to requests per hour") is None:
        return MappingProxyType(out)
    assert node is not None
    for name, child in node.items():
        value = child.as_type(float, what="a positive number of requests per hour")
        if value is not None and value > 0:
            out[name] = float(value)
        elif value is not None:
            child.error(f"expected a positive number of requests per hour, got {value}")
    return MappingProxyType(out)


def _store(node: Node | None) -> StoreSettings:
    if _mapping(node, "a mapping with 'backend'") is None:
        return StoreSettings()
    assert node is not None
    node.check_keys({"backend", "url", "prefix", "deadline", "cluster", "nodes", "mode", "mirror_entries"})
    backend = node.get("backend", str, "memory") or "memory"
    if backend not in ("memory", "redis"):
        node.error(f"unknown backend '{backend}', expected memory or redis", "backend")
    url = node.get("url", str)
    cluster = bool(node.get("cluster", bool, False))
    nodes: tuple[str, ...] = ()
    child = node.child("nodes")
    if child is not None:
        if url:
            node.error("set either 'url' or 'nodes', not both", "nodes")
        if not cluster:
            node.error("'nodes' are Redis Cluster startup nodes: set 'cluster: true'", "nodes")
        if child.expect_list("a list of redis:// URLs"):
            nodes = tuple(u for u in (n.as_type(str) for n in child.elements()) if u)
            issue = cluster_url_issue(nodes) if nodes else None
            if issue:
                node.error(issue, "nodes")
    if backend == "redis" and not url and not nodes:
        wanted = "'nodes' or a 'url'" if cluster else "a 'url'"
        node.error(f"the redis backend needs {wanted}", "backend")
    mode = node.get("mode", str, "behind") or "behind"
    if mode not in ("behind", "inline"):
        node.error(f"unknown mode '{mode}', expected behind or inline", "mode")
    if backend != "redis" and node.child("mode") is not None:
        node.error("'mode' applies to the redis backend (the memory store is already local)", "mode")
    mirror_entries = node.get("mirror_entries", int, 200_000)
    if mirror_entries is None or mirror_entries <= 0:
        node.error(f"expected a positive number of mirrored keys, got {mirror_entries}", "mirror_entries")
        mirror_entries = 200_000
    return StoreSettings(backend, url, node.get("prefix", str, "tg:risk:") or "tg:risk:",
                         read_duration(node, "deadline", 0.05), cluster, nodes, mode, mirror_entries)


def _challenge(node: Node | None) -> ChallengeSettings:
    if _mapping(node, "a mapping") is None:
        return ChallengeSettings(secret=os.environ.get("TOLLGATE_CHALLENGE_SECRET", "").encode())
    assert node is not None
    node.check_keys({"secret_env", "ttl", "min_difficulty", "max_difficulty"})
    env = node.get("secret_env", str, "TOLLGATE_CHALLENGE_SECRET") or "TOLLGATE_CHALLENGE_SECRET"
    low = node.get("min_difficulty", int, 10)
    high = node.get("max_difficulty", int, 20)
    if low is None or high is None or not 1 <= low <= high <= 32:
        node.error(f"expected 1 <= min_difficulty <= max_difficulty <= 32, got {low!r} and {high!r}")
        low, high = 10, 20
    return ChallengeSettings(os.environ.get(env, "").encode(), read_duration(node, "ttl", 300.0), low, high)


_KEYS = frozenset({"enabled", "patterns", "store", "windows", "ceilings", "tier_rates", "new_account_age",
                   "min_gaps", "cluster", "weights", "ramps", "challenge"})


def parse_risk_settings(node: Node | None) -> RiskSettings:
    """Read ``risk:``; errors go to ``node.issues`` (the caller raises them all together)."""
    if node is None or node.value is None or not node.expect_mapping("a mapping"):
        return RiskSettings(challenge=_challenge(None))
    node.check_keys(_KEYS)
    windows = node.child("windows")
    w = windows if windows is not None and windows.expect_mapping() else None
    if w is not None:
        w.check_keys({"fan_in", "account_half_life", "account_ttl", "template_half_life",
                      "cluster_half_life"})
    base = RiskSettings()
    ceilings = node.child("ceilings")
    c = ceilings if ceilings is not None and ceilings.expect_mapping() else None
    if c is not None:
        c.check_keys({"max_tokens", "reasoning_budget"})
    cluster = node.child("cluster")
    cl = cluster if cluster is not None and cluster.expect_mapping() else None
    if cl is not None:
        cl.check_keys({"min_accounts", "full_accounts"})
    return RiskSettings(
        enabled=bool(node.get("enabled", bool, True)),
        patterns=node.get("patterns", str),
        store=_store(node.child("store")),
        fan_in_window=read_duration(w, "fan_in", base.fan_in_window) if w else base.fan_in_window,
        account_half_life=read_duration(w, "account_half_life", base.account_half_life) if w
        else base.account_half_life,
        account_ttl=read_duration(w, "account_ttl", base.account_ttl) if w else base.account_ttl,
        template_half_life=read_duration(w, "template_half_life", base.template_half_life) if w
        else base.template_half_life,
        cluster_half_life=read_duration(w, "cluster_half_life", base.cluster_half_life) if w
        else base.cluster_half_life,
        max_tokens_ceiling=_positive(c, "max_tokens", base.max_tokens_ceiling) if c
        else base.max_tokens_ceiling,
        reasoning_budget_ceiling=_positive(c, "reasoning_budget", base.reasoning_budget_ceiling) if c
        else base.reasoning_budget_ceiling,
        tier_rates=_tier_rates(node.child("tier_rates")),
        new_account_age=read_duration(node, "new_account_age", base.new_account_age),
        min_gaps=_positive(node, "min_gaps", base.min_gaps),
        cluster_min_accounts=_positive(cl, "min_accounts", base.cluster_min_accounts) if cl
        else base.cluster_min_accounts,
        cluster_full_accounts=_positive(cl, "full_accounts", base.cluster_full_accounts) if cl
        else base.cluster_full_accounts,
        weights=_weights(node.child("weights")),
        ramps=_ramps(node.child("ramps")),
        challenge=_challenge(node.child("challenge")),
    )
