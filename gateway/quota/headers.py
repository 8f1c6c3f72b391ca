"""Rate-limit response headers, built from the states of the limits actually enforced.

* IETF draft-ietf-httpapi-ratelimit-headers-11 (structured-field Lists, RFC 9651):
  ``RateLimit-Policy: "rpm";q=60;w=60;qu="requests"`` and ``RateLimit: "rpm";r=41;t=17``.
  ``qu`` where the draft's unit registry has the unit (``requests``, ``concurrent-requests``),
  else the vendor parameter ``tg-unit`` (input_tokens, output_tokens, total_tokens, usd-micros).
  A concurrency limit has no window: no ``w``, and no ``t`` (its reset is always 0). Numbers
  above the largest structured-field Integer (15 digits) are written as that Integer (the
  fields would not parse otherwise). Always sent.
* OpenAI: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, reset as a Go duration.
  Sent on OpenAI routes only.
* Anthropic: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-*``, reset as
  an RFC 3339 time. Sent on Anthropic routes only.

``t`` and every alias reset are the same instant: when the limit is back to full (rounded up to
the second; to the millisecond in the Go duration). When several limits of one alias family
apply, the aliases show the one with the fewest remaining (ties: smaller limit, then first
written): its limit, remaining and reset, exactly as its ``RateLimit`` item says. Fewest
remaining is a bound every limit of the family respects: a request within it fits them all.

Built on every quota-checked response, so the work is split in two: a :class:`HeaderLayout` holds
everything that depends only on *which* limits are enforced (the whole ``RateLimit-Policy``
value, each limit's ``RateLimit`` prefix, the alias candidates of every family already ordered
for the tie-break, the limit numbers as text) and is built once per combination of limits; per
response only the numbers that move (remaining, reset) are formatted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from gateway.context import ApiFamily
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
# Resets and retries are whole milliseconds divided by 1000, so ``seconds * 1000`` can come out a
# float error above the integer (2.007 * 1000 = 2007.0000000000002) and round up to one more;
# this slack, in milliseconds, is far below one and above that error for every period up to 1mo.
MS_SLACK = 1e-4
# The largest structured-field Integer (RFC 9651 §3.3.1: at most 15 digits).
SF_INTEGER_MAX = 999_999_999_999_999

# Alias candidates of one family: (position in the layout, limit as text), ordered by
# (limit, position) so that "fewest remaining, first in that order" is the documented tie-break.
_Candidates = tuple[tuple[int, str], ...]


class HeaderItem(NamedTuple):
    """One enforced limit as seen by this request (a tuple: built per limit per request)."""

    name: str  # policy name in the IETF fields (unique within the response)
    limit: CompiledLimit
    state: LimitState


def go_duration(seconds: float) -> str:
    """Format like Go's ``time.Duration`` (OpenAI's style): ``6m0s``, ``1.5s``, ``120ms``;
    rounded up to the millisecond."""
    ms = math.ceil(seconds * 1000 - MS_SLACK)
    if ms < 1000:
        return _MILLIS[ms] if ms > 0 else "0s"
    whole, frac = divmod(ms, 1000)
    head = _WHOLE_SECONDS.get(whole)
    if head is None:
        if len(_WHOLE_SECONDS) >= MEMO_ENTRIES:
            _WHOLE_SECONDS.clear()
        head = _WHOLE_SECONDS[whole] = _go_whole_seconds(whole)
    return head + _FRACTIONS[frac]


# The reset of a day-long token budget changes every millisecond, so the text is put together
# from parts: the whole seconds (which change once a second: memoised) and the fraction (a table).
_MILLIS = tuple(f"{ms}ms" for ms in range(1000))
_FRACTIONS = tuple(f".{ms:03d}".rstrip("0") + "s" if ms else "s" for ms in range(1000))
_WHOLE_SECONDS: dict[int, str] = {}


def _go_whole_seconds(whole: int) -> str:
    """``59``, ``1m0``, ``23h59m59``: a duration of ``whole`` seconds before its fraction."""
    if whole < 60:
        return str(whole)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}" if hours else f"{minutes}m{secs}"


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


def _policy(name: str, lim: CompiledLimit) -> str:
    window = "" if lim.period is None else f";w={math.ceil(lim.period)}"
    return f"{_sf_string(name)};q={min(lim.limit, SF_INTEGER_MAX)}{window};{_unit(lim.kind)}"


def _service_limit(name: str, lim: CompiledLimit) -> str:
    """One limit's ``RateLimit`` item as a %-format taking (remaining, reset). A concurrency limit
    has no time window (its reset is always 0), so its item has no ``t``: ``%.0s`` takes the
    reset and writes nothing, which keeps every item's arguments alike."""
    tail = ";r=%d%.0s" if lim.kind is LimitKind.CONCURRENCY else ";r=%d;t=%d"
    return _sf_string(name).replace("%", "%%") + tail


