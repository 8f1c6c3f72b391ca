"""Client IP: the peer address, or — behind trusted proxies — the first untrusted forwarded hop.

Forwarding headers are attacker-controlled except for the part our own proxies appended on the
right, so they are read only when the socket peer is a trusted proxy, walked from the right,
skipping trusted hops, and the first untrusted address wins. Only the rightmost ``max_entries``
hops / ``max_header_bytes`` bytes are looked at: padding the left of a header can neither push
the real client out of view nor cost us more than a bounded parse. Anything unparsable where
the walk needs an address (garbage, ``unknown``, ``_hidden``) makes the peer the client: we do
not guess further left than a hop we could not read.

Every address, the peer's and each hop's, is normalised (:func:`gateway.ipaddr.normalize`), with
the operator's local NAT64 prefixes (``nat64_prefixes``) decoded as well. ``trusted_proxies`` is
compared with those normalised addresses as written (IPv4-mapped networks aside, stored as IPv4),
so an entry in another IPv6 form of IPv4 (NAT64, IPv4-compatible, 6to4, Teredo, a configured
NAT64 prefix) could never match: the config refuses it and names the IPv4 network to write.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.context import Decision, IPAddress, RequestContext
from gateway.ipaddr import (
    MAX_ADDRESS_CHARS,
    CarriedIpv4,
    CidrSet,
    Nat64Prefixes,
    Network,
    carried_ipv4,
    nat64_prefix_problem,
    normalize,
    parse_host,
    parse_network,
)
from gateway.memo import Memo
from gateway.yamlsource import Node

SUPPORTED_HEADERS = ("x-forwarded-for", "forwarded")
# One ``name=value`` pair of a Forwarded element (RFC 7239 §4), the value a token or a quoted
# string; pairs are read in order so that ``for=`` inside another pair's quoted value (which a
# client may influence, e.g. ``host``) is never taken for the hop's address.
_FORWARDED_PAIR = re.compile(r'\s*([^=;"\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;"]*?)\s*(?:;|$)')
_REV_TOKENS = re.compile(r'[^",]+|"|,')
_MAX_CHAIN_ITEM = 64  # chars kept per hop in ctx.client.forwarded_chain (audit), not for parsing
# Parsed hops remembered (text → address or None): clients and our proxies repeat their hops
# request after request, and ipaddress parsing costs microseconds. Only hops short enough to be
# an address are kept, so the memo's memory stays bounded whatever clients send.
PARSED_HOP_ENTRIES = 16384


@dataclass(frozen=True, slots=True)
class ClientIpConfig:
    """``client_ip:`` section.

    ``headers`` lists the forwarding headers our proxies set, most preferred first; only the
    first one present is read. Trusting a header the proxy passes through untouched would let
    clients choose their own address, so list only what the proxy writes.

    ``nat64_prefixes`` lists the local NAT64 prefixes (RFC 8215 ``64:ff9b:1::/48``, or RFC 6052
    Network-Specific Prefixes) whose addresses stand for IPv4 clients in this network; off by
    default, since elsewhere those ranges may hold real IPv6 clients.
    """

    trusted_proxies: CidrSet = field(default_factory=CidrSet)
    headers: tuple[str, ...] = ("x-forwarded-for",)
    max_entries: int = 32
    max_header_bytes: int = 8192
    nat64_prefixes: Nat64Prefixes = field(default_factory=Nat64Prefixes)


def nat64_of(settings: Any) -> Nat64Prefixes | None:
    """The configured local NAT64 prefixes of a :class:`gateway.settings.Settings` (None when
    there are none or no settings, e.g. ``gateway policy check`` without ``--config``), for the
    places that must normalise as this stage does (policy CIDR conditions, tests, explain)."""
    sections = getattr(settings, "sections", None)
    config = sections.get("client_ip") if isinstance(sections, dict) else None
    if isinstance(config, ClientIpConfig) and config.nat64_prefixes:
        return config.nat64_prefixes
    return None


def parse_client_ip_config(node: Node | None) -> ClientIpConfig:
    """Read ``client_ip:``; errors go to ``node.issues`` (the caller raises them all together)."""
    default = ClientIpConfig()
    if node is None or node.value is None:
        return default
    if not node.expect_mapping():
        return default
    node.check_keys({"trusted_proxies", "headers", "max_entries", "max_header_bytes", "nat64_prefixes"})
    nat64 = _nat64_prefixes(node.child("nat64_prefixes"))  # first: trusted_proxies is checked against it
    nets = []
    for item, net in _networks(node.child("trusted_proxies"), "a list of addresses or CIDRs",
                               "an address or CIDR string"):
        carried = carried_ipv4(net, nat64)
        if carried is not None:
            item.error(_never_matches(net, carried))
        else:
            nets.append(net)
    headers = default.headers
    hnode = node.child("headers")
    if hnode is not None and hnode.expect_list("a list of header names"):
        names: list[str] = []
        for item in hnode.elements():
            name = item.as_type(str, what="a header name")
            if name is None:
                continue
            if name.lower() not in SUPPORTED_HEADERS:
                item.error(f"unsupported header '{name}'; expected one of: {', '.join(SUPPORTED_HEADERS)}")
            else:
                names.append(name.lower())
        headers = tuple(names)
    max_entries = _positive(node, "max_entries", default.max_entries, 1024)
    max_bytes = _positive(node, "max_header_bytes", default.max_header_bytes, 65536)
    return ClientIpConfig(CidrSet.from_networks(nets), headers, max_entries, max_bytes, nat64)


def _never_matches(net: Network, carried: CarriedIpv4) -> str:
    """Why a trusted proxy written in an IPv6 form of IPv4 is refused, and what to write.

    The peer and every hop are normalised to IPv4 before they are compared, so the entry as
    written can never match, and client IPs behind that proxy would silently be the proxy's own.
    It is refused rather than converted: read as IPv4, ``64:ff9b::/96`` would trust every IPv4
    peer, which the operator should write (or not) knowingly.
    """
    if not carried.networks:
        return (f"'{net}' lies in {carried.form} space, whose peers the gateway sees as the IPv4 "
                "address each carries, so it never matches; write the IPv4 addresses of those proxies")
    single = carried.networks[0]
    if len(carried.networks) == 1 and single.num_addresses == 1:
        return (f"'{net}' is the {carried.form} form of {single.network_address}, which is how the "
                f"gateway sees that peer, so it never matches; write {single}")
    written = " and ".join(str(n) for n in carried.networks)
    carried_v4 = " and ".join(str(n) for n in carried.networks if n.version == 4)
    everyone = any(n.version == 4 and n.prefixlen == 0 for n in carried.networks)
    return (f"'{net}' is the {carried.form} form of {carried_v4}, which is how the gateway sees "
            f"those peers, so it never matches them; write {written}"
            + (" (if every IPv4 peer is meant to be trusted)" if everyone else ""))


def _networks(node: Node | None, expected_list: str, expected_item: str) -> Iterator[tuple[Node, Network]]:
    """Each entry of a list of networks with its node; entries that do not parse are reported."""
    if node is None or not node.expect_list(expected_list):
        return
    for item in node.elements():
        text = item.as_type(str, what=expected_item)
        if text is None:
            continue
        try:
            yield item, parse_network(text)
        except ValueError as exc:
            item.error(str(exc))


def _nat64_prefixes(node: Node | None) -> Nat64Prefixes:
    accepted: list[ipaddress.IPv6Network] = []
    if node is None or node.value is None:
        return Nat64Prefixes()
    for item, net in _networks(node, "a list of NAT64 prefixes", "a NAT64 prefix such as 64:ff9b:1::/48"):
        problem = nat64_prefix_problem(net, accepted)
        if problem is not None:
            item.error(problem)
        elif isinstance(net, ipaddress.IPv6Network):
            accepted.append(net)
    return Nat64Prefixes(tuple(accepted))


def _positive(node: Node, key: str, default: int, limit: int) -> int:
    value = node.get(key, int, default)
    if value is None or not 1 <= value <= limit:
        node.error(f"expected an integer from 1 to {limit}", key)
        return default
    return value


class ClientIpStage:
    """Sets ``ctx.client.ip`` (normalised) and ``ctx.client.forwarded_chain``. Never short-circuits."""

    before_body = True  # reads headers only (see Pipeline)

    def __init__(
        self, trusted_proxies: CidrSet, headers: tuple[str, ...] = ("x-forwarded-for",),
        max_entries: int = 32, max_header_bytes: int = 8192,
        nat64_prefixes: Nat64Prefixes | None = None,
    ) -> None:
        unknown = [h for h in headers if h.lower() not in SUPPORTED_HEADERS]
        if unknown:
            raise ValueError(f"unsupported forwarding header(s): {', '.join(unknown)}")
        if max_entries < 1 or max_header_bytes < 1:
            raise ValueError("max_entries and max_header_bytes must be positive")
        self._trusted = trusted_proxies
        self._headers = tuple(h.lower() for h in headers)
        self._max_entries = max_entries
        self._max_bytes = max_header_bytes
        self._parsed: Memo[IPAddress | None] = Memo(PARSED_HOP_ENTRIES, MAX_ADDRESS_CHARS + 8)
        # None rather than an empty set: the common case skips the prefix loop altogether. The
        # hop parser is bound once here, not per request.
        self._nat64 = nat64_prefixes or None
        self._parse_hop: Callable[[str], IPAddress | None] = (
            functools.partial(parse_host, nat64=self._nat64) if self._nat64 else parse_host)

    @classmethod
    def from_config(cls, config: ClientIpConfig) -> ClientIpStage:
        return cls(config.trusted_proxies, config.headers, config.max_entries, config.max_header_bytes,
                   config.nat64_prefixes)

    async def __call__(self, ctx: RequestContext) -> Decision | None:
        client = ctx.client
        peer = client.peer_ip
        if peer is None:  # e.g. a unix socket: nothing to trust, nothing to look up
            client.ip = None
            return None
        peer = normalize(peer, self._nat64)
        client.ip = peer
        if not self._trusted or peer not in self._trusted:
            return None  # headers from an untrusted peer are the client's own claims: ignored
        headers = ctx.request.headers
        for name in self._headers:
            raw = self._header(headers, name)
            if raw is None:
                continue
            hops = _xff_hops(raw, self._max_entries) if name == "x-forwarded-for" else (
                _forwarded_hops(raw, self._max_entries))
            if hops is None:
                ctx.audit["client_ip"] = "malformed forwarding header"
                return None
            client.forwarded_chain = tuple(h[:_MAX_CHAIN_ITEM] for h in hops)
            client.ip = self._walk(hops, peer)
            return None
        return None

    def _header(self, headers: Mapping[str, str], name: str) -> str | None:
        """All instances of ``name`` joined (RFC 7230 list semantics), cut to the last bytes."""
        getall = getattr(headers, "getall", None)
        if getall is not None:
            values: list[str] = getall(name, [])
            if not values:
                return None
            # Each instance holds at least one hop, so older instances beyond the cap are moot.
            raw = ",".join(values[-self._max_entries:])
        else:
            value = headers.get(name)
            if value is None:
                return None
            raw = value
        if len(raw) > self._max_bytes:
            raw = raw[-self._max_bytes:]
            cut = raw.find(",")
            raw = raw[cut + 1:] if cut >= 0 else ""  # the leftmost piece was cut mid-hop
        return raw

    def _walk(self, hops: list[str], peer: IPAddress) -> IPAddress:
        last_trusted = peer
        parsed, parse_hop = self._parsed, self._parse_hop
        for hop in reversed(hops):
            ip = parsed(hop, parse_hop)  # longer than an address is never one: not remembered
            if ip is None:
                return peer
            if ip not in self._trusted:
                return ip
            last_trusted = ip
        # Every hop is one of ours (an internal caller): the leftmost one is the best we know.
        return last_trusted


def _xff_hops(raw: str, max_entries: int) -> list[str]:
    parts = raw.rsplit(",", max_entries)
    if len(parts) > max_entries:
        parts = parts[1:]
    return [p.strip() for p in parts]


def _forwarded_hops(raw: str, max_entries: int) -> list[str] | None:
    """``for=`` values of the rightmost elements of an RFC 7239 header, left to right.

    Elements are split on commas outside quoted strings, scanning from the right so a malformed
    (say, unbalanced-quote) client-supplied part on the left cannot change how the proxies'
    well-formed part on the right is read. None when no element can be read at all.
    """
    if '"' not in raw:
        elements = _xff_hops(raw, max_entries)
    else:
        elements = []
        rev = raw[::-1]
        in_quote = False
        end = 0  # in reversed coordinates: start of the current element
        tokens = 0
        for m in _REV_TOKENS.finditer(rev):
            tokens += 1
            if tokens > 8 * max_entries + 8:
                break  # a quote/comma storm: keep what we have, stop paying for it
            tok = m.group()
            if tok == '"':
                escaped = m.end() < len(rev) and rev[m.end()] == "\\"
                if not escaped:
                    in_quote = not in_quote
            elif tok == "," and not in_quote:
                elements.append(rev[end:m.start()][::-1].strip())
                end = m.end()
                if len(elements) >= max_entries:
                    break
        else:
            if not in_quote:
                elements.append(rev[end:][::-1].strip())
        elements.reverse()
    hops = [_for_value(element) for element in elements]
    return hops or None


def _for_value(element: str) -> str:
    """The ``for`` value of one Forwarded element; "" when it has none or is malformed (the walk
    then stops at that hop, as for any unreadable hop)."""
    at, end = 0, len(element)
    while at < end:
        pair = _FORWARDED_PAIR.match(element, at)
        if pair is None or pair.end() == at:
            return ""
        if pair.group(1).lower() == "for":
            return pair.group(2)
        at = pair.end()
    return ""
