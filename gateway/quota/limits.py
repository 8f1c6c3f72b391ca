"""Compiled quota limits and the context fields a limit may be keyed on."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from gateway.context import RequestContext
from gateway.store.base import Algorithm
from gateway.store.breaker import FailureMode

KeyGetter = Callable[[RequestContext], str | None]

# A missing key value (e.g. no account on an anonymous request) is keyed as this marker, so
# all such requests share one bucket rather than escaping the limit.
MISSING = "~"


class LimitKind(StrEnum):
    REQUESTS = "requests"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    TOTAL_TOKENS = "total_tokens"
    SPEND = "spend"
    CONCURRENCY = "concurrency"

    @property
    def algorithm(self) -> Algorithm:
        if self is LimitKind.REQUESTS:
            return Algorithm.GCRA
        if self is LimitKind.CONCURRENCY:
            return Algorithm.LEASE
        return Algorithm.WINDOW

    @property
    def is_tokens(self) -> bool:
        return self in (LimitKind.INPUT_TOKENS, LimitKind.OUTPUT_TOKENS, LimitKind.TOTAL_TOKENS)


def _str(value: object) -> str | None:
    return None if value is None else str(value)


def _ip_prefix(ctx: RequestContext) -> str | None:
    """The /24 (IPv4) or /48 (IPv6) network, as ``ipaddress.ip_network(..., strict=False)``
    prints it (memoised on the client: the risk signals use it too)."""
    client = ctx.client
    ip = client.ip or client.peer_ip
    if ip is None:
        return None
    return client.network(ip)[1]


def _client_ip(ctx: RequestContext) -> str | None:
    return _str(ctx.client.ip or ctx.client.peer_ip)


# Read-only table: field path → getter. Extend here when the context grows.
KEY_FIELDS: Mapping[str, KeyGetter] = MappingProxyType({
    "principal.account": lambda ctx: ctx.principal.account,
    "principal.org": lambda ctx: ctx.principal.org,
    "principal.key_id": lambda ctx: ctx.principal.key_id,
    "principal.tier": lambda ctx: ctx.principal.tier,
    "principal.source": lambda ctx: ctx.principal.source,
    "client.ip": _client_ip,
    "client.ip_prefix": _ip_prefix,
    "client.asn": lambda ctx: _str(ctx.client.asn),
    "client.country": lambda ctx: ctx.client.country,
    "request.model": lambda ctx: ctx.request.model,
    "request.route": lambda ctx: ctx.request.route,
    "request.api": lambda ctx: ctx.request.api.value,
    "risk.cluster_id": lambda ctx: ctx.risk.cluster_id,
    "risk.template_id": lambda ctx: ctx.risk.template_id,
})
# Open-ended families: ``principal.claims.<name>``, ``principal.attributes.<name>``.
KEY_FIELD_FAMILIES = ("principal.claims.", "principal.attributes.")


def key_getter(path: str) -> KeyGetter | None:
    """The getter for a key field path, or None if the path is not a known field."""
    getter = KEY_FIELDS.get(path)
    if getter is not None:
        return getter
    if path.startswith("principal.claims.") and len(path) > len("principal.claims."):
        claim = path[len("principal.claims."):]
        return lambda ctx: _str(ctx.principal.claims.get(claim))
    if path.startswith("principal.attributes.") and len(path) > len("principal.attributes."):
        attr = path[len("principal.attributes."):]
        return lambda ctx: _str(ctx.principal.attributes.get(attr))
    return None


def _escape(value: str) -> str:
    # Keep identities unambiguous ('|' separates parts) and braces out of Redis hash tags.
    return (value.replace("%", "%25").replace("|", "%7C")
            .replace("{", "%7B").replace("}", "%7D"))


@dataclass(frozen=True, slots=True)
class CompiledLimit:
    """One limit of a quota action, in store units (micro-USD for spend)."""

    name: str
    kind: LimitKind
    limit: int
    period: float | None  # seconds; None for concurrency (lease TTL comes from settings)
    burst: int = 1
    lease_ttl: float | None = None
    key_fields: tuple[str, ...] = ()
    getters: tuple[KeyGetter, ...] = field(default=(), compare=False, repr=False)
    # Per rule id: the escaped head "q|rule|name|kind" and each key field's "|path=" (built once:
    # a key is built for every key value the quota stage has not seen, i.e. every new account).
    _templates: dict[str, tuple[str, tuple[str, ...]]] = field(
        default_factory=dict, init=False, compare=False, repr=False)

    def identity(self, rule_id: str, ctx: RequestContext) -> str:
        """Store key: (rule id, name, kind, key fields and values), never the numbers, so state
        survives a reload while changed numbers apply at once. Each part is escaped, and the
        parts joined by '|': ``q|rule|name|kind|path=value...``."""
        return self.identity_of(rule_id, [getter(ctx) for getter in self.getters])

    def identity_of(self, rule_id: str, values: Sequence[str | None]) -> str:
        """:meth:`identity` from the key fields' values, already read (in ``key_fields`` order)."""
        template = self._templates.get(rule_id)
        if template is None:
            template = self._templates[rule_id] = (
                "|".join([_escape(p) for p in ("q", rule_id, self.name, self.kind.value)]),
                tuple([f"|{_escape(path)}=" for path in self.key_fields]))  # '=' is never escaped
        head, prefixes = template
        parts = [head]
        for prefix, value in zip(prefixes, values, strict=True):
            parts.append(prefix)
            parts.append(MISSING if value is None else _escape(str(value)))
        return "".join(parts)

    def describe(self) -> str:
        """Human text for messages: ``60 requests per 1m``, ``$5.00 spend per 1d``."""
        amount = f"${self.limit / 1e6:,.2f}" if self.kind is LimitKind.SPEND else f"{self.limit:,}"
        unit = "" if self.kind is LimitKind.SPEND else " " + self.kind.value.replace("_", " ")
        if self.kind is LimitKind.CONCURRENCY:
            return f"{self.limit:,} concurrent requests"
        return f"{amount}{unit} per {format_period(self.period or 0)}"


@dataclass(frozen=True, slots=True)
class QuotaAction:
    """What ``QuotaActionSpec.parse`` returns: a rule's limits and its failure mode."""

    limits: tuple[CompiledLimit, ...]
    on_store_failure: FailureMode | None = None  # None: the gateway default


def format_period(seconds: float) -> str:
    """Shortest exact unit: 60 → ``1m``, 86400 → ``1d``, 90 → ``90s``."""
    for unit, size in (("mo", 30 * 86400), ("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
