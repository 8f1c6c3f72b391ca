"""The rate-limit headers against what their readers expect.

* ``RateLimit-Policy`` and ``RateLimit`` against draft-ietf-httpapi-ratelimit-headers-11, read by a
  strict RFC 9651 structured-field List parser (below: ``http_sfv`` is not a dependency);
* the OpenAI and Anthropic aliases in the formats those APIs send, and consistent with the IETF
  items (the same limit, the same instant);
* every path of the quota stage (admitted, denied, shadow, store failed open, local fallback,
  routes that charge no tokens);
* the 429's retry hints as the official SDKs' own parsing functions read them.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from openai._models import FinalRequestOptions

from gateway.context import ApiFamily, RequestContext
from gateway.quota.headers import SF_INTEGER_MAX, HeaderItem, build_headers, go_duration
from gateway.quota.limits import CompiledLimit, LimitKind
from gateway.quota.settings import Price, QuotaSettings
from gateway.quota.stage import QuotaStage
from gateway.store.base import Charge, ChargeResult, LimitState, StoreError
from gateway.store.breaker import FailureMode
from gateway.store.memory import MemoryStore
from tests.support.clock import FakeClock
from tests.support.quota_ctx import limit, make_ctx, quota

# ---------------------------------------------------------------------------------------------
# A strict structured-field parser (RFC 9651 §4.2), for Lists of Items: what both fields are.

Params = dict[str, Any]
Member = tuple[Any, Params]


class Token(str):
    """An sf-token (kept apart from an sf-string)."""


class SFError(ValueError):
    pass


_KEY_FIRST = set("abcdefghijklmnopqrstuvwxyz*")
_KEY_REST = _KEY_FIRST | set("0123456789_-.")
_TCHAR = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class _Parser:
    def __init__(self, text: str) -> None:
        if not text.isascii():
            raise SFError("not ASCII")
        self.s, self.i = text, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def take(self) -> str:
        char = self.peek()
        if not char:
            raise SFError("unexpected end")
        self.i += 1
        return char

    def skip(self, chars: str) -> None:
        while self.peek() and self.peek() in chars:
            self.i += 1

    def list(self) -> list[Member]:
        self.skip(" ")
        members: list[Member] = []
        while self.peek():
            members.append(self.inner_list() if self.peek() == "(" else self.item())
            self.skip(" \t")
            if not self.peek():
                return members
            if self.take() != ",":
                raise SFError(f"expected ',' at {self.i - 1}")
            self.skip(" \t")
            if not self.peek():
                raise SFError("trailing comma")
        return members

    def inner_list(self) -> Member:
        self.take()
        items: list[Member] = []
        while True:
            self.skip(" ")
            if self.peek() == ")":
                self.take()
                return items, self.params()
            items.append(self.item())
            if self.peek() not in (" ", ")"):
                raise SFError("bad inner list")

    def item(self) -> Member:
        return self.bare(), self.params()

    def params(self) -> Params:
        params: Params = {}
        while self.peek() == ";":
            self.take()
            self.skip(" ")
            key = self.key()
            value: Any = True
            if self.peek() == "=":
                self.take()
                value = self.bare()
            params[key] = value
        return params

    def key(self) -> str:
        if self.peek() not in _KEY_FIRST or not self.peek():
            raise SFError(f"bad key start at {self.i}")
        start = self.i
        while self.peek() and self.peek() in _KEY_REST:
            self.i += 1
        return self.s[start:self.i]

    def bare(self) -> Any:
        char = self.peek()
        if char == "-" or char.isdigit() and char:
            return self.number()
        if char == '"':
            return self.string()
        if char and (char.isalpha() or char == "*"):
            return self.token()
        if char == ":":
            self.take()
            end = self.s.find(":", self.i)
            if end < 0 or not _BASE64.fullmatch(self.s[self.i:end]):
                raise SFError("bad byte sequence")
            value = self.s[self.i:end].encode()
            self.i = end + 1
            return value
        if char == "?":
            self.take()
            flag = self.take()
            if flag not in "01":
                raise SFError("bad boolean")
            return flag == "1"
        raise SFError(f"bad bare item at {self.i}")

    def number(self) -> int | Decimal:
        sign = -1 if self.peek() == "-" else 1
        if sign < 0:
            self.take()
        start = self.i
        while self.peek().isdigit() and self.peek():
            self.i += 1
        whole = self.s[start:self.i]
        if not whole:
            raise SFError("no digits")
        if self.peek() != ".":
            if len(whole) > 15:
                raise SFError("integer of more than 15 digits")
            return sign * int(whole)
        self.take()
        frac_start = self.i
        while self.peek().isdigit() and self.peek():
            self.i += 1
        frac = self.s[frac_start:self.i]
        if len(whole) > 12 or not 1 <= len(frac) <= 3:
            raise SFError("bad decimal")
        return sign * Decimal(f"{whole}.{frac}")

    def string(self) -> str:
        self.take()
        out: list[str] = []
        while True:
            char = self.take()
            if char == "\\":
                escaped = self.take()
                if escaped not in '"\\':
                    raise SFError("bad escape")
                out.append(escaped)
            elif char == '"':
                return "".join(out)
            elif not 0x20 <= ord(char) <= 0x7E:
                raise SFError("bad string character")
            else:
                out.append(char)

    def token(self) -> Token:
        start = self.i
        self.take()
        while self.peek() and (self.peek() in _TCHAR or self.peek() in ":/"):
            self.i += 1
        return Token(self.s[start:self.i])


def parse_sf_list(text: str) -> list[Member]:
    """Parse a structured-field List strictly (RFC 9651 §4.2.1); SFError on anything else."""
    parser = _Parser(text)
    members = parser.list()
    parser.skip(" ")
    if parser.peek():
        raise SFError("trailing characters")
    return members


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
# Field-level checks, used by every test below.

REGISTERED_UNITS = {"requests", "content-bytes", "concurrent-requests"}  # draft-11 §3.1.2
TOKEN_KINDS = (LimitKind.INPUT_TOKENS, LimitKind.OUTPUT_TOKENS, LimitKind.TOTAL_TOKENS)
GO_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d{1,3})?)s|(\d+)ms)")
RFC3339_SECOND = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
NOW = 1_700_000_000.125


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


# ---------------------------------------------------------------------------------------------
# Every path of the stage.

SETTINGS = QuotaSettings(default_output_tokens=1000, prices=(("gpt-4o", Price(2.5, 10.0)),))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def stage(clock: FakeClock) -> QuotaStage:
    return QuotaStage(MemoryStore(clock), SETTINGS, clock)


def items_of(ctx: RequestContext, stage: QuotaStage, names: dict[str, CompiledLimit]) -> list[HeaderItem]:
    """The items the response's IETF fields describe, rebuilt from them (to check the aliases)."""
    _, state = ietf(ctx.response_headers)
    return [HeaderItem(name, names[name], LimitState(True, names[name].limit, params["r"],
                                                     float(params.get("t", 0)), 0.0))
            for name, params in state.items()]


