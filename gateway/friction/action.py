"""The ``friction`` policy action (non-terminal): YAML → frozen :class:`FrictionAction`.

```yaml
friction:
  challenge: {kind: pow, difficulty: from_risk}     # or a number of bits, 1-32
  # challenge: {kind: reverify, url: https://example.com/verify}
  degrade: {strip_logprobs: true, strip_reasoning: true, force_n1: true,
            cap_max_tokens: 1024, cap_thinking_budget: 2048, fallback_model: small-model}
  tarpit: {first_byte_delay: 2s, tokens_per_second: 5}   # delay up to 60s; rate 1-10000
  cap_tokens: {limit: 20000, per: 1h, key: cluster}  # account (default) | cluster
  deny: true                                         # or {status: 403, message: ...}
  ttl: 1h          # sticky: keeps applying to the account for this long (admin can clear it)
```
Registered through ``gateway.policy.builtin_actions.EXTENSION_MODULES`` as ``FRICTION_ACTION``.
"""

from __future__ import annotations

from typing import Any

from gateway.friction.model import (
    FROM_RISK,
    CapTokens,
    Degrade,
    DenySpec,
    FrictionAction,
    PowChallenge,
    Reverify,
    Tarpit,
)
from gateway.policy.registry import CompileEnv
from gateway.yamlsource import DURATION_HELP, Node, parse_duration

EFFECTS = ("cap_tokens", "challenge", "degrade", "deny", "tarpit")
MAX_TTL = 90 * 86400.0
# Tarpit bounds: a tarpit slows a client down, it must not park a connection (and the quota
# concurrency slot it holds) for hours. 60 s before the first byte; at least one event (about one
# token) per second while streaming. The stage clamps stored sticky actions to the same bounds.
MAX_DELAY = 60.0
MIN_RATE = 1.0
MAX_RATE = 10_000.0
DENY_MESSAGE = "This request is not permitted."
_DEGRADE_FLAGS = ("strip_logprobs", "strip_reasoning", "force_n1")
_DEGRADE_CAPS = ("cap_max_tokens", "cap_thinking_budget")


def _duration(node: Node, low: float, high: float, what: str) -> float | None:
    value = parse_duration(node.value)
    if value is None:
        node.error(f"expected {DURATION_HELP}, got {node.value!r}")
        return None
    if not low <= value <= high:
        node.error(f"{what} must be between {low:g}s and {high:g}s, got {node.value!r}")
        return None
    return value


def _challenge(node: Node) -> PowChallenge | Reverify | None:
    if not node.expect_mapping("a mapping with 'kind' (pow or reverify)"):
        return None
    kind = node.get("kind", str, required=True)
    if kind == "pow":
        node.check_keys({"kind", "difficulty"})
        child = node.child("difficulty")
        if child is None or child.value == "from_risk":
            return PowChallenge(FROM_RISK)
        bits = child.value
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
            child.error(f"expected a number of bits from 1 to 32 or 'from_risk', got {bits!r}")
            return None
        return PowChallenge(bits)
    if kind == "reverify":
        node.check_keys({"kind", "url"}, required=("url",))
        url = node.get("url", str)
        if url is not None and not url.startswith(("https://", "http://")):
            node.error(f"expected an http:// or https:// URL, got {url!r}", "url")
            return None
        return Reverify(url) if url else None
    if kind is not None:
        node.error(f"unknown challenge kind '{kind}', expected pow or reverify", "kind")
    return None


def _degrade(node: Node) -> Degrade | None:
    if not node.expect_mapping("a mapping of degrade options"):
        return None
    allowed = {*_DEGRADE_FLAGS, *_DEGRADE_CAPS, "fallback_model"}
    node.check_keys(allowed)
    if not any(k in allowed for k in node.keys()):
        node.error(f"expected at least one of: {', '.join(sorted(allowed))}")
        return None
    flags = {k: bool(node.get(k, bool, False)) for k in _DEGRADE_FLAGS}
    caps: dict[str, int | None] = {}
    for key in _DEGRADE_CAPS:
        value = node.get(key, int)
        if value is not None and value < 1:
            node.error(f"expected a positive integer, got {value}", key)
            value = None
        caps[key] = value
    return Degrade(flags["strip_logprobs"], flags["strip_reasoning"], flags["force_n1"],
                   caps["cap_max_tokens"], caps["cap_thinking_budget"], node.get("fallback_model", str))