def _beyond_sf_integers(lim: CompiledLimit) -> bool:
    """Whether a limit's remaining or reset could exceed :data:`SF_INTEGER_MAX`: remaining is at
    most the limit (or, for a request rate, its burst), the reset at most period × burst / limit
    (a request rate's tolerance) or one window and a bucket."""
    if lim.limit > SF_INTEGER_MAX or lim.burst > SF_INTEGER_MAX:
        return True
    return lim.period is not None and 2 * lim.period * lim.burst / lim.limit > SF_INTEGER_MAX


def _candidates(limits: Sequence[CompiledLimit], kinds: tuple[LimitKind, ...]) -> _Candidates:
    picked = [(lim.limit, i) for i, lim in enumerate(limits) if lim.kind in kinds]
    picked.sort()
    return tuple((i, str(amount)) for amount, i in picked)


def _tightest(candidates: _Candidates, states: Sequence[LimitState]) -> tuple[int, str]:
    """The candidate with the fewest remaining; ties go to the earlier one (smallest limit,
    then first written), as the candidates are ordered."""
    best = candidates[0]
    least = states[best[0]].remaining
    for candidate in candidates[1:]:
        remaining = states[candidate[0]].remaining
        if remaining < least:
            best, least = candidate, remaining
    return best


def _pick(candidates: _Candidates, states: Sequence[LimitState]) -> tuple[int, str]:
    """:func:`_tightest`, with the usual two candidates done inline."""
    if len(candidates) == 2:
        first, second = candidates
        return second if states[second[0]][2] < states[first[0]][2] else first
    return _tightest(candidates, states)


class HeaderLayout:
    """What the headers of one combination of enforced limits have in common: immutable once
    built, shared by every response with the same limits (see the module docstring)."""

    __slots__ = ("anthropic", "openai", "policy", "rate_format")

    def __new__(cls, named: Sequence[tuple[str, CompiledLimit]]) -> HeaderLayout:
        # Numbers a structured field cannot carry get the clamping subclass, so the usual layout
        # renders without a check per response.
        if cls is HeaderLayout and any(_beyond_sf_integers(lim) for _, lim in named):
            return object.__new__(_ClampedLayout)
        return object.__new__(cls)

    def __init__(self, named: Sequence[tuple[str, CompiledLimit]]) -> None:
        limits = [lim for _, lim in named]
        self.policy = ", ".join(_policy(name, lim) for name, lim in named)
        # The whole RateLimit value as one %-format (remaining, reset per limit): one formatting
        # operation per response instead of one f-string per limit and a join.
        self.rate_format = ", ".join(_service_limit(name, lim) for name, lim in named)
        requests = _candidates(limits, (LimitKind.REQUESTS,))
        tokens = _candidates(limits, (LimitKind.INPUT_TOKENS, LimitKind.OUTPUT_TOKENS,
                                      LimitKind.TOTAL_TOKENS))
        # (alias names, candidates) per family that has at least one limit, in writing order
        openai: list[tuple[tuple[str, str, str], _Candidates]] = [
            (_OPENAI_REQUESTS, requests), (_OPENAI_TOKENS, tokens)]
        anthropic: list[tuple[tuple[str, str, str], _Candidates]] = [
            (_ANTHROPIC_REQUESTS, requests), (_ANTHROPIC_TOKENS, tokens),
            (_ANTHROPIC_INPUT, _candidates(limits, (LimitKind.INPUT_TOKENS,))),
            (_ANTHROPIC_OUTPUT, _candidates(limits, (LimitKind.OUTPUT_TOKENS,)))]
        self.openai = tuple(family for family in openai if family[1])
        self.anthropic = tuple(family for family in anthropic if family[1])

    def render(self, states: Sequence[LimitState], now: float, api: ApiFamily | None,
               times: dict[int, str] | None = None, into: dict[str, str] | None = None) -> dict[str, str]:
        """The headers for ``states`` (one per limit, in layout order); ``now`` is the store's
        time; aliases of ``api`` only (``None``: both families). ``times`` memoises RFC 3339
        text per second across calls. Written into ``into`` (returned) when given, else into a
        new dict: the stage renders straight into the response's headers."""
        ceil = math.ceil
        if len(states) == 1:  # the usual sizes unrolled
            s0 = states[0]
            rate = self.rate_format % (s0[2], ceil(s0[3]))
        elif len(states) == 2:
            s0, s1 = states
            rate = self.rate_format % (s0[2], ceil(s0[3]), s1[2], ceil(s1[3]))
        elif len(states) == 3:
            s0, s1, s2 = states
            rate = self.rate_format % (s0[2], ceil(s0[3]), s1[2], ceil(s1[3]), s2[2], ceil(s2[3]))
        else:
            rate = self.rate_format % tuple([v for s in states for v in (s[2], ceil(s[3]))])
        headers = {} if into is None else into
        headers["RateLimit-Policy"] = self.policy
        headers["RateLimit"] = rate
        if api is not ApiFamily.ANTHROPIC:
            for names, candidates in self.openai:
                i, limit = candidates[0] if len(candidates) == 1 else _pick(candidates, states)
                state = states[i]
                headers[names[0]] = limit
                headers[names[1]] = str(state.remaining)
                headers[names[2]] = go_duration(state.reset)
        if api is not ApiFamily.OPENAI:
            if times is None:
                times = {}
            for names, candidates in self.anthropic:
                i, limit = candidates[0] if len(candidates) == 1 else _pick(candidates, states)
                state = states[i]
                headers[names[0]] = limit
                headers[names[1]] = str(state.remaining)
                second = math.ceil(now + state.reset)
                text = times.get(second)
                if text is None:
                    text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                    if len(times) >= MEMO_ENTRIES:
                        times.clear()
                    times[second] = text
                headers[names[2]] = text
        return headers