@pytest.mark.parametrize("api", [ApiFamily.OPENAI, ApiFamily.ANTHROPIC])
async def test_admitted_and_denied_responses_conform(stage: QuotaStage, api: ApiFamily) -> None:
    limits = {"rpm": limit("rpm", LimitKind.REQUESTS, 3, 60, burst=3),
              "itpm": limit("itpm", LimitKind.INPUT_TOKENS, 1000, 60),
              "otpm": limit("otpm", LimitKind.OUTPUT_TOKENS, 800, 60),
              "streams": limit("streams", LimitKind.CONCURRENCY, 2)}
    action = quota("r1", *limits.values())
    seen = []
    for _ in range(4):
        ctx = make_ctx(action, api=api, input_tokens=100, max_tokens=300)
        decision = await stage(ctx)
        seen.append((ctx, decision))
    statuses = [429 if decision else 200 for _, decision in seen]
    assert statuses == [200, 200, 429, 429]  # two leases held: the third stream waits
    for ctx, decision in seen:
        headers = ctx.response_headers
        policy, state = ietf(headers)
        assert policy["streams"] == {"q": 2, "qu": "concurrent-requests"}
        check_aliases(headers, items_of(ctx, stage, limits), NOW, api, precise=False)
        if decision is not None:
            assert decision.headers["RateLimit"] == headers["RateLimit"]
            retry = int(decision.headers["Retry-After"])
            assert retry >= 1 and int(decision.headers["retry-after-ms"]) <= retry * 1000
    # what the denial shows is what is really left: the denied charge was not applied
    _, denied = ietf(seen[2][0].response_headers)
    assert denied["rpm"]["r"] == 1 and denied["itpm"]["r"] == 800 and denied["streams"]["r"] == 0
    for ctx, _ in seen:
        await stage.settle(ctx)