def _tarpit(node: Node) -> Tarpit | None:
    if not node.expect_mapping("a mapping with first_byte_delay and/or tokens_per_second"):
        return None
    node.check_keys({"first_byte_delay", "tokens_per_second"})
    delay_node, rate_node = node.child("first_byte_delay"), node.child("tokens_per_second")
    if delay_node is None and rate_node is None:
        node.error("expected at least one of: first_byte_delay, tokens_per_second")
        return None
    delay = _duration(delay_node, 0.0, MAX_DELAY, "first_byte_delay") if delay_node is not None else 0.0
    rate = node.get("tokens_per_second", float)
    if rate is not None and rate_node is not None and not MIN_RATE <= rate <= MAX_RATE:  # refuses nan
        rate_node.error(f"tokens_per_second must be between {MIN_RATE:g} and {MAX_RATE:g}, got {rate}")
        return None
    return Tarpit(delay, float(rate) if rate is not None else None) if delay is not None else None


def _cap_tokens(node: Node) -> CapTokens | None:
    if not node.expect_mapping("a mapping with limit and per"):
        return None
    node.check_keys({"limit", "per", "key"}, required=("limit", "per"))
    limit = node.get("limit", int)
    if limit is not None and limit < 1:
        node.error(f"expected a positive integer, got {limit}", "limit")
        return None
    per_node = node.child("per")
    per = _duration(per_node, 1.0, 30 * 86400.0, "'per'") if per_node is not None else None
    key = node.get("key", str, "account") or "account"
    if key not in ("account", "cluster"):
        node.error(f"unknown key '{key}', expected account or cluster", "key")
        return None
    return CapTokens(limit, per, key) if limit is not None and per is not None else None


def _deny(node: Node) -> DenySpec | None:
    if node.value is True:
        return DenySpec()
    if not node.expect_mapping("true or a mapping with status and message"):
        return None
    node.check_keys({"status", "message"})
    status = node.get("status", int, 403)
    if status is None or not 400 <= status <= 599:
        node.error(f"status {status} is not an error, expected an HTTP status from 400 to 599", "status")
        return None
    return DenySpec(status, node.get("message", str, DENY_MESSAGE) or DENY_MESSAGE)


class FrictionActionSpec:
    """Registers as the non-terminal ``friction`` action."""

    name = "friction"
    terminal = False

    def parse(self, node: Node, env: CompileEnv) -> FrictionAction | None:
        before = len(node.issues.errors)
        if not node.expect_mapping(f"a mapping with at least one of: {', '.join(EFFECTS)}"):
            return None
        node.check_keys({*EFFECTS, "ttl"})
        if not any(k in EFFECTS for k in node.keys()):
            if len(node.issues.errors) == before:  # a misspelt effect was already reported
                node.error(f"expected at least one of: {', '.join(EFFECTS)}")
            return None
        parts: dict[str, Any] = {}
        for key, parse in (("challenge", _challenge), ("degrade", _degrade), ("tarpit", _tarpit),
                           ("cap_tokens", _cap_tokens), ("deny", _deny)):
            child = node.child(key)
            if child is not None:
                parts[key] = parse(child)
        ttl_node = node.child("ttl")
        ttl = _duration(ttl_node, 1.0, MAX_TTL, "ttl") if ttl_node is not None else None
        if len(node.issues.errors) > before:
            return None
        challenge = parts.get("challenge")
        return FrictionAction(
            pow=challenge if isinstance(challenge, PowChallenge) else None,
            reverify=challenge if isinstance(challenge, Reverify) else None,
            degrade=parts.get("degrade"), tarpit=parts.get("tarpit"), cap_tokens=parts.get("cap_tokens"),
            deny=parts.get("deny"), ttl=ttl,
        )


FRICTION_ACTION = FrictionActionSpec()
