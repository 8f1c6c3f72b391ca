"""Rate-limit header formatting: IETF draft fields and the OpenAI/Anthropic aliases."""

from __future__ import annotations

import pytest

from gateway.context import ApiFamily
from gateway.quota.headers import HeaderBuilder, HeaderItem, build_headers, go_duration, rfc3339
from gateway.quota.limits import LimitKind
from gateway.store.base import LimitState
from tests.support.quota_ctx import limit


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0004, "1ms"), (0.12, "120ms"), (1, "1s"), (1.5, "1.5s"), (8.64, "8.64s"),
    (59.9991, "1m0s"), (360, "6m0s"), (3725.25, "1h2m5.25s"), (86400, "24h0m0s"),
    (-1, "0s"), (0.999, "999ms"), (59.999, "59.999s"), (61.01, "1m1.01s"),
    (2.007, "2.007s"), (1234.567, "20m34.567s"),  # 2.007 * 1000 = 2007.0000000000002: not 2.008s
])
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_rfc3339_rounds_up_to_the_second() -> None:
    assert rfc3339(1_700_000_000.2) == "2023-11-14T22:13:21Z"


def test_build_headers_are_consistent_with_the_limits() -> None:
    def item(name: str, kind: LimitKind, amount: int, per: float | None, left: int,
             reset: float) -> HeaderItem:
        return HeaderItem(name, limit(name, kind, amount, per), LimitState(True, amount, left, reset, 0))

    items = [
        item("rpm", LimitKind.REQUESTS, 60, 60, 41, 17.2),
        item("itpm", LimitKind.INPUT_TOKENS, 10000, 60, 9000, 60),
        item("otpd", LimitKind.OUTPUT_TOKENS, 5000, 86400, 100, 360),
        item("usd", LimitKind.SPEND, 5_000_000, 86400, 1, 5),
        item("conc", LimitKind.CONCURRENCY, 4, None, 3, 0),
    ]
    headers = build_headers(items, now=1_700_000_000.0)
    assert headers["RateLimit-Policy"] == (
        '"rpm";q=60;w=60;qu="requests", "itpm";q=10000;w=60;tg-unit="input_tokens", '
        '"otpd";q=5000;w=86400;tg-unit="output_tokens", "usd";q=5000000;w=86400;tg-unit="usd-micros", '
        '"conc";q=4;qu="concurrent-requests"')
    assert headers["RateLimit"] == (
        # the concurrency limit has no window, so no t
        '"rpm";r=41;t=18, "itpm";r=9000;t=60, "otpd";r=100;t=360, "usd";r=1;t=5, "conc";r=3')
    # OpenAI: requests from rpm; tokens = the token limit with the fewest remaining (otpd)
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "41"
    assert headers["x-ratelimit-reset-requests"] == "17.2s"
    assert headers["x-ratelimit-limit-tokens"] == "5000"
    assert headers["x-ratelimit-remaining-tokens"] == "100"
    assert headers["x-ratelimit-reset-tokens"] == "6m0s"
    # Anthropic: RFC 3339 resets, per-family limits
    assert headers["anthropic-ratelimit-requests-reset"] == "2023-11-14T22:13:38Z"
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "10000"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "9000"
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "100"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "100"
    assert headers["anthropic-ratelimit-tokens-reset"] == "2023-11-14T22:19:20Z"


def test_no_items_no_headers() -> None:
    assert build_headers([], 0.0) == {}


def test_policy_names_are_quoted_strings() -> None:
    item = HeaderItem('we"ird', limit("x", LimitKind.REQUESTS, 1, 1), LimitState(True, 1, 0, 1, 0))
    assert build_headers([item], 0.0)["RateLimit"] == '"we\\"ird";r=0;t=1'


def _items() -> list[HeaderItem]:
    return [
        HeaderItem("rpm", limit("rpm", LimitKind.REQUESTS, 60, 60), LimitState(True, 60, 41, 17.2, 0)),
        HeaderItem("tpm", limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60), LimitState(True, 1000, 900, 60, 0)),
        HeaderItem("otpd", limit("otpd", LimitKind.OUTPUT_TOKENS, 5000, 86400),
                   LimitState(True, 5000, 100, 360, 0)),
    ]


def test_aliases_follow_the_api_family_of_the_route() -> None:
    both = build_headers(_items(), 1_700_000_000.0)
    openai = build_headers(_items(), 1_700_000_000.0, ApiFamily.OPENAI)
    anthropic = build_headers(_items(), 1_700_000_000.0, ApiFamily.ANTHROPIC)
    ietf = {"RateLimit-Policy", "RateLimit"}
    assert set(openai) == ietf | {f"x-ratelimit-{f}-{u}" for f in ("limit", "remaining", "reset")
                                  for u in ("requests", "tokens")}
    assert set(anthropic) == ietf | {f"anthropic-ratelimit-{u}-{f}" for f in ("limit", "remaining", "reset")
                                     for u in ("requests", "tokens", "output-tokens")}
    # each family's fields are exactly what the both-families form carries
    assert both == {**openai, **anthropic}
    assert list(both) == list(openai) + [k for k in anthropic if k not in ietf]


def test_alias_tie_break_fewest_remaining_then_smallest_limit_then_first() -> None:
    def rpm(name: str, amount: int, left: int) -> HeaderItem:
        return HeaderItem(name, limit(name, LimitKind.REQUESTS, amount, 60),
                          LimitState(True, amount, left, 1, 0))

    def shown(items: list[HeaderItem]) -> str:
        return build_headers(items, 0.0, ApiFamily.OPENAI)["x-ratelimit-limit-requests"]

    assert shown([rpm("a", 100, 5), rpm("b", 10, 6)]) == "100"  # fewest remaining wins
    assert shown([rpm("a", 100, 5), rpm("b", 10, 5)]) == "10"  # tie: smaller limit
    assert shown([rpm("a", 10, 5), rpm("b", 10, 5), rpm("c", 20, 5)]) == "10"
    first = build_headers([rpm("a", 10, 5), HeaderItem("b", limit("b", LimitKind.REQUESTS, 10, 1),
                                                       LimitState(True, 10, 5, 9, 0))], 0.0, ApiFamily.OPENAI)
    assert first["x-ratelimit-reset-requests"] == "1s"  # full tie: the first written


def test_layout_is_reused_and_renders_fresh_numbers() -> None:
    builder = HeaderBuilder()
    items = _items()
    one = builder.build(items, 1_700_000_000.0, ApiFamily.ANTHROPIC)
    moved = [item._replace(state=LimitState(True, item.state.limit, item.state.remaining - 1, 1.5, 0))
             for item in items]
    two = builder.build(moved, 1_700_000_000.0, ApiFamily.ANTHROPIC)
    named = [(i.name, i.limit) for i in moved]
    assert builder.layout([(i.name, i.limit) for i in items]) is builder.layout(named)
    assert one["RateLimit-Policy"] == two["RateLimit-Policy"]
    assert two["RateLimit"] == '"rpm";r=40;t=2, "tpm";r=899;t=2, "otpd";r=99;t=2'
    assert two["anthropic-ratelimit-requests-reset"] == "2023-11-14T22:13:22Z"
    assert two == build_headers(moved, 1_700_000_000.0, ApiFamily.ANTHROPIC)
