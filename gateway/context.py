"""The one typed object a request carries through the pipeline.

Every stage reads and writes a :class:`RequestContext`. Policy conditions read it through
dotted paths (``request.model``, ``principal.tier``, ``client.country``, ``risk.score``,
``time.hour``); see :mod:`gateway.policy.fields` for the path → getter table.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ApiFamily(StrEnum):
    """Which provider API grammar a route speaks (request fields, SSE events, error bodies)."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(slots=True)
class RequestView:
    """What a policy may know about the request itself (``request.*``).

    Filled by the API adapter from the parsed JSON body; never holds prompt text beyond
    ``body`` (which stays in memory only and is never logged or audited).
    """

    api: ApiFamily
    route: str  # logical route name, e.g. "chat.completions", "messages", "embeddings"
    path: str
    method: str
    headers: Mapping[str, str]
    body: dict[str, Any] | None = None
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None
    logit_bias: bool = False
    reasoning: bool = False  # reasoning/thinking explicitly requested
    reasoning_budget: int | None = None
    input_tokens_estimate: int = 0
    body_bytes: int = 0
    # From the route: whether the model consumes the prompt (count_tokens and models do not) and
    # whether it produces output (embeddings do not); quotas reserve only what can be consumed.
    billed: bool = True
    generates: bool = True


@dataclass(slots=True)
class Principal:
    """Who is calling (``principal.*``): resolved by the identity stage."""

    authenticated: bool = False
    source: str | None = None  # "api_key" | "jwt"
    key_id: str | None = None
    account: str | None = None
    org: str | None = None
    tier: str | None = None
    created_at: float | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    attributes: Mapping[str, Any] = field(default_factory=dict)
    issuer: str | None = None  # the JWT issuer (``iss``) that vouched for a "jwt" principal


@dataclass(slots=True)
class ClientInfo:
    """Where the request comes from (``client.*``): client_ip and geo stages."""

    peer_ip: IPAddress | None = None
    ip: IPAddress | None = None  # normalised (IPv4-mapped/6to4/Teredo → IPv4)
    forwarded_chain: tuple[str, ...] = ()
    country: str | None = None
    registered_country: str | None = None
    asn: int | None = None
    as_org: str | None = None
    is_anonymous: bool = False
    is_anonymous_vpn: bool = False
    is_hosting_provider: bool = False
    is_tor_exit_node: bool = False
    is_public_proxy: bool = False
    is_residential_proxy: bool = False
    # network() memo: the address it was worked out for, and (text, prefix)
    _network_of: IPAddress | None = field(default=None, repr=False, compare=False)
    _network: tuple[str, str] = field(default=("", ""), repr=False, compare=False)

    def network(self, ip: IPAddress) -> tuple[str, str]:
        """``(str(ip), its /24 or /48 prefix)`` for one of this client's addresses: worked out
        once per request, although the risk signals, quota keys and policy fields all use it."""
        if self._network_of is not ip:
            self._network = _network_text(ip)
            self._network_of = ip
        return self._network


def _network_text(ip: IPAddress) -> tuple[str, str]:
    """``(str(ip), prefix)`` with the /24 (IPv4) or /48 (IPv6) network as
    ``str(ip_network((ip, bits), strict=False))`` prints it. /24 and /48 are the usual allocation
    granularity: one customer or one hosting block. The network is masked from the address
    integer (``ip_network`` re-parses text: ~10x slower), IPv4 formatted without ``ipaddress``."""
    n = int(ip)
    if ip.version == 4:
        net = f"{n >> 24}.{n >> 16 & 255}.{n >> 8 & 255}"
        return f"{net}.{n & 255}", f"{net}.0/24"
    return str(ip), f"{ipaddress.IPv6Address(n & _V6_MASK_48)}/48"


_V6_MASK_48 = ((1 << 48) - 1) << 80


@dataclass(slots=True)
class RiskInfo:
    """Distillation risk (``risk.*``): filled by the risk stage."""

    score: float = 0.0
    signals: dict[str, float] = field(default_factory=dict)
    cluster_id: str | None = None
    cluster_score: float = 0.0
    cluster_size: int = 0
    template_id: str | None = None


@dataclass(slots=True)
class Usage:
    """Token usage of one response, accumulated incrementally while it streams."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    complete: bool = False  # True when the upstream reported final usage

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Shaping:
    """Edits applied to a response on its way back (set by friction; default: none)."""

    strip_reasoning: bool = False
    strip_logprobs: bool = False

    @property
    def active(self) -> bool:
        return self.strip_reasoning or self.strip_logprobs


NO_SHAPING = Shaping()


@dataclass(slots=True)
class Decision:
    """A short-circuit answer produced by a stage instead of forwarding upstream."""

    status: int
    error_type: str  # neutral error kind, mapped per API family by gateway.errors
    message: str
    rule_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    retryable: bool = False
    code: str | None = None  # machine-readable code for the OpenAI shape
    # The OpenAI shape's ``type`` where the kind's is too coarse: OpenAI's 429 says which limit
    # was hit, "tokens" or "requests" (the Anthropic shape has one type per kind).
    openai_type: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # extra fields in the error body


@dataclass(slots=True)
class RequestContext:
    """Everything known about one request; created once, passed to every stage."""

    request_id: str
    request: RequestView
    started: float = field(default_factory=time.perf_counter)
    wall_time: float = field(default_factory=time.time)
    principal: Principal = field(default_factory=Principal)
    client: ClientInfo = field(default_factory=ClientInfo)
    risk: RiskInfo = field(default_factory=RiskInfo)
    usage: Usage = field(default_factory=Usage)
    # Set by the policy stage: the evaluated outcome (gateway.policy.evaluate.Outcome).
    outcome: Any = None
    policy_revision: str | None = None
    tags: set[str] = field(default_factory=set)
    # Extra response headers added by stages (rate-limit fields, friction notices).
    response_headers: dict[str, str] = field(default_factory=dict)
    # Request-body edits applied by friction/degrade before forwarding (view.body was edited).
    body_modified: bool = False
    shaping: Shaping = NO_SHAPING
    first_byte_delay: float = 0.0  # tarpit: seconds to hold the response before its first byte
    pace_tokens_per_s: float | None = None  # tarpit: relay streamed output at most this fast
    decision: Decision | None = None
    status: int = 0
    upstream_status: int | None = None
    upstream_started: float | None = None
    upstream_ttfb: float | None = None
    # The gateway knows the model consumed nothing: the request was never written upstream, or a
    # stopping gateway abandoned it and told the client to retry (the retry pays). Settling
    # (gateway.settling.consumed_usage) then charges nothing whatever the reservations were.
    nothing_consumed: bool = False
    finished: float | None = None
    client_disconnected: bool = False
    # Free-form per-stage notes that reach the audit record (never prompt text). Values are what
    # orjson serialises, which includes orjson.Fragment: JSON already serialised, which a hot path
    # may build from a template instead of a tree of dicts (see QuotaStage._admitted).
    audit: dict[str, Any] = field(default_factory=dict)