class _ClampedLayout(HeaderLayout):
    """A layout with a limit whose numbers may exceed :data:`SF_INTEGER_MAX` (a configuration no
    real quota has): the IETF fields show at most that Integer, the aliases the exact numbers."""

    __slots__ = ()

    def render(self, states: Sequence[LimitState], now: float, api: ApiFamily | None,
               times: dict[int, str] | None = None, into: dict[str, str] | None = None) -> dict[str, str]:
        headers = super().render(states, now, api, times, into)
        top = SF_INTEGER_MAX
        headers["RateLimit"] = self.rate_format % tuple(
            [v for s in states for v in (min(s.remaining, top), min(math.ceil(s.reset), top))])
        return headers


class HeaderBuilder:
    """Builds the rate-limit headers of one response; holds memo tables (layouts per combination
    of limits, RFC 3339 text per second), so keep one per stage (not thread-safe; the gateway
    runs one event loop per process)."""

    __slots__ = ("_layouts", "times")

    def __init__(self) -> None:
        # (names, limits) → layout; CompiledLimit compares by value, so a reload that keeps a
        # limit's numbers keeps its layout.
        self._layouts: dict[tuple[tuple[str, ...], tuple[CompiledLimit, ...]], HeaderLayout] = {}
        self.times: dict[int, str] = {}

    def layout(self, named: Sequence[tuple[str, CompiledLimit]]) -> HeaderLayout:
        """The (memoised) layout for these enforced limits, in this order."""
        memo = (tuple(name for name, _ in named), tuple(lim for _, lim in named))
        layout = self._layouts.get(memo)
        if layout is None:
            if len(self._layouts) >= MEMO_ENTRIES:
                self._layouts.clear()
            layout = self._layouts[memo] = HeaderLayout(named)
        return layout

    def build(self, items: Sequence[HeaderItem], now: float, api: ApiFamily | None = None) -> dict[str, str]:
        """All rate-limit headers for one response; ``now`` is the store's time; provider aliases
        of ``api`` only (``None``: both)."""
        if not items:
            return {}
        layout = self.layout([(item.name, item.limit) for item in items])
        return layout.render([item.state for item in items], now, api, self.times)


def build_headers(items: Sequence[HeaderItem], now: float, api: ApiFamily | None = None) -> dict[str, str]:
    """All rate-limit headers for one response; ``now`` is the store's time; provider aliases of
    ``api`` only (``None``: both). (The stage keeps a :class:`HeaderBuilder` instead, so its memo
    tables live across requests.)"""
    return HeaderBuilder().build(items, now, api)
