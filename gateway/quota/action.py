"""The ``quota`` policy action: YAML → frozen :class:`QuotaAction`.

```yaml
quota:
  on_store_failure: local      # open | closed | local (default: quota.on_store_failure)
  limits:
    - name: rpm
      kind: requests           # requests | input_tokens | output_tokens | total_tokens | spend | concurrency
      limit: 60                # spend: USD
      per: 1m                  # 1s..1mo; not for concurrency
      burst: 10                # requests only: admitted back to back from rest (default 1)
      key: [principal.account] # context fields; empty or absent = one limit for the whole rule
      lease_ttl: 10m           # concurrency only (default quota.lease_ttl)
```
"""

from __future__ import annotations

import difflib
import re

from gateway.policy.registry import CompileEnv
from gateway.quota.limits import (
    KEY_FIELD_FAMILIES,
    KEY_FIELDS,
    CompiledLimit,
    KeyGetter,
    LimitKind,
    QuotaAction,
    key_getter,
)
from gateway.quota.settings import QuotaSettings
from gateway.store.breaker import FailureMode
from gateway.yamlsource import DURATION_HELP, Node, parse_duration

MIN_PERIOD = 1.0
MAX_PERIOD = 30 * 86400.0  # 1mo
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_LIMIT_KEYS = frozenset({"name", "kind", "limit", "per", "burst", "key", "lease_ttl"})
_KINDS = [k.value for k in LimitKind]


def _closest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(sorted(options))}"


class QuotaActionSpec:
    """Registers as the non-terminal ``quota`` action."""

    name = "quota"
    terminal = False

    def parse(self, node: Node, env: CompileEnv) -> QuotaAction | None:
        before = len(node.issues.errors)
        if not node.expect_mapping("a mapping with 'limits'"):
            return None
        node.check_keys({"limits", "on_store_failure"}, required=("limits",))
        mode: FailureMode | None = None
        raw_mode = node.get("on_store_failure", str)
        if raw_mode is not None:
            try:
                mode = FailureMode(raw_mode)
            except ValueError:
                node.error(f"unknown failure mode '{raw_mode}'; expected one of: closed, local, open",
                           "on_store_failure")
        limits: list[CompiledLimit] = []
        limits_node = node.child("limits")
        if limits_node is not None:
            if not limits_node.expect_list("a non-empty list of limits") or not limits_node.value:
                if limits_node.is_list:
                    limits_node.error("expected a non-empty list of limits, got an empty list")
            else:
                seen: set[str] = set()
                for item in limits_node.elements():
                    limit = self._limit(item, env, seen)
                    if limit is not None:
                        limits.append(limit)
        if len(node.issues.errors) > before:
            return None
        return QuotaAction(tuple(limits), mode)

    def _limit(self, node: Node, env: CompileEnv, seen: set[str]) -> CompiledLimit | None:
        if not node.expect_mapping("a mapping with name, kind, limit"):
            return None
        before = len(node.issues.errors)
        node.check_keys(_LIMIT_KEYS, required=("name", "kind", "limit"))
        name = node.get("name", str)
        if name is not None:
            if not _NAME.match(name):
                node.error(f"limit name must be 1-64 of [A-Za-z0-9_.-], got '{name}'", "name")
            elif name in seen:
                node.error(f"duplicate limit name '{name}'", "name")
            seen.add(name)
        kind = self._kind(node)
        amount = self._amount(node, kind, env)
        period = self._period(node, kind)
        burst = self._burst(node, kind)
        lease_ttl = self._lease_ttl(node, kind)
        fields, getters = self._key(node)
        if len(node.issues.errors) > before or name is None or kind is None or amount is None:
            return None
        return CompiledLimit(name, kind, amount, period, burst, lease_ttl, fields, getters)

    def _kind(self, node: Node) -> LimitKind | None:
        kind = node.get("kind", str)
        if kind is None:
            return None
        try:
            return LimitKind(kind)
        except ValueError:
            node.error(f"unknown kind '{kind}'{_closest(kind, _KINDS)}", "kind")
            return None

    def _amount(self, node: Node, kind: LimitKind | None, env: CompileEnv) -> int | None:
        child = node.child("limit")
        if child is None:
            return None
        if kind is LimitKind.SPEND:
            usd = child.as_type(float, what="an amount in USD")
            if usd is None:
                return None
            if usd <= 0:
                child.error(f"expected a positive amount in USD, got {usd}")
                return None
            settings = getattr(env.settings, "quota", env.settings)
            if isinstance(settings, QuotaSettings) and not settings.prices:
                child.error("spend limits need a price table (quota.prices in the gateway config)")
            return round(usd * 1_000_000)  # micro-USD: integer arithmetic in the store
        value = child.as_type(int, what="a positive integer")
        if value is not None and value <= 0:
            child.error(f"expected a positive integer, got {value}")
            return None
        return value

    def _period(self, node: Node, kind: LimitKind | None) -> float | None:
        child = node.child("per")
        if kind is LimitKind.CONCURRENCY:
            if child is not None:
                node.error("'per' does not apply to kind 'concurrency' (see 'lease_ttl')", "per")
            return None
        if child is None:
            if kind is not None:
                node.error("missing required key 'per'")
            return None
        seconds = parse_duration(child.value)
        if seconds is None:
            child.error(f"expected {DURATION_HELP}, got {child.value!r}")
            return None
        if not MIN_PERIOD <= seconds <= MAX_PERIOD:
            child.error(f"'per' must be between 1s and 1mo, got {child.value!r}")
            return None
        return seconds

    def _burst(self, node: Node, kind: LimitKind | None) -> int:
        child = node.child("burst")
        if child is None:
            return 1
        if kind is not None and kind is not LimitKind.REQUESTS:
            node.error("'burst' applies only to kind 'requests'", "burst")
            return 1
        value = child.as_type(int, what="a positive integer")
        if value is not None and value < 1:
            child.error(f"expected a positive integer, got {value}")
        return value if value is not None and value >= 1 else 1

    def _lease_ttl(self, node: Node, kind: LimitKind | None) -> float | None:
        child = node.child("lease_ttl")
        if child is None:
            return None
        if kind is not None and kind is not LimitKind.CONCURRENCY:
            node.error("'lease_ttl' applies only to kind 'concurrency'", "lease_ttl")
            return None
        seconds = parse_duration(child.value)
        if seconds is None or not 1.0 <= seconds <= 86400.0:
            child.error(f"expected a duration between 1s and 1d, got {child.value!r}")
            return None
        return seconds

    def _key(self, node: Node) -> tuple[tuple[str, ...], tuple[KeyGetter, ...]]:
        child = node.child("key")
        if child is None:
            return (), ()
        if isinstance(child.value, str):
            items = [child]  # a single field may be written without brackets
        elif child.expect_list("a list of context fields"):
            items = list(child.elements())
        else:
            return (), ()
        fields: list[str] = []
        getters: list[KeyGetter] = []
        for item in items:
            path = item.as_type(str, what="a context field name")
            if path is None:
                continue
            getter = key_getter(path)
            if getter is None:
                options = list(KEY_FIELDS) + [f + "<name>" for f in KEY_FIELD_FAMILIES]
                item.error(f"unknown key field '{path}'{_closest(path, options)}")
            elif path in fields:
                item.error(f"duplicate key field '{path}'")
            else:
                fields.append(path)
                getters.append(getter)
        return tuple(fields), tuple(getters)


# Probed by gateway.policy.builtin_actions.default_registry (EXTENSION_MODULES). Stateless.
QUOTA_ACTION = QuotaActionSpec()
