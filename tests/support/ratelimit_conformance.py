"""The rate-limit headers checked against what their readers expect: ``RateLimit-Policy`` and
``RateLimit`` against draft-ietf-httpapi-ratelimit-headers-11 (parsed strictly), and the OpenAI
and Anthropic aliases in the formats those APIs send, consistent with the IETF items."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal

from gateway.context import ApiFamily
from gateway.quota.headers import SF_INTEGER_MAX, HeaderItem
from gateway.quota.limits import LimitKind
from tests.support.structured_fields import Params, parse_sf_list

REGISTERED_UNITS = {"requests", "content-bytes", "concurrent-requests"}  # draft-11 §3.1.2
TOKEN_KINDS = (LimitKind.INPUT_TOKENS, LimitKind.OUTPUT_TOKENS, LimitKind.TOTAL_TOKENS)
GO_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d{1,3})?)s|(\d+)ms)")
RFC3339_SECOND = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def ietf(headers: Mapping[str, str]) -> tuple[dict[str, Params], dict[str, Params]]:
    """Both IETF fields, parsed strictly and checked against draft-11 §3 and §4 (field names in
    any case, as HTTP clients may lower them)."""
    fields = {name.lower(): value for name, value in headers.items()}
    policies = parse_sf_list(fields["ratelimit-policy"])
    limits = parse_sf_list(fields["ratelimit"])
    policy: dict[str, Params] = {}
    for value, params in policies:
        assert type(value) is str, value  # §3: the Item value MUST be a String
        assert value not in policy  # one item per policy
        assert isinstance(params["q"], int) and params["q"] >= 0  # §3.1.1: REQUIRED, non-negative
        if "w" in params:
            assert isinstance(params["w"], int) and params["w"] > 0  # §3.1.3: non-zero seconds
        if "qu" in params:
            assert params["qu"] in REGISTERED_UNITS and type(params["qu"]) is str  # §3.1.2
        assert all(k in ("q", "w", "qu") or k.startswith("tg-") for k in params)  # vendor-prefixed
        policy[value] = params
    state: dict[str, Params] = {}
    for value, params in limits:
        assert type(value) is str and value in policy and value not in state
        assert isinstance(params["r"], int) and params["r"] >= 0  # §4.1.1
        if "t" in params:
            assert isinstance(params["t"], int) and params["t"] >= 0  # §4.1.2
        assert set(params) <= {"r", "t"}
        state[value] = params
    assert list(state) == list(policy)  # every policy has its service limit, in the same order
    return policy, state


def go_seconds(text: str) -> float:
    match = GO_DURATION.fullmatch(text)
    assert match, text
    hours, minutes, seconds, millis = match.groups()
    if millis is not None:
        assert not hours and not minutes and 0 < int(millis) < 1000
        return int(millis) / 1000
    if hours:
        assert minutes is not None  # Go writes 1h0m0s, never 1h0s
    if hours or minutes:
        assert float(seconds) < 60 and (not hours or int(minutes) < 60)
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


def check_aliases(headers: dict[str, str], items: Sequence[HeaderItem], now: float,
                  api: ApiFamily | None, precise: bool = True) -> None:
    """Each alias triple describes one enforced limit of its family, the one with the fewest
    remaining, with exactly the numbers of that limit's IETF item (same instant for the reset).
    ``precise``: the items' resets are the exact ones (else only the IETF ``t``, whole seconds)."""
    policy, state = ietf(headers)
    families: list[tuple[str, str, str, tuple[LimitKind, ...], str]] = []
    if api is not ApiFamily.ANTHROPIC:
        families += [(f"x-ratelimit-limit-{u}", f"x-ratelimit-remaining-{u}", f"x-ratelimit-reset-{u}", kinds,
                      "go") for u, kinds in (("requests", (LimitKind.REQUESTS,)), ("tokens", TOKEN_KINDS))]
    if api is not ApiFamily.OPENAI:
        families += [(f"anthropic-ratelimit-{u}-limit", f"anthropic-ratelimit-{u}-remaining",
                      f"anthropic-ratelimit-{u}-reset", kinds, "rfc3339")
                     for u, kinds in (("requests", (LimitKind.REQUESTS,)), ("tokens", TOKEN_KINDS),
                                      ("input-tokens", (LimitKind.INPUT_TOKENS,)),
                                      ("output-tokens", (LimitKind.OUTPUT_TOKENS,)))]
    for name_limit, name_remaining, name_reset, kinds, style in families:
        members = [item for item in items if item.limit.kind in kinds]
        if not members:
            assert name_limit not in headers and name_remaining not in headers and name_reset not in headers
            continue
        least = min(item.state.remaining for item in members)
        assert headers[name_remaining] == str(least)
        shown = [item for item in members if item.state.remaining == least
                 and str(item.limit.limit) == headers[name_limit]]
        assert shown, (name_limit, headers[name_limit])
        item = shown[0]
        assert str(state[item.name]["r"]) == headers[name_remaining]
        assert policy[item.name]["q"] == min(item.limit.limit, SF_INTEGER_MAX)
        t = state[item.name]["t"]
        if style == "go":
            seconds = go_seconds(headers[name_reset])
            if precise:  # the reset rounded up to the millisecond (the float's intended value)
                assert seconds == max(0, math.ceil(Decimal(repr(item.state.reset)) * 1000)) / 1000
            assert math.ceil(seconds) == t
        else:
            assert RFC3339_SECOND.fullmatch(headers[name_reset])
            at = datetime.fromisoformat(headers[name_reset]).timestamp()
            if precise:  # when it is back to full, rounded up to the second
                assert at == math.ceil(now + item.state.reset)
            assert now + t - 1 <= at <= now + t + 1  # the same instant as t, to the second
