"""Dotted field paths (``client.country``) compiled once into getters on a RequestContext.

A condition names a field by path; the compiler resolves the path here exactly once, so
evaluation is one attribute chain per condition and an unknown path is a load-time error with
the closest valid path suggested.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from gateway.context import RequestContext

Getter = Callable[[RequestContext], Any]

# ISO 3166-1 alpha-2 (all 249 officially assigned codes) plus XK: Kosovo has no official code,
# but MaxMind and most registries report it as the user-assigned XK, so policies must be able to
# name it. EU/AP/UK are deliberately refused: they are not countries and GeoIP never reports them
# as one, so a rule naming them would silently never match.
ISO_COUNTRIES = frozenset(
    """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO
    DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU
    GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW
    KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU
    MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW
    PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF
    TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA
    ZM ZW XK""".split()
)

_NOT_COUNTRIES = MappingProxyType({
    "EU": "it is reserved for the European Union; list the member states instead",
    "UK": "the United Kingdom is GB",
    "AP": "it is a legacy GeoIP region, not a country",
})


# AS numbers are 32-bit (RFC 6793); anything outside can never equal a looked-up ASN, so a rule
# naming one would silently never match.
MAX_ASN = 2**32 - 1


def asn_problem(value: int) -> str | None:
    """Why ``value`` is not an AS number, or None when it is one."""
    if 0 <= value <= MAX_ASN:
        return None
    return f"{value} is not an AS number, expected an integer from 0 to {MAX_ASN}"


def country_problem(code: str) -> str | None:
    """Why ``code`` is not an accepted country code, or None when it is one."""
    if code in ISO_COUNTRIES:
        return None
    base = f"'{code}' is not an ISO 3166-1 alpha-2 country code"
    if code in _NOT_COUNTRIES:
        return f"{base}: {_NOT_COUNTRIES[code]}"
    if code.upper() in ISO_COUNTRIES:
        return f"{base}; did you mean '{code.upper()}'?"
    return f"{base}, expected two upper-case letters such as 'US'"


class Kind(StrEnum):
    """What values a field holds; decides which operators and literals are valid."""

    STR = "a string"
    INT = "an integer"
    NUM = "a number"
    BOOL = "true or false"
    IP = "an IP address"
    COUNTRY = "a country code"
    ANY = "any value"
    TAGS = "a set of tags"


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """A resolved field path: its getter, value kind and whether rules may be indexed on it."""

    path: str
    kind: Kind
    getter: Getter
    indexable: bool = False


def _ip_prefix(ctx: RequestContext) -> str | None:
    ip = ctx.client.ip
    if ip is None:
        return None
    return ctx.client.network(ip)[1]  # /24 or /48, memoised for the request


def _hour(ctx: RequestContext) -> int:
    return time.gmtime(ctx.wall_time).tm_hour


def _weekday(ctx: RequestContext) -> int:
    return time.gmtime(ctx.wall_time).tm_wday


_STATIC: Mapping[str, tuple[Kind, Getter, bool]] = MappingProxyType({
    "request.api": (Kind.STR, lambda c: c.request.api, True),
    "request.route": (Kind.STR, lambda c: c.request.route, True),
    "request.path": (Kind.STR, lambda c: c.request.path, True),
    "request.method": (Kind.STR, lambda c: c.request.method, True),
    "request.model": (Kind.STR, lambda c: c.request.model, True),
    "request.stream": (Kind.BOOL, lambda c: c.request.stream, False),
    "request.max_tokens": (Kind.INT, lambda c: c.request.max_tokens, False),
    "request.n": (Kind.INT, lambda c: c.request.n, False),
    "request.logprobs": (Kind.BOOL, lambda c: c.request.logprobs, False),
    "request.top_logprobs": (Kind.INT, lambda c: c.request.top_logprobs, False),
    "request.logit_bias": (Kind.BOOL, lambda c: c.request.logit_bias, False),
    "request.reasoning": (Kind.BOOL, lambda c: c.request.reasoning, False),
    "request.reasoning_budget": (Kind.INT, lambda c: c.request.reasoning_budget, False),
    "request.input_tokens_estimate": (Kind.INT, lambda c: c.request.input_tokens_estimate, False),
    "request.body_bytes": (Kind.INT, lambda c: c.request.body_bytes, False),
    "principal.authenticated": (Kind.BOOL, lambda c: c.principal.authenticated, False),
    "principal.source": (Kind.STR, lambda c: c.principal.source, True),
    "principal.account": (Kind.STR, lambda c: c.principal.account, True),
    "principal.org": (Kind.STR, lambda c: c.principal.org, True),
    "principal.tier": (Kind.STR, lambda c: c.principal.tier, True),
    "principal.key_id": (Kind.STR, lambda c: c.principal.key_id, True),
    "client.ip": (Kind.IP, lambda c: c.client.ip, False),
    "client.ip_prefix": (Kind.STR, _ip_prefix, False),
    "client.country": (Kind.COUNTRY, lambda c: c.client.country, True),
    "client.registered_country": (Kind.COUNTRY, lambda c: c.client.registered_country, True),
    "client.asn": (Kind.INT, lambda c: c.client.asn, True),
    "client.as_org": (Kind.STR, lambda c: c.client.as_org, False),
    "client.is_anonymous": (Kind.BOOL, lambda c: c.client.is_anonymous, False),
    "client.is_anonymous_vpn": (Kind.BOOL, lambda c: c.client.is_anonymous_vpn, False),
    "client.is_hosting_provider": (Kind.BOOL, lambda c: c.client.is_hosting_provider, False),
    "client.is_tor_exit_node": (Kind.BOOL, lambda c: c.client.is_tor_exit_node, False),
    "client.is_public_proxy": (Kind.BOOL, lambda c: c.client.is_public_proxy, False),
    "client.is_residential_proxy": (Kind.BOOL, lambda c: c.client.is_residential_proxy, False),
    "risk.score": (Kind.NUM, lambda c: c.risk.score, False),
    "risk.cluster_id": (Kind.STR, lambda c: c.risk.cluster_id, False),
    "risk.cluster_score": (Kind.NUM, lambda c: c.risk.cluster_score, False),
    "risk.cluster_size": (Kind.INT, lambda c: c.risk.cluster_size, False),
    "risk.template_id": (Kind.STR, lambda c: c.risk.template_id, False),
    "time.hour": (Kind.INT, _hour, False),
    "time.weekday": (Kind.INT, _weekday, False),
    # Tags set by earlier stages and by earlier matching rules of this evaluation: dynamic, so
    # never used to index rules.
    "tags": (Kind.TAGS, lambda c: c.tags, False),
})

# Prefixes followed by a free name: header names, JWT claims, key attributes, risk signals.
_PREFIXES: Mapping[str, Kind] = MappingProxyType({
    "request.headers.": Kind.STR,
    "principal.claims.": Kind.ANY,
    "principal.attributes.": Kind.ANY,
    "risk.signals.": Kind.NUM,
})


def known_paths() -> list[str]:
    """Every valid path, with ``<name>`` standing for the free part of prefixed ones."""
    return sorted([*_STATIC, *(p + "<name>" for p in _PREFIXES)])


def _header_getter(name: str) -> Getter:
    lower = name.lower()

    def get(ctx: RequestContext) -> Any:
        headers = ctx.request.headers
        value = headers.get(name)
        # aiohttp hands us a case-insensitive mapping; plain dicts (tests) are matched lower-case.
        return value if value is not None else headers.get(lower)

    return get


def _nested_getter(section: str, parts: tuple[str, ...]) -> Getter:
    def get(ctx: RequestContext) -> Any:
        value: Any = getattr(ctx.principal, section)
        for part in parts:
            if not isinstance(value, Mapping):
                return None
            value = value.get(part)
        return value

    return get


def _signal_getter(name: str) -> Getter:
    return lambda c: c.risk.signals.get(name)


def resolve_field(path: str) -> FieldSpec | str:
    """The :class:`FieldSpec` for ``path``, or an error message naming the closest valid path."""
    static = _STATIC.get(path)
    if static is not None:
        kind, getter, indexable = static
        return FieldSpec(path, kind, getter, indexable)
    for prefix, kind in _PREFIXES.items():
        if path.startswith(prefix) and len(path) > len(prefix):
            rest = path[len(prefix):]
            if prefix == "request.headers.":
                return FieldSpec(path, kind, _header_getter(rest))
            if prefix == "risk.signals.":
                return FieldSpec(path, kind, _signal_getter(rest))
            section = prefix.split(".")[1]
            return FieldSpec(path, kind, _nested_getter(section, tuple(rest.split("."))))
        if path == prefix[:-1]:
            return f"'{path}' needs a name after it, expected {prefix}<name>"
    close = difflib.get_close_matches(path, known_paths(), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; see docs/policy-reference.md for the field list"
    return f"unknown field '{path}'{hint}"
