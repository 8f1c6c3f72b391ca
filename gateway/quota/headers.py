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

Built on every quota-checked response, so :class:`HeaderBuilder` memoises what repeats between
requests (a limit's policy fragment, RFC 3339 text per second) and picks the tightest limit of
every family in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from gateway.quota.limits import CompiledLimit, LimitKind
from gateway.store.base import LimitState

# Alias field names (limit, remaining, reset) per family, in the order they are written.
_OPENAI_REQUESTS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests")
_OPENAI_TOKENS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
_ANTHROPIC_REQUESTS = ("anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining",
                       "anthropic-ratelimit-requests-reset")
_ANTHROPIC_TOKENS = ("anthropic-ratelimit-tokens-limit", "anthropic-ratelimit-tokens-remaining",
                     "anthropic-ratelimit-tokens-reset")
_ANTHROPIC_INPUT = ("anthropic-ratelimit-input-tokens-limit", "anthropic-ratelimit-input-tokens-remaining",
                    "anthropic-ratelimit-input-tokens-reset")
_ANTHROPIC_OUTPUT = ("anthropic-ratelimit-output-tokens-limit", "anthropic-ratelimit-output-tokens-remaining",
                     "anthropic-ratelimit-output-tokens-reset")
# Memo tables are cleared when they reach this size (entries are tiny and cheap to rebuild).
MEMO_ENTRIES = 4096


class HeaderItem(NamedTuple):
    """One enforced limit as seen by this request (a tuple: built per limit per request)."""

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
    whole, frac = divmod(rest, 1000)
    # integer ms: "<s>.<ms>" without trailing zeros, exactly what "%.3f" then rstrip gives
    secs = f"{whole}.{frac:03d}".rstrip("0") if frac else str(whole)
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


def _tighter(a: HeaderItem | None, b: HeaderItem) -> HeaderItem:
    """The more restrictive of two (fewest remaining, then smallest limit; first on ties)."""
    if a is None:
        return b
    sa, sb = a.state.remaining, b.state.remaining
    if sb < sa or (sb == sa and b.limit.limit < a.limit.limit):
        return b
    return a


def _openai(headers: dict[str, str], names: tuple[str, str, str], item: HeaderItem) -> None:
    headers[names[0]] = str(item.limit.limit)
    headers[names[1]] = str(item.state.remaining)
    headers[names[2]] = go_duration(item.state.reset)


class HeaderBuilder:
    """Builds the rate-limit headers of one response; holds memo tables, so keep one per stage
    (not thread-safe; the gateway runs one event loop per process)."""

    __slots__ = ("_names", "_policies", "_times")

    def __init__(self) -> None:
        self._policies: dict[tuple[str, int, float | None, LimitKind], str] = {}
        self._names: dict[str, str] = {}
        self._times: dict[int, str] = {}

    def _name(self, name: str) -> str:
        quoted = self._names.get(name)
        if quoted is None:
            if len(self._names) >= MEMO_ENTRIES:
                self._names.clear()
            quoted = self._names[name] = _sf_string(name)
        return quoted

    def _policy(self, item: HeaderItem) -> str:
        lim = item.limit
        memo = (item.name, lim.limit, lim.period, lim.kind)
        text = self._policies.get(memo)
        if text is None:
            window = "" if lim.period is None else f";w={math.ceil(lim.period)}"
            text = f"{self._name(item.name)};q={lim.limit}{window};{_unit(lim.kind)}"
            if len(self._policies) >= MEMO_ENTRIES:
                self._policies.clear()
            self._policies[memo] = text
        return text

    def _rfc3339(self, epoch: float) -> str:
        second = math.ceil(epoch)
        text = self._times.get(second)
        if text is None:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if len(self._times) >= MEMO_ENTRIES:
                self._times.clear()
            self._times[second] = text
        return text

    def build(self, items: Sequence[HeaderItem], now: float) -> dict[str, str]:
        """All rate-limit headers for one response; ``now`` is the store's time."""
        if not items:
            return {}
        policies: list[str] = []
        states: list[str] = []
        requests = tokens = inputs = outputs = None
        for item in items:
            policies.append(self._policy(item))
            state = item.state
            states.append(f"{self._name(item.name)};r={state.remaining};t={math.ceil(state.reset)}")
            kind = item.limit.kind
            if kind is LimitKind.REQUESTS:
                requests = _tighter(requests, item)
            elif kind is LimitKind.INPUT_TOKENS:
                tokens = _tighter(tokens, item)
                inputs = _tighter(inputs, item)
            elif kind is LimitKind.OUTPUT_TOKENS:
                tokens = _tighter(tokens, item)
                outputs = _tighter(outputs, item)
            elif kind is LimitKind.TOTAL_TOKENS:
                tokens = _tighter(tokens, item)
        headers = {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}
        if requests is not None:
            _openai(headers, _OPENAI_REQUESTS, requests)
        if tokens is not None:
            _openai(headers, _OPENAI_TOKENS, tokens)
        if requests is not None:
            self._anthropic(headers, _ANTHROPIC_REQUESTS, requests, now)
        if tokens is not None:
            self._anthropic(headers, _ANTHROPIC_TOKENS, tokens, now)
        if inputs is not None:
            self._anthropic(headers, _ANTHROPIC_INPUT, inputs, now)
        if outputs is not None:
            self._anthropic(headers, _ANTHROPIC_OUTPUT, outputs, now)
        return headers

    def _anthropic(self, headers: dict[str, str], names: tuple[str, str, str], item: HeaderItem,
                   now: float) -> None:
        headers[names[0]] = str(item.limit.limit)
        headers[names[1]] = str(item.state.remaining)
        headers[names[2]] = self._rfc3339(now + item.state.reset)


def build_headers(items: Sequence[HeaderItem], now: float) -> dict[str, str]:
    """All rate-limit headers for one response; ``now`` is the store's time. (The stage keeps a
    :class:`HeaderBuilder` instead, so its memo tables live across requests.)"""
    return HeaderBuilder().build(items, now)