async def test_shadow_limits_are_not_advertised_even_when_they_would_deny(stage: QuotaStage) -> None:
    enforced = quota("r1", limit("rpm", LimitKind.REQUESTS, 100, 60, burst=100))
    shadow = quota("r2", limit("rpm", LimitKind.REQUESTS, 1, 60),
                   limit("tpm", LimitKind.TOTAL_TOKENS, 10, 60), shadow=True)
    for i in range(3):
        ctx = make_ctx(enforced, shadow)
        assert await stage(ctx) is None
        policy, state = ietf(ctx.response_headers)
        assert list(policy) == ["rpm"] and state["rpm"]["r"] == 99 - i  # only r1's
        assert "x-ratelimit-limit-tokens" not in ctx.response_headers
        assert ctx.response_headers["x-ratelimit-limit-requests"] == "100"
        assert ctx.audit["quota"]["would_deny"] == (["r2/rpm"] if i else []) + ["r2/tpm"]
        await stage.settle(ctx)


class DownStore(MemoryStore):
    """A shared store that does not answer."""

    async def charge(self, charges: Sequence[Charge]) -> ChargeResult:
        raise StoreError("down")


async def test_a_store_that_did_not_answer_claims_nothing(clock: FakeClock) -> None:
    settings = QuotaSettings(replicas=2, on_store_failure=FailureMode.OPEN)
    stage = QuotaStage(DownStore(clock), settings, clock)
    opened = quota("r1", limit("rpm", LimitKind.REQUESTS, 10, 60, burst=10),
                   limit("tpd", LimitKind.TOTAL_TOKENS, 10_000, 86400))
    ctx = make_ctx(opened)
    assert await stage(ctx) is None
    assert ctx.response_headers == {}  # nothing was checked: no remaining quota to claim
    closed = quota("r2", limit("rpm", LimitKind.REQUESTS, 10, 60), on_store_failure=FailureMode.CLOSED)
    ctx = make_ctx(opened, closed)
    decision = await stage(ctx)
    assert decision is not None and decision.status == 503 and ctx.response_headers == {}
    assert set(decision.headers) == {"Retry-After"}
    # local: the replica's own count of its share, the only limits that were checked
    local = quota("r3", limit("tpd", LimitKind.TOTAL_TOKENS, 10_000, 86400),
                  on_store_failure=FailureMode.LOCAL)
    ctx = make_ctx(opened, local, input_tokens=100, max_tokens=100)
    assert await stage(ctx) is None
    policy, state = ietf(ctx.response_headers)
    assert list(policy.values()) == [{"q": 5000, "w": 86400, "tg-unit": "total_tokens"}]  # 10,000 / 2
    assert [params["r"] for params in state.values()] == [4800]
    assert ctx.response_headers["x-ratelimit-limit-tokens"] == "5000"
    assert ctx.response_headers["x-ratelimit-remaining-tokens"] == "4800"
    assert "x-ratelimit-limit-requests" not in ctx.response_headers  # r1's limits were skipped
    await stage.settle(ctx)
    await stage.guard.close()


@pytest.mark.parametrize(("route", "api"), [("messages.count_tokens", ApiFamily.ANTHROPIC),
                                            ("models", ApiFamily.OPENAI)])
async def test_routes_that_charge_no_tokens_claim_no_charge(stage: QuotaStage, clock: FakeClock, route: str,
                                                             api: ApiFamily) -> None:
    limits = {"rpm": limit("rpm", LimitKind.REQUESTS, 10, 60, burst=10),
              "tpm": limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60)}
    action = quota("r1", *limits.values())
    for i in range(3):
        ctx = make_ctx(action, api=api, input_tokens=500, max_tokens=500)
        ctx.request = dataclasses.replace(ctx.request, route=route, billed=False, generates=False)
        assert await stage(ctx) is None
        _, state = ietf(ctx.response_headers)
        # the token budget is shown as it is: untouched, and due back to full at once (nothing
        # was charged that would have to leave a window), while the request rate counts
        assert state["tpm"] == {"r": 1000, "t": 0} and state["rpm"]["r"] == 9 - i
        check_aliases(ctx.response_headers, items_of(ctx, stage, limits), clock(), api, precise=False)
        await stage.settle(ctx)


