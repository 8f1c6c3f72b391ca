"""Rate-limit response headers, built from the states of the limits actually enforced.

* IETF draft-ietf-httpapi-ratelimit-headers: ``RateLimit-Policy: "rpm";q=60;w=60`` and
  ``RateLimit: "rpm";r=41;t=17``; ``qu="requests"``/``"concurrent-requests"`` where the draft
  has a unit, else the vendor parameter ``tg-unit`` (input_tokens, output_tokens, total_tokens,
  usd-micros).
* OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, reset as a Go duration.
* Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-*``, reset as
  an RFC 3339 time.
When several limits of one family apply, the aliases show the most restrictive one (fewest
remaining), which is the one that will deny first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.quota.limits import CompiledLimit, LimitKind
from gateway.store.base import LimitState


@dataclass(frozen=True, slots=True)
class HeaderItem:
    """One enforced limit as seen by this request."""

    name: str  # policy name in the IETF fields (unique within the response)
    limit: CompiledLimit
    state: LimitState


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration`` (OpenAI's style): ``6m0s``, ``1.5s``, ``120ms``."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rfc3339(epoch: float) -> str:
    """UTC time rounded up to the second: a client waiting until then will find capacity."""
    return datetime.fromtimestamp(math.ceil(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sf_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unit(kind: LimitKind) -> str:
    if kind is LimitKind.REQUESTS:
        return 'qu="requests"'
    if kind is LimitKind.CONCURRENCY:
        return 'qu="concurrent-requests"'
    if kind is LimitKind.SPEND:
        return 'tg-unit="usd-micros"'
    return f'tg-unit="{kind.value}"'


def _tightest(items: Sequence[HeaderItem], pick: Callable[[LimitKind], bool]) -> HeaderItem | None:
    chosen = [i for i in items if pick(i.limit.kind)]
    if not chosen:
        return None
    return min(chosen, key=lambda i: (i.state.remaining, i.limit.limit))


def build_headers(items: Sequence[HeaderItem], now: float) -> dict[str, str]:
    """All rate-limit headers for one response; ``now`` is the store's time."""
    if not items:
        return {}
    headers: dict[str, str] = {}
    policies: list[str] = []
    states: list[str] = []
    for item in items:
        window = "" if item.limit.period is None else f";w={math.ceil(item.limit.period)}"
        policies.append(f"{_sf_string(item.name)};q={item.limit.limit}{window};{_unit(item.limit.kind)}")
        states.append(f"{_sf_string(item.name)};r={item.state.remaining};t={math.ceil(item.state.reset)}")
    headers["RateLimit-Policy"] = ", ".join(policies)
    headers["RateLimit"] = ", ".join(states)

    openai = {
        "requests": _tightest(items, lambda k: k is LimitKind.REQUESTS),
        "tokens": _tightest(items, lambda k: k.is_tokens),
    }
    for family, tight in openai.items():
        if tight is not None:
            headers[f"x-ratelimit-limit-{family}"] = str(tight.limit.limit)
            headers[f"x-ratelimit-remaining-{family}"] = str(tight.state.remaining)
            headers[f"x-ratelimit-reset-{family}"] = go_duration(tight.state.reset)

    anthropic = {
        "requests": _tightest(items, lambda k: k is LimitKind.REQUESTS),
        "tokens": _tightest(items, lambda k: k.is_tokens),
        "input-tokens": _tightest(items, lambda k: k is LimitKind.INPUT_TOKENS),
        "output-tokens": _tightest(items, lambda k: k is LimitKind.OUTPUT_TOKENS),
    }
    for family, tight in anthropic.items():
        if tight is not None:
            headers[f"anthropic-ratelimit-{family}-limit"] = str(tight.limit.limit)
            headers[f"anthropic-ratelimit-{family}-remaining"] = str(tight.state.remaining)
            headers[f"anthropic-ratelimit-{family}-reset"] = rfc3339(now + tight.state.reset)
    return headers
