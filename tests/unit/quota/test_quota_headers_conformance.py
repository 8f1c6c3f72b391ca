"""The rate-limit headers' syntax, over many combinations of limits and states.

* ``RateLimit-Policy`` and ``RateLimit`` against draft-ietf-httpapi-ratelimit-headers-11, read by a
  strict RFC 9651 structured-field List parser (tests/support/structured_fields.py, tested here);
* the OpenAI and Anthropic aliases in the formats those APIs send, and consistent with the IETF
  items (the same limit, the same instant).

The headers on every path of the quota stage are in test_quota_headers_stage_paths.py, the 429's
retry hints as the official SDKs read them in test_quota_headers_sdk_retry.py.
"""

from __future__ import annotations

import math
import random

import pytest

from gateway.context import ApiFamily
from gateway.quota.headers import SF_INTEGER_MAX, HeaderItem, build_headers, go_duration
from gateway.quota.limits import LimitKind
from gateway.store.base import LimitState
from tests.support.quota_ctx import limit
from tests.support.ratelimit_conformance import check_aliases, go_seconds, ietf
from tests.support.structured_fields import SFError, parse_sf_list

NOW = 1_700_000_000.125


@pytest.mark.parametrize("text", [
    '"burst";q=100;w=60,"daily";q=1000;w=86400',  # the draft's own examples
    '"peruser";q=65535;qu="content-bytes";w=10;pk=:sdfjLJUOUH==:',
    '"default";r=50;t=30', 'a, (b c);x=?1, "s\\"q"',
])
def test_the_parser_reads_valid_lists(text: str) -> None:
    assert parse_sf_list(text)


@pytest.mark.parametrize("text", [
    '"a";q=1,', ',"a"', '"a";Q=1', '"a";q=1000000000000000', '"a";q=1.0000', '"a";q=', '"a""b"',
    '"caf\u00e9"', '"a";q=1;;w=2', '"tab\there"', '"a"; q=1 x', '"bad\\n"',
])
def test_the_parser_is_strict(text: str) -> None:
    with pytest.raises(SFError):
        parse_sf_list(text)


# ---------------------------------------------------------------------------------------------
# The builder, over many combinations of limits and states.

KINDS = list(LimitKind)


def random_items(rng: random.Random) -> list[HeaderItem]:
    items = []
    for i in range(rng.randint(1, 6)):
        kind = rng.choice(KINDS)
        amount = rng.choice([1, 2, 60, 1000, 2_000_000, 10**9])
        per = None if kind is LimitKind.CONCURRENCY else rng.choice([1.0, 1.5, 60.0, 86400.0, 30 * 86400.0])
        burst = rng.choice([1, 3, 10]) if kind is LimitKind.REQUESTS else 1
        name = rng.choice(["rpm", "r-1.tpd", "a_b", "rule:x.lim"]) + str(i)
        remaining = rng.choice([0, 1, amount // 2, amount])
        reset = 0.0 if kind is LimitKind.CONCURRENCY else rng.choice(
            [0.0, 0.0004, 0.5, 1.0, 2.007, 59.9991, 86399.999, 90061.25])
        items.append(HeaderItem(name, limit(name, kind, amount, per, burst=burst),
                                LimitState(True, amount, remaining, reset, 0.0)))
    return items


@pytest.mark.parametrize("seed", range(200))
def test_every_combination_is_a_valid_list_with_consistent_aliases(seed: int) -> None:
    rng = random.Random(seed)
    items = random_items(rng)
    for api in (ApiFamily.OPENAI, ApiFamily.ANTHROPIC, None):
        headers = build_headers(items, NOW, api)
        check_aliases(headers, items, NOW, api)
        policy, state = ietf(headers)
        for item in items:
            if item.limit.kind is LimitKind.CONCURRENCY:
                assert "w" not in policy[item.name] and "t" not in state[item.name]
                assert policy[item.name]["qu"] == "concurrent-requests"
            else:
                assert policy[item.name]["w"] == math.ceil(item.limit.period or 0)
                assert state[item.name]["t"] == math.ceil(item.state.reset)
            if item.limit.kind is LimitKind.REQUESTS:
                assert policy[item.name]["qu"] == "requests"
            elif item.limit.kind is not LimitKind.CONCURRENCY:
                # no registered unit: a vendor parameter says what the units are
                assert "qu" not in policy[item.name] and policy[item.name]["tg-unit"]


def test_a_concurrency_limit_has_no_effective_window() -> None:
    # A lease limit has no window: its reset is always 0, and "t=0" would say the quota is
    # restored at once. The draft's example for a quota without a time window has no t.
    conc = HeaderItem("streams", limit("streams", LimitKind.CONCURRENCY, 4), LimitState(True, 4, 3, 0.0, 0.0))
    headers = build_headers([conc], NOW)
    assert headers["RateLimit-Policy"] == '"streams";q=4;qu="concurrent-requests"'
    assert headers["RateLimit"] == '"streams";r=3'


def test_numbers_beyond_a_structured_integer_are_capped_in_the_ietf_fields_only() -> None:
    huge = 10**16  # a spend limit of $10bn in micro-USD, or a token budget nobody has
    items = [HeaderItem("tpd", limit("tpd", LimitKind.TOTAL_TOKENS, huge, 86400),
                        LimitState(True, huge, huge - 5, 86400.0, 0.0)),
             HeaderItem("rpm", limit("rpm", LimitKind.REQUESTS, 60, 60), LimitState(True, 60, 7, 1.0, 0.0))]
    for api in (ApiFamily.OPENAI, ApiFamily.ANTHROPIC):
        headers = build_headers(items, NOW, api)
        policy, state = ietf(headers)  # parses: 16 digits would make the whole field invalid
        assert policy["tpd"]["q"] == state["tpd"]["r"] == SF_INTEGER_MAX
        assert state["rpm"] == {"r": 7, "t": 1}
    assert build_headers(items, NOW, ApiFamily.OPENAI)["x-ratelimit-limit-tokens"] == str(huge)


def test_go_durations_read_back_as_the_milliseconds_they_were() -> None:
    # resets and retries are whole milliseconds / 1000: no float error may add a millisecond
    for ms in [*range(0, 5000), *range(5000, 31 * 86_400_000, 999_983)]:
        assert go_seconds(go_duration(ms / 1000)) * 1000 == pytest.approx(ms, abs=1e-6)


def test_resets_are_never_negative_and_round_up() -> None:
    items = [HeaderItem("rpm", limit("rpm", LimitKind.REQUESTS, 60, 60),
                        LimitState(True, 60, 0, 0.0001, 0.0)),
             HeaderItem("tpm", limit("tpm", LimitKind.TOTAL_TOKENS, 100, 60),
                        LimitState(True, 100, 0, 0.0, 0.0))]
    headers = build_headers(items, NOW)
    assert headers["RateLimit"] == '"rpm";r=0;t=1, "tpm";r=0;t=0'
    assert headers["x-ratelimit-reset-requests"] == "1ms" and headers["x-ratelimit-reset-tokens"] == "0s"
    assert headers["anthropic-ratelimit-requests-reset"] == "2023-11-14T22:13:21Z"  # now, rounded up