async def test_remaining_is_never_negative_after_a_limit_is_lowered(stage: QuotaStage) -> None:
    before = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 1000, 60),
                   limit("streams", LimitKind.CONCURRENCY, 4))
    held = [make_ctx(before, input_tokens=300, max_tokens=300)] + [
        make_ctx(before, input_tokens=1, max_tokens=1) for _ in range(2)]
    for ctx in held:  # 604 tokens reserved, three leases held
        assert await stage(ctx) is None
    after = quota("r1", limit("tpm", LimitKind.TOTAL_TOKENS, 100, 60),  # reload: same identity,
                  limit("streams", LimitKind.CONCURRENCY, 1))  # numbers below what is in use
    ctx = make_ctx(after, input_tokens=1, max_tokens=1)
    decision = await stage(ctx)
    assert decision is not None and decision.status == 429
    policy, state = ietf(ctx.response_headers)
    assert state["tpm"]["r"] == 0 and state["streams"]["r"] == 0
    assert ctx.response_headers["x-ratelimit-remaining-tokens"] == "0"
    for c in held:
        await stage.settle(c)


# ---------------------------------------------------------------------------------------------
# The 429 as the SDKs' own retry code reads it.


async def _denial(stage: QuotaStage, per: float, api: ApiFamily) -> Mapping[str, str]:
    action = quota(f"r-{per:g}", limit("rps", LimitKind.REQUESTS, 10, per))
    assert await stage(make_ctx(action, api=api)) is None
    decision = await stage(make_ctx(action, api=api))
    assert decision is not None and decision.status == 429
    return decision.headers


async def test_openai_sdk_waits_exactly_what_the_429_says(stage: QuotaStage) -> None:
    headers = httpx2.Headers(await _denial(stage, 1.0, ApiFamily.OPENAI))  # 10/s: the next in 100 ms
    assert headers["Retry-After"] == "1" and headers["retry-after-ms"] == "100"
    client = openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9", max_retries=1)
    options = FinalRequestOptions(method="post", url="/chat/completions")
    assert client._parse_retry_after_header(headers) == 0.1
    assert client._calculate_retry_timeout(1, options, headers) == 0.1
    assert client._should_retry(httpx2.Response(429, headers=headers))
    # a wait beyond the SDK's cap (2 min): no retry, rather than a shorter one
    long = httpx2.Headers(await _denial(stage, 3600.0, ApiFamily.OPENAI))  # 10/h: 6 min
    assert long["Retry-After"] == "360" and not client._should_retry(httpx2.Response(429, headers=long))
    client.close()


async def test_retry_after_ms_is_the_stores_milliseconds_exactly(stage: QuotaStage) -> None:
    # 1000 per 2007 s: the next request fits 2007 ms later, which is 2.007 s as a float
    action = quota("r1", limit("r", LimitKind.REQUESTS, 1000, 2007))
    assert await stage(make_ctx(action)) is None
    decision = await stage(make_ctx(action))
    assert decision is not None
    assert decision.headers["retry-after-ms"] == "2007" and decision.headers["Retry-After"] == "3"
    assert decision.headers["x-ratelimit-reset-requests"] == "2.007s"


async def test_anthropic_sdk_waits_exactly_what_the_429_says(stage: QuotaStage) -> None:
    headers = httpx2.Headers(await _denial(stage, 1.0, ApiFamily.ANTHROPIC))
    client = anthropic.Anthropic(api_key="k", base_url="http://127.0.0.1:9", max_retries=1)
    options = anthropic._models.FinalRequestOptions(method="post", url="/v1/messages")
    assert client._parse_retry_after_header(headers) == 0.1
    assert client._calculate_retry_timeout(1, options, headers) == 0.1
    assert client._should_retry(httpx2.Response(429, headers=headers))
    client.close()


async def test_a_request_that_can_never_fit_is_not_retried_by_either_sdk(stage: QuotaStage) -> None:
    action = quota("r1", limit("otpm", LimitKind.OUTPUT_TOKENS, 100, 60))
    decision = await stage(make_ctx(action, max_tokens=500))
    assert decision is not None and decision.status == 429
    headers = httpx2.Headers(decision.headers)
    assert "Retry-After" not in headers and "retry-after-ms" not in headers
    for client in (openai.OpenAI(api_key="k", base_url="http://127.0.0.1:9"),
                   anthropic.Anthropic(api_key="k", base_url="http://127.0.0.1:9")):
        assert not client._should_retry(httpx2.Response(429, headers=headers))
        client.close()
